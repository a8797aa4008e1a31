"""Serving on Triton Inference Server: export a trained ranker, run the server, the request contract.

- `contract`: what a request carries and how raw values become ids (numpy only: clients import it);
- `artifact`: the TorchScript module Triton runs (id remap + DLRM + combined score);
- `model_config`, `export`: the versioned model repository (`gpurec export`);
- `server`: `TritonServer`, the launcher used by `gpurec serve`, the tests and benchmarks.

The python-backend code Triton executes lives in `triton_models/` at the repository root.
Nothing is imported here, so `import gpurec.serve.contract` stays light.
"""
