"""Triton python-backend model `recommend`: the top k of one user's candidates, by the ranker's score.

A BLS model (business logic scripting): it forwards the candidate rows to `ranker` (the version
exported with it, so the two always agree on the contract) and sorts. Going through Triton
rather than loading the weights again keeps one copy of the model and lets the ranker's dynamic
batcher merge the candidates of concurrent users into one forward pass.

Inputs: the ranker's inputs with the candidate dim first ([N, D], [N, 1], [N, K]), plus
`candidate_ids` INT64 [N] (raw item ids, passed through) and `k` INT32 [1]. Outputs: `item_ids`
INT64 [k'], `scores` FP32 [k'] and `indices` INT64 [k'] (positions in the candidates), best
first, with k' = min(k, N); ties keep candidate order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.contract = json.loads((version_dir / "contract.json").read_text())
        self.ranker_version = int(args["model_version"])
        self.row_inputs = [spec["name"] for spec in self.contract["inputs"]]
        self.max_candidates = int(self.contract["max_batch_size"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._recommend(request))
            except ValueError as err:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"recommend: {err}", pb_utils.TritonError.INVALID_ARG))
                )
            except RuntimeError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"recommend: {err}", pb_utils.TritonError.INTERNAL)))
        return responses

    def _recommend(self, request) -> pb_utils.InferenceResponse:
        ids_tensor = pb_utils.get_input_tensor_by_name(request, "candidate_ids")
        k_tensor = pb_utils.get_input_tensor_by_name(request, "k")
        if ids_tensor is None or k_tensor is None:
            raise ValueError("inputs 'candidate_ids' and 'k' are required")
        candidate_ids = ids_tensor.as_numpy().reshape(-1)
        k = int(k_tensor.as_numpy().reshape(-1)[0])
        n = candidate_ids.shape[0]
        if n == 0:
            raise ValueError("no candidates")
        if n > self.max_candidates:
            raise ValueError(f"{n} candidates exceed the maximum {self.max_candidates}")
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        rows = []
        for name in self.row_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name!r}")
            if tensor.as_numpy().shape[0] != n:
                raise ValueError(f"input {name!r} has {tensor.as_numpy().shape[0]} rows for {n} candidate_ids")
            rows.append(tensor)
        ranked = pb_utils.InferenceRequest(
            model_name="ranker",
            model_version=self.ranker_version,
            requested_output_names=["score"],
            inputs=rows,
        ).exec()
        if ranked.has_error():
            error = ranked.error().message()
            # The ranker's input errors are the caller's errors; anything else (NaN/inf scores or a
            # failed forward pass, which the ranker answers INTERNAL) is ours.
            internal = "non_finite_output" in error or "scoring_failed" in error
            raise (ValueError if ("ranker:" in error or "unexpected" in error) and not internal else RuntimeError)(error)
        scores = pb_utils.get_output_tensor_by_name(ranked, "score").as_numpy().reshape(-1)
        top = np.argsort(-scores, kind="stable")[: min(k, n)]
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("item_ids", candidate_ids[top].astype(np.int64)),
                pb_utils.Tensor("scores", scores[top].astype(np.float32)),
                pb_utils.Tensor("indices", top.astype(np.int64)),
            ]
        )

    def finalize(self) -> None:
        pass
