"""One feature's ids in one partition: who has a row, who is still earning one, who goes stale.

A partition owns a contiguous block of its table's rows (all of them in a single process; in
row-wise training, exactly the block TorchRec places on the owning rank). It keeps:

- a `CuckooTable` from id to row (collision-free: one id, one row),
- per row: the id holding it, its occurrence count and last-seen event time,
- a stack of free rows,
- a `CountMinSketch` of occurrences of ids that have no row yet,
- counters: admissions, expirations, evictions of a full table, default-path occurrences.

`assign` is one training step's update for the ids the partition owns: count them, expire stale
ids, admit ids whose count reached `admit_after` (evicting by LRU/LFU when no row is free), and
return every occurrence's row (-1: not admitted). Which rows were just handed out is returned
too, because their embeddings and optimizer state must be re-initialised before they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpurec.embedding.admission import CountMinSketch
from gpurec.embedding.config import EvictionPolicy, FeatureIdPolicy
from gpurec.embedding.cuckoo import EMPTY_KEY, CuckooTable, buckets_for_rows

NEVER = torch.iinfo(torch.int64).min
STAT_NAMES: tuple[str, ...] = ("occurrences", "unadmitted", "admitted", "expired", "evicted_full")


@dataclass(frozen=True)
class Admitted:
    """Rows (global table rows) given to new ids in one step, and those ids."""

    rows: torch.Tensor
    ids: torch.Tensor


class IdPartition:
    def __init__(
        self,
        policy: FeatureIdPolicy,
        eviction: EvictionPolicy,
        block_start: int,
        block_rows: int,
        sketch: tuple[int, int],
        device: torch.device | str = "cpu",
        backend: str = "torch",
    ) -> None:
        self.policy, self.eviction = policy, eviction
        reserved = policy.reserved_rows if block_start == 0 else 0
        self.first_row = block_start + reserved  # global table row of local row 0
        self.capacity = block_rows - reserved
        if self.capacity <= 0:
            raise ValueError(f"a partition of {block_rows} rows has no room for ids (reserved {reserved})")
        # Sized from the block, not the capacity, so every partition of a table has the same shape.
        self.table = CuckooTable(buckets_for_rows(block_rows), device=device, backend=backend)
        self.row_keys = torch.full((self.capacity,), EMPTY_KEY, dtype=torch.int64, device=device)
        self.row_counts = torch.zeros(self.capacity, dtype=torch.int64, device=device)
        self.row_last_seen = torch.full((self.capacity,), NEVER, dtype=torch.int64, device=device)
        self.free_rows = torch.arange(self.capacity - 1, -1, -1, dtype=torch.int64, device=device)
        self.num_free = torch.tensor(self.capacity, dtype=torch.int64)
        self.sketch = CountMinSketch(sketch[0], sketch[1], device=device)
        self.stats = torch.zeros(len(STAT_NAMES), dtype=torch.int64)

    # --- state --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.table.keys,
            "slot_rows": self.table.slot_rows,
            "row_keys": self.row_keys,
            "row_counts": self.row_counts,
            "row_last_seen": self.row_last_seen,
            "free_rows": self.free_rows,
            "num_free": self.num_free,
            "sketch": self.sketch.counters,
            "stats": self.stats,
        }

    def size(self) -> int:
        return self.capacity - int(self.num_free)

    def _count(self, name: str, amount: int) -> None:
        self.stats[STAT_NAMES.index(name)] += amount

    # --- the training step --------------------------------------------------------------------

    def assign(self, ids: torch.Tensor, times: torch.Tensor, clock_ms: int) -> tuple[torch.Tensor, Admitted]:
        """Rows (global; -1 = not admitted) for every occurrence in ``ids``, and this step's admissions."""
        unique, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        last = torch.full_like(unique, NEVER).scatter_reduce_(0, inverse, times, reduce="amax")
        rows = self.table.lookup(unique)
        present = rows >= 0
        seen = rows[present]
        self.row_counts[seen] += counts[present]
        self.row_last_seen[seen] = torch.maximum(self.row_last_seen[seen], last[present])
        touched = torch.zeros(self.capacity, dtype=torch.bool, device=ids.device)
        touched[seen] = True

        self.expire(clock_ms, protect=touched)
        admitted = self._admit(unique[~present], counts[~present], last[~present], touched)
        if admitted.numel():
            rows = self.table.lookup(unique)  # admissions may have displaced (and dropped) residents
        occurrence_rows = rows[inverse]
        missing = occurrence_rows < 0
        self._count("occurrences", ids.numel())
        self._count("unadmitted", int(missing.sum()))
        global_rows = torch.where(missing, occurrence_rows, occurrence_rows + self.first_row)
        new_rows = self.table.lookup(admitted)  # -1 for any new id that ended homeless
        kept = new_rows >= 0
        return global_rows, Admitted(rows=new_rows[kept] + self.first_row, ids=admitted[kept])

    def _admit(self, ids: torch.Tensor, counts: torch.Tensor, last: torch.Tensor, touched: torch.Tensor) -> torch.Tensor:
        """Give rows to the ids whose count reached the threshold; return the ids admitted."""
        if ids.numel() == 0:
            return ids
        # admit_after = 1 admits at first sight: no need to count in the sketch.
        estimate = counts if self.policy.admit_after <= 1 else self.sketch.add(ids, counts)
        earned = estimate >= self.policy.admit_after
        ids, estimate, last = ids[earned], estimate[earned], last[earned]
        if ids.numel() == 0:
            return ids
        shortfall = ids.numel() - int(self.num_free)
        if shortfall > 0:
            self._evict_by_policy(shortfall, protect=touched)
        room = int(self.num_free)
        if room < ids.numel():
            # Still short (every row was used by this very batch): the most frequent ids go first.
            order = torch.sort(estimate, descending=True, stable=True).indices[:room]
            ids, estimate, last = ids[order], estimate[order], last[order]
        rows = self._pop_rows(ids.numel())
        self.row_keys[rows] = ids
        self.row_counts[rows] = estimate
        self.row_last_seen[rows] = last
        homeless_ids, homeless_rows = self.table.insert(ids, rows)
        if homeless_ids.numel():
            was_new = torch.isin(homeless_ids, ids)
            self._release(homeless_rows)
            self._count("evicted_full", int((~was_new).sum()))
        self._count("admitted", ids.numel() - int(torch.isin(ids, homeless_ids).sum()))
        return ids

    def expire(self, clock_ms: int, protect: torch.Tensor | None = None) -> int:
        """Evict ids last seen more than the feature's expiry before ``clock_ms``; return how many."""
        horizon = self.policy.expire_after_ms
        if horizon <= 0:
            return 0
        stale = (self.row_keys != EMPTY_KEY) & (self.row_last_seen < clock_ms - horizon)
        if protect is not None:
            stale &= ~protect
        rows = stale.nonzero().squeeze(1)
        if rows.numel():
            self._evict_rows(rows)
            self._count("expired", rows.numel())
        return rows.numel()

    def _evict_by_policy(self, count: int, protect: torch.Tensor) -> None:
        """Free ``count`` rows: least recently seen (lru) or least often seen (lfu) first."""
        candidates = ((self.row_keys != EMPTY_KEY) & ~protect).nonzero().squeeze(1)
        score = self.row_last_seen if self.eviction == "lru" else self.row_counts
        order = torch.sort(score[candidates], stable=True).indices[:count]
        victims = candidates[order]
        if victims.numel():
            self._evict_rows(victims)
            self._count("evicted_full", victims.numel())

    def _evict_rows(self, rows: torch.Tensor) -> None:
        self.table.remove(self.row_keys[rows])
        self._release(rows)

    def _release(self, rows: torch.Tensor) -> None:
        """Clear the rows' metadata and push them on the free stack (their embeddings are reset on reuse)."""
        self.row_keys[rows] = EMPTY_KEY
        self.row_counts[rows] = 0
        self.row_last_seen[rows] = NEVER
        start = int(self.num_free)
        self.free_rows[start : start + rows.numel()] = rows
        self.num_free += rows.numel()

    def _pop_rows(self, count: int) -> torch.Tensor:
        end = int(self.num_free)
        rows = self.free_rows[end - count : end].flip(0).clone()
        self.num_free -= count
        return rows
