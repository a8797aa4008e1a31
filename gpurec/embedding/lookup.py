"""Read-only id -> row lookup of collisionless tables: evaluation and the served artifact.

`IdLookup` holds every partition of every feature's cuckoo map in two flat buffers and maps a
KeyedJaggedTensor of hashed ids to rows exactly as training did, without counting, admitting or
expiring anything: an id with a row reads it, any other id (unknown, not yet admitted, expired)
takes the same path as in training, the shared default row or nothing. It keeps `ModuloRemap`'s
interface (``forward(kjt) -> kjt``), scripts with TorchScript, and its buffers can be rewritten
in place, which is how a running server will take id-table deltas.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.config import DEFAULT_ROW
from gpurec.embedding.cuckoo import EMPTY_KEY, SLOTS, fold_empty, owner_of, probe
from gpurec.embedding.partition import IdPartition


def value_tables(lengths: torch.Tensor, stride: int, table_of_key: torch.Tensor, num_values: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each value of a key-major KJT: the bag it belongs to and its id table's index."""
    bags = torch.arange(lengths.numel(), device=lengths.device)
    segment = torch.repeat_interleave(bags, lengths.long(), output_size=num_values)
    return segment, table_of_key[torch.div(segment, stride, rounding_mode="floor")]


def drop_from_bags(
    rows: torch.Tensor, lengths: torch.Tensor, segment: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove the values marked ``drop`` from their bags: a bag of only dropped ids pools to the
    zero vector (`unadmitted = "zero"`)."""
    lengths = lengths - torch.bincount(segment[drop], minlength=lengths.numel()).to(lengths.dtype)
    return rows[~drop], lengths


class IdLookup(nn.Module):
    """``forward(kjt of hashed ids) -> kjt of rows``, built from every partition with `from_partitions`.

    Layout: ``keys``/``slot_rows`` hold P partitions back to back, each holding its F feature
    tables back to back (all partitions have the same shape); ``slot_base[p * F + f]`` is where
    partition p's table of feature f starts, and ``slot_rows`` already holds global table rows.
    """

    def __init__(
        self,
        features: list[str],
        num_buckets: list[int],
        slot_base: list[int],
        drop_unadmitted: list[bool],
        keys: torch.Tensor,
        slot_rows: torch.Tensor,
    ) -> None:
        super().__init__()
        self.features: list[str] = list(features)
        self.num_partitions: int = len(slot_base) // len(features)
        if len(slot_base) != self.num_partitions * len(features) or len(num_buckets) != len(features):
            raise ValueError("IdLookup: slot_base needs one entry per (partition, feature), num_buckets one per feature")
        if keys.numel() != slot_rows.numel():
            raise ValueError(f"IdLookup: {keys.numel()} keys but {slot_rows.numel()} slot rows")
        self.register_buffer("keys", keys.to(torch.int64))
        self.register_buffer("slot_rows", slot_rows.to(torch.int64))
        self.register_buffer("num_buckets", torch.tensor(num_buckets, dtype=torch.int64))
        self.register_buffer("slot_base", torch.tensor(slot_base, dtype=torch.int64))
        self.register_buffer("drop_unadmitted", torch.tensor(drop_unadmitted, dtype=torch.bool))
        self.any_drop: bool = any(drop_unadmitted)
        self.default_row: int = DEFAULT_ROW

    @classmethod
    def from_partitions(cls, partitions: list[IdPartition]) -> IdLookup:
        """Build from every partition (p = 0..P-1) of a training run's id maps."""
        first = partitions[0]
        keys, rows, slot_base = [], [], []
        for part in partitions:
            if part.names != first.names or part.num_buckets != first.num_buckets:
                raise ValueError("partitions of one id map must hold the same features and table sizes")
            offset = sum(k.numel() for k in keys)
            local = part.slot_rows.to(torch.int64)
            first_row = torch.repeat_interleave(
                torch.tensor(part.first_row, dtype=torch.int64), torch.tensor([n * SLOTS for n in part.num_buckets])
            )
            keys.append(part.keys)
            rows.append(torch.where(local >= 0, local + first_row, local))
            slot_base.extend(offset + base for base in part.slot_base)
        drop = [policy.unadmitted == "zero" for policy in first.policies]
        return cls(first.names, first.num_buckets, slot_base, drop, torch.cat(keys), torch.cat(rows))

    @torch.jit.unused
    def stored_ids(self, feature: str) -> torch.Tensor:
        """Every id of ``feature`` that has a row."""
        f = self.features.index(feature)
        found = [self._table_keys(p * len(self.features) + f, f) for p in range(self.num_partitions)]
        keys = torch.cat(found)
        return keys[keys != EMPTY_KEY]

    @torch.jit.unused
    def feature_rows(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id of one feature, -1 for ids without a row of their own."""
        index = torch.full_like(ids, self.features.index(feature))
        return self.rows_of(index, ids)

    @torch.jit.unused
    def _table_keys(self, base_index: int, feature: int) -> torch.Tensor:
        start = int(self.slot_base[base_index])
        return self.keys[start : start + int(self.num_buckets[feature]) * SLOTS]

    def rows_of(self, feature: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Global row of each (feature index, id), -1 where the id has none."""
        ids = fold_empty(ids)
        if self.num_partitions == 1:
            base = self.slot_base[feature]
        else:
            base = self.slot_base[owner_of(ids, self.num_partitions) * len(self.features) + feature]
        slot = probe(self.keys, ids, base, self.num_buckets[feature])
        rows = self.slot_rows[slot.clamp(min=0)]
        return torch.where(slot >= 0, rows, torch.full_like(rows, -1))

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        table_of_key: list[int] = []
        for key in keys:
            if key not in self.features:
                raise ValueError("IdLookup: feature " + key + " has no id table")
            table_of_key.append(self.features.index(key))
        values = features.values()
        lengths = features.lengths()
        batch = features.stride()
        tables = torch.tensor(table_of_key, dtype=torch.int64, device=values.device)
        segment, feature = value_tables(lengths, batch, tables, values.numel())
        rows = self.rows_of(feature, values)
        if self.any_drop:
            rows, lengths = drop_from_bags(rows, lengths, segment, (rows < 0) & self.drop_unadmitted[feature])
        rows = torch.where(rows < 0, torch.full_like(rows, self.default_row), rows)
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=rows, lengths=lengths, weights=None, stride=batch)
