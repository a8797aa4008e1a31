"""Triton `config.pbtxt` text for the `ranker` and `recommend` models, generated from the contract.

Generated, never hand-written: the inputs/outputs come from the same `ServingContract` that is
written as `contract.json`, so the server's shape checks and the client's can't drift apart.

- `ranker`: batched (`max_batch_size`), dynamic batching on, so concurrent requests from many
  users (and `recommend` calls) are scored in one forward pass; one instance per GPU when CUDA is
  present (KIND_GPU), else CPU instances.
- `recommend`: a BLS model (`max_batch_size: 0`: its first dim is the N candidates of one user)
  that calls `ranker` and keeps the top k; it holds no weights, so it runs on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpurec.serve.contract import RANKER_MODEL, RECOMMEND_MODEL, ServingContract, TensorSpec


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching knobs: how long a request may wait for others (µs) and preferred sizes."""

    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    instance_count: int = 1


def instance_kind(use_gpu: bool | None = None) -> str:
    """KIND_GPU when CUDA is visible (or asked for), else KIND_CPU."""
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    return "KIND_GPU" if use_gpu else "KIND_CPU"


def _tensor_block(kind: str, specs: list[TensorSpec]) -> str:
    entries = [
        f'  {{\n    name: "{s.name}"\n    data_type: TYPE_{s.triton_dtype}\n    dims: [ {", ".join(map(str, s.dims))} ]\n  }}'
        for s in specs
    ]
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def ranker_config(contract: ServingContract, kind: str, batching: BatchingConfig | None = None) -> str:
    batching = batching or BatchingConfig()
    preferred = ""
    if batching.preferred_batch_sizes:
        preferred = f"  preferred_batch_size: [ {', '.join(map(str, batching.preferred_batch_sizes))} ]\n"
    return (
        f'name: "{RANKER_MODEL}"\n'
        'backend: "python"\n'
        f"max_batch_size: {contract.max_batch_size}\n"
        + _tensor_block("input", contract.ranker_inputs())
        + _tensor_block("output", contract.ranker_outputs())
        + "dynamic_batching {\n"
        + preferred
        + f"  max_queue_delay_microseconds: {batching.max_queue_delay_us}\n}}\n"
        + f"instance_group [\n  {{\n    count: {batching.instance_count}\n    kind: {kind}\n  }}\n]\n"
    )


def recommend_config(contract: ServingContract, instance_count: int = 2) -> str:
    """Two instances by default: a BLS instance waits on the ranker while the other takes the
    next user, so concurrent users' candidates can meet in the ranker's dynamic batcher."""
    return (
        f'name: "{RECOMMEND_MODEL}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        + _tensor_block("input", contract.recommend_inputs())
        + _tensor_block("output", contract.recommend_outputs())
        + f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n  }}\n]\n"
    )
