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
from gpurec.embedding.cuckoo import EMPTY_KEY, SLOTS, bucket_pair, owner_of
from gpurec.embedding.partition import IdPartition


class IdLookup(nn.Module):
    """``forward(kjt of hashed ids) -> kjt of rows``, for features built with `from_partitions`."""

    def __init__(
        self,
        features: list[str],
        num_buckets: list[int],
        num_partitions: int,
        drop_unadmitted: list[bool],
        keys: torch.Tensor,
        slot_rows: torch.Tensor,
    ) -> None:
        super().__init__()
        self.features: list[str] = list(features)
        self.num_buckets: list[int] = list(num_buckets)
        self.num_partitions: int = num_partitions
        self.drop_unadmitted: list[bool] = list(drop_unadmitted)
        # Feature f's slots start at base[f]; within it, partition p's at p * num_buckets[f] * SLOTS.
        base: list[int] = []
        total = 0
        for buckets in self.num_buckets:
            base.append(total)
            total += num_partitions * buckets * SLOTS
        if keys.numel() != total or slot_rows.numel() != total:
            raise ValueError(f"IdLookup: expected {total} slots, got {keys.numel()} keys and {slot_rows.numel()} rows")
        self.base: list[int] = base
        self.slots: int = SLOTS
        self.empty_key: int = EMPTY_KEY
        self.default_row: int = DEFAULT_ROW
        self.register_buffer("keys", keys.to(torch.int64))
        self.register_buffer("slot_rows", slot_rows.to(torch.int64))

    @classmethod
    def from_partitions(cls, features: list[str], partitions: list[dict[str, IdPartition]]) -> IdLookup:
        """Build from every partition (``partitions[p][feature]``, p = 0..P-1) of every feature."""
        keys, rows, buckets, drop = [], [], [], []
        for feature in features:
            parts = [by_feature[feature] for by_feature in partitions]
            buckets.append(parts[0].table.num_buckets)
            drop.append(parts[0].policy.unadmitted == "zero")
            for part in parts:
                if part.table.num_buckets != buckets[-1]:
                    raise ValueError(f"partitions of {feature!r} differ in size")
                keys.append(part.table.keys)
                local = part.table.slot_rows.to(torch.int64)
                rows.append(torch.where(local >= 0, local + part.first_row, local))
        return cls(features, buckets, len(partitions), drop, torch.cat(keys), torch.cat(rows))

    def rows_of(self, feature_index: int, ids: torch.Tensor) -> torch.Tensor:
        """Global row of each id of one feature, -1 where the id has none."""
        ids = torch.where(ids == self.empty_key, torch.full_like(ids, self.empty_key + 1), ids)
        buckets = self.num_buckets[feature_index]
        first, second = bucket_pair(ids, buckets)
        start = self.base[feature_index] + owner_of(ids, self.num_partitions) * (buckets * self.slots)
        offsets = torch.arange(self.slots, device=ids.device)
        candidates = torch.cat(
            [(start + first * self.slots).unsqueeze(1) + offsets, (start + second * self.slots).unsqueeze(1) + offsets], dim=1
        )
        hit = self.keys[candidates] == ids.unsqueeze(1)
        rows = torch.where(hit, self.slot_rows[candidates], torch.full_like(candidates, -1))
        return rows.max(dim=1).values  # at most one hit; -1 when none

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        values = features.values()
        lengths = features.lengths()
        length_per_key = features.length_per_key()
        out_values: list[torch.Tensor] = []
        out_lengths: list[torch.Tensor] = []
        batch = features.stride()
        start = 0
        for position, key in enumerate(keys):
            if key not in self.features:
                raise ValueError("IdLookup: feature " + key + " has no id table")
            index = self.features.index(key)
            count = length_per_key[position]
            ids = values[start : start + count]
            key_lengths = lengths[position * batch : (position + 1) * batch]
            rows = self.rows_of(index, ids)
            missing = rows < 0
            if self.drop_unadmitted[index]:
                segment = torch.repeat_interleave(torch.arange(batch, device=ids.device), key_lengths.long(), output_size=count)
                dropped = torch.zeros(batch, dtype=key_lengths.dtype, device=ids.device)
                dropped.index_add_(0, segment[missing], torch.ones_like(segment[missing], dtype=key_lengths.dtype))
                out_values.append(rows[~missing])
                out_lengths.append(key_lengths - dropped)
            else:
                out_values.append(torch.where(missing, torch.full_like(rows, self.default_row), rows))
                out_lengths.append(key_lengths)
            start += count
        return KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.cat(out_values), lengths=torch.cat(out_lengths), weights=None, stride=batch
        )
