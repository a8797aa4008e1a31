"""Fresh rows for newly admitted ids: embedding and optimizer state, wherever the row lives.

A row freed by expiry or eviction still holds its previous id's embedding and RowWiseAdagrad
state; the next id to get it must start clean. `initial_rows` is that clean start: TorchRec's
default table init (uniform in +-sqrt(1/rows)) but drawn from a hash of (feature, id, column)
instead of a random generator, so an id starts from the same vector whichever row, rank or
device it lands on. `RowReinitializer` writes it into the sharded model's tables in place and
zeroes the row's optimizer state, for every sharding type: it walks the local shards of each
table (row-wise: a block of rows; table-wise: all or none; column-wise: a slice of columns).
`RowReinitializer.zero` writes zeros instead, embedding and optimizer state, for rows released by
an erasure: the initial value is a function of the id, so it too would be a trace of the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.data.hashing_core import feature_salt, to_signed
from gpurec.embedding.cuckoo import mix64
from gpurec.embedding.partition import Admitted
from gpurec.embedding.tables import SparseFeatureSpec

_COLUMN_STRIDE = 0x9E3779B97F4A7C15 - 2**64  # golden-ratio steps between the columns' hash inputs
_MANTISSA = 1 << 53


def initial_rows(ids: torch.Tensor, feature: str, dim: int, num_rows: int) -> torch.Tensor:
    """[len(ids), dim] float32, uniform in +-sqrt(1 / num_rows), a pure function of (feature, id)."""
    columns = torch.arange(dim, dtype=torch.int64, device=ids.device) * _COLUMN_STRIDE
    bits = mix64(ids.to(torch.int64).unsqueeze(1) ^ columns, to_signed(feature_salt(feature)))
    unit = (bits >> 10).to(torch.float64) / _MANTISSA  # 53 random bits -> [0, 1)
    bound = (1.0 / num_rows) ** 0.5
    return ((2.0 * unit - 1.0) * bound).to(torch.float32)


@dataclass
class _Shard:
    weight: torch.Tensor  # local rows x local columns, a view into the table's storage
    row_start: int
    col_start: int
    states: list[torch.Tensor]  # optimizer state with one entry (or row) per local row


class RowReinitializer:
    """Re-initialise rows of a DistributedModelParallel ranker's tables in place.

    Built once after the model (and any checkpoint) is loaded: the views it keeps point into
    the fused tables' storage, which TorchRec does not reallocate while training.
    """

    def __init__(self, sharded: nn.Module, optimizer: Any, specs: list[SparseFeatureSpec]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        weights = {key: value for key, value in sharded.state_dict().items() if key.endswith(".weight")}
        optimizer_state = optimizer.state_dict()["state"]
        self.shards: dict[str, list[_Shard]] = {}
        for feature in self.specs:
            key = _table_key(weights, self.specs[feature])
            states = [tensor for tensor in optimizer_state.get(key, {}).values() if _is_tensor_like(tensor)]
            self.shards[feature] = _local_shards(weights[key], states)

    def apply(self, admitted: dict[str, Admitted]) -> int:
        """Reset the admitted rows this rank holds; return how many row slices were written."""
        written = 0
        with torch.no_grad():
            for feature, new in admitted.items():
                for shard in self.shards[feature]:
                    local = new.rows - shard.row_start
                    mine = (local >= 0) & (local < shard.weight.shape[0])
                    if not bool(mine.any()):
                        continue
                    rows = local[mine].to(shard.weight.device)
                    spec = self.specs[feature]
                    full = initial_rows(new.ids[mine], feature, spec.embedding_dim, spec.num_embeddings)
                    columns = full[:, shard.col_start : shard.col_start + shard.weight.shape[1]]
                    shard.weight[rows] = columns.to(shard.weight.device, shard.weight.dtype)
                    for state in shard.states:
                        state[rows] = 0
                    written += rows.numel()
        return written

    def zero(self, rows_by_feature: dict[str, torch.Tensor]) -> int:
        """Zero the given global rows (embedding and optimizer state) this rank holds; return how
        many row slices were written."""
        written = 0
        with torch.no_grad():
            for feature, global_rows in rows_by_feature.items():
                for shard in self.shards[feature]:
                    local = global_rows.to(torch.int64) - shard.row_start
                    local = local[(local >= 0) & (local < shard.weight.shape[0])]
                    if not local.numel():
                        continue
                    rows = local.to(shard.weight.device)
                    shard.weight[rows] = 0
                    for state in shard.states:
                        state[rows.to(state.device)] = 0
                    written += rows.numel()
        return written


def _table_key(weights: dict[str, Any], spec: SparseFeatureSpec) -> str:
    suffix = f"embedding_bags.{spec.table_name}.weight"
    matches = [key for key in weights if key.endswith(suffix)]
    if len(matches) != 1:
        raise KeyError(f"expected one embedding table for {spec.name!r}, found {matches}")
    return matches[0]


def _is_tensor_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or hasattr(value, "local_shards")


def _local_shards(weight: Any, states: list[Any]) -> list[_Shard]:
    """(view, row offset, column offset, optimizer-state views) of each shard this rank holds."""
    if not hasattr(weight, "local_shards"):  # replicated (data-parallel) table: the whole thing
        rows = weight.shape[0]
        return [_Shard(weight, 0, 0, [s for s in states if isinstance(s, torch.Tensor) and s.dim() >= 1 and s.shape[0] == rows])]
    shards = []
    for shard in weight.local_shards():
        row_start, col_start = shard.metadata.shard_offsets
        shard_states = []
        for state in states:
            for state_shard in state.local_shards() if hasattr(state, "local_shards") else []:
                if state_shard.metadata.shard_offsets[0] == row_start and state_shard.tensor.shape[0] == shard.tensor.shape[0]:
                    shard_states.append(state_shard.tensor)
        shards.append(_Shard(shard.tensor, int(row_start), int(col_start), shard_states))
    return shards


class TouchedRows:
    """Which rows of each table training read since the last `take()`: a bitmap per table.

    RowWiseAdagrad changes exactly the rows a step looks up (and the id map's re-initialisation
    only rows it admitted, which the same step then looks up), so these are the rows parameter sync
    must ship. A bitmap costs one scatter per feature per step (0.06 ms on the demo model, against
    0.1 ms for TorchRec's ModelDeltaTracker, which reports the same rows; see ../shared/NOTES.md).
    """

    def __init__(self, specs: list[SparseFeatureSpec], device: torch.device | str = "cpu") -> None:
        self.dirty = {spec.name: torch.zeros(spec.num_embeddings, dtype=torch.bool, device=device) for spec in specs}

    def add(self, rows: KeyedJaggedTensor) -> None:
        for feature, jagged in rows.to_dict().items():
            self.dirty[feature][jagged.values()] = True

    def mark(self, rows_by_feature: dict[str, torch.Tensor]) -> None:
        """Rows changed outside a training step (an erasure zeroed them): ship them too."""
        for feature, rows in rows_by_feature.items():
            self.dirty[feature][rows.to(self.dirty[feature].device)] = True

    def take(self) -> dict[str, torch.Tensor]:
        """The touched rows of each table (sorted), and forget them."""
        return {feature: bitmap.nonzero().flatten() for feature, bitmap in self.take_bitmaps().items()}

    def take_bitmaps(self) -> dict[str, torch.Tensor]:
        """The bitmaps themselves (to combine across ranks), and start new ones."""
        out = self.dirty
        self.dirty = {feature: torch.zeros_like(bitmap) for feature, bitmap in out.items()}
        return out
