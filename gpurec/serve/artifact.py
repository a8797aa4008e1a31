"""The served artifact: one TorchScript module = id remap + trained DLRM + combined score.

Triton's python backend runs this module (`triton_models/ranker/model.py`), so what a client
gets is computed by exactly the code and weights training produced: `ServingRanker` takes the
contract's tensors (dense [B, D], single-valued ids [B, S], padded multi-valued ids [B, K]),
builds the KeyedJaggedTensor training used, remaps hashed ids to table rows with the same
`ModuloRemap`, and returns each task's probability plus `score` from `combine_task_scores`.

TorchScript rather than torch.export: the model scripts through `torchrec.fx.symbolic_trace`
(tests/test_model.py), loads with plain `torch.jit.load` in a process that has not imported
torchrec (only fbgemm's ops must be registered, by `import fbgemm_gpu`), and maps onto a GPU
with `map_location`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.model.dlrm import MultiTaskDLRM, combine_task_scores
from gpurec.serve.contract import PAD_ID, ServingContract

ARTIFACT_FILE = "model.pt"


class ServingRanker(nn.Module):
    """``forward(dense [B, D] f32, single [B, S] i64, multi [[B, K_i] i64]) -> {task: p [B], "score": [B]}``.

    `single` columns follow `single_features`, `multi` follows `multi_features`; multi-valued rows
    are padded with `PAD_ID`, which is dropped before pooling (a row of only padding pools to
    the empty bag, as an item without hashtags does in training).
    """

    def __init__(
        self,
        model: MultiTaskDLRM,
        remap: nn.Module,  # hashed ids -> rows: the trained id map's serving lookup
        single_features: list[str],
        multi_features: list[str],
        score_weights: dict[str, float],
    ) -> None:
        super().__init__()
        self.model = symbolic_trace(model)
        self.remap = remap
        self.single_features: list[str] = list(single_features)
        self.multi_features: list[str] = list(multi_features)
        self.keys: list[str] = self.single_features + self.multi_features
        self.tasks: list[str] = list(model.heads.keys())
        self.score_weights: dict[str, float] = dict(score_weights)
        self.pad_id: int = PAD_ID

    def forward(self, dense: torch.Tensor, single: torch.Tensor, multi: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        rows = dense.size(0)
        # KJT layout is key-major: all rows of the first key, then all rows of the next, ...
        values = [single.t().reshape(-1)]
        lengths = [torch.ones(rows * len(self.single_features), dtype=torch.int32, device=dense.device)]
        for ids in multi:
            keep = ids != self.pad_id
            values.append(ids[keep])
            lengths.append(keep.sum(dim=1).to(torch.int32))
        sparse = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=torch.cat(values), lengths=torch.cat(lengths))
        logits = self.model(dense, self.remap(sparse))
        out: dict[str, torch.Tensor] = {}
        for task in self.tasks:
            out[task] = torch.sigmoid(logits[task])
        out["score"] = combine_task_scores(logits, self.score_weights)  # = contract.SCORE_OUTPUT
        return out


def build_serving_ranker(model: MultiTaskDLRM, remap: nn.Module, contract: ServingContract) -> torch.jit.ScriptModule:
    """Script the serving module for `contract` (its feature order decides the input columns)."""
    if set(contract.sparse_features) | set(contract.multi_valued_features) != set(model.sparse_feature_names):
        raise ValueError(
            f"contract features {contract.sparse_features + contract.multi_valued_features} "
            f"do not match the model's {model.sparse_feature_names}"
        )
    wrapper = ServingRanker(
        model.eval(), remap, list(contract.sparse_features), list(contract.multi_valued_features), contract.score_weights
    )
    return torch.jit.script(wrapper.eval())


def save_artifact(module: torch.jit.ScriptModule, directory: str | Path) -> Path:
    path = Path(directory) / ARTIFACT_FILE
    module.save(str(path))
    return path


def to_tensors(arrays: dict, contract: ServingContract) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Contract arrays (numpy, batch dim first) -> the serving module's three arguments."""
    import numpy as np

    dense = torch.from_numpy(np.ascontiguousarray(arrays["dense"], dtype=np.float32))
    single = torch.from_numpy(
        np.concatenate([np.asarray(arrays[n], dtype=np.int64).reshape(-1, 1) for n in contract.sparse_features], axis=1)
    )
    multi = [torch.from_numpy(np.asarray(arrays[n], dtype=np.int64)) for n in contract.multi_valued_features]
    return dense, single, multi
