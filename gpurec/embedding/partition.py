"""One partition of every feature's id map: who has a row, who is still earning one, who is stale.

A partition owns, per feature, a contiguous block of that feature's table rows (all of them in a
single process; in row-wise training, exactly the block TorchRec places on the owning rank). It
keeps, for all features back to back in flat tensors so that a training step is a fixed number
of vectorised operations however many features there are:

- per feature a `CuckooTable` from id to row (views into one ``keys``/``slot_rows`` pair),
- per row: the id holding it, its occurrence count and last-seen event time,
- per feature a stack of free rows,
- one `CountMinSketch` (ids salted by feature) counting ids that have no row yet,
- per feature counters: occurrences, default-path occurrences, admissions, expirations,
  evictions of a full table; and forgotten ids, refused admissions;
- a `DenyFilter` of forgotten ids (a keyed Bloom filter: no id is stored in clear).

`assign` is one training step for the ids the partition owns: count them, expire stale ids,
admit ids whose count reached `admit_after` (evicting by LRU/LFU when no row is free), and
return every occurrence's row (-1: not admitted) plus the rows just handed out, whose embeddings
and optimizer state must be re-initialised before they are read.

`forget` is an erasure: the ids' rows are released (as expiry does), their sketch counts taken
back, and the ids deny-listed, so that `assign` keeps mapping them to no row (the default row)
however often they occur again. Only ids about to be admitted are checked against the list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpurec.data.hashing_core import feature_salt, to_signed
from gpurec.embedding.admission import CountMinSketch
from gpurec.embedding.config import EvictionPolicy, FeatureIdPolicy
from gpurec.embedding.cuckoo import EMPTY_KEY, SLOTS, CuckooTable, buckets_for_rows, probe
from gpurec.embedding.denylist import DenyFilter

NEVER = torch.iinfo(torch.int64).min
STAT_NAMES: tuple[str, ...] = ("occurrences", "unadmitted", "admitted", "expired", "evicted_full")
FORGET_STAT_NAMES: tuple[str, ...] = ("forgotten", "refused_forgotten")  # ids deny-listed; admissions refused


@dataclass(frozen=True)
class FeatureBlock:
    """Which rows of one feature's table a partition owns."""

    name: str
    policy: FeatureIdPolicy
    block_start: int  # global table row where the partition's block starts
    block_rows: int


@dataclass(frozen=True)
class Admitted:
    """Rows (global table rows) given to new ids in one step, and those ids."""

    rows: torch.Tensor
    ids: torch.Tensor


class IdPartition:
    def __init__(
        self,
        blocks: list[FeatureBlock],
        eviction: EvictionPolicy,
        sketch: tuple[int, int],
        device: torch.device | str = "cpu",
        backend: str = "torch",
        forget_filter_bits: int = 1 << 20,
    ) -> None:
        self.names = [b.name for b in blocks]
        self.policies = [b.policy for b in blocks]
        self.eviction = eviction
        self.backend = backend  # "torch" or "triton" (kernels.cuckoo): the tables' inserts and `lookup`
        device = torch.device(device)
        reserved = [b.policy.reserved_rows if b.block_start == 0 else 0 for b in blocks]
        self.capacity = [b.block_rows - r for b, r in zip(blocks, reserved, strict=True)]
        for block, capacity in zip(blocks, self.capacity, strict=True):
            if capacity <= 0:
                raise ValueError(f"{block.name}: a partition of {block.block_rows} rows has no room for ids")
        self.first_row = [b.block_start + r for b, r in zip(blocks, reserved, strict=True)]  # global row of local row 0
        # Sized from the block, not the capacity, so every partition of a table has the same shape.
        self.num_buckets = [buckets_for_rows(b.block_rows) for b in blocks]
        self.slot_base = _offsets([n * SLOTS for n in self.num_buckets])
        self.row_base = _offsets(self.capacity)
        slots, rows = sum(n * SLOTS for n in self.num_buckets), sum(self.capacity)

        self.keys = torch.full((slots,), EMPTY_KEY, dtype=torch.int64, device=device)
        self.slot_rows = torch.full((slots,), -1, dtype=torch.int32, device=device)
        self.tables = [
            CuckooTable(n, backend=backend, storage=(self.keys[base : base + n * SLOTS], self.slot_rows[base : base + n * SLOTS]))
            for n, base in zip(self.num_buckets, self.slot_base, strict=True)
        ]
        self.row_keys = torch.full((rows,), EMPTY_KEY, dtype=torch.int64, device=device)
        self.row_counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self.row_last_seen = torch.full((rows,), NEVER, dtype=torch.int64, device=device)
        # Feature f's free stack is free_rows[row_base[f] : row_base[f] + num_free[f]] (local rows).
        self.free_rows = torch.cat([torch.arange(c - 1, -1, -1, dtype=torch.int64) for c in self.capacity]).to(device)
        self.num_free = torch.tensor(self.capacity, dtype=torch.int64)
        # One sketch for every feature that counts (admit_after > 1), ids salted by feature, as
        # wide as one sketch per feature would be.
        counting = max(1, sum(b.policy.admit_after > 1 for b in blocks))
        self.sketch = CountMinSketch(sketch[0] * counting, sketch[1], device=device)
        self.sketch_added = torch.zeros((), dtype=torch.int64)  # occurrences counted since the last halving
        self.stats = torch.zeros(len(blocks), len(STAT_NAMES), dtype=torch.int64)
        self.deny = DenyFilter(forget_filter_bits)
        self.forget_stats = torch.zeros(len(blocks), len(FORGET_STAT_NAMES), dtype=torch.int64)

        # Per-feature constants as tensors, gathered per id in the vectorised step.
        def per_feature(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        self._slot_base = per_feature(self.slot_base)
        self._num_buckets = per_feature(self.num_buckets)
        self._row_base = per_feature(self.row_base)
        self._first_row = per_feature(self.first_row)
        self._admit_after = per_feature([p.admit_after for p in self.policies])
        self._salt = per_feature([to_signed(feature_salt(name)) for name in self.names])
        never = torch.iinfo(torch.int64).max // 4  # "no expiry": a horizon no clock reaches
        horizons = per_feature([p.expire_after_ms or never for p in self.policies])
        self._row_horizon = torch.repeat_interleave(horizons, per_feature(self.capacity))
        self._expires = any(p.expire_after_ms > 0 for p in self.policies)

    # --- state --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "keys": self.keys,
            "slot_rows": self.slot_rows,
            "row_keys": self.row_keys,
            "row_counts": self.row_counts,
            "row_last_seen": self.row_last_seen,
            "free_rows": self.free_rows,
            "num_free": self.num_free,
            "sketch": self.sketch.counters,
            "sketch_added": self.sketch_added,
            "stats": self.stats,
            "forget_stats": self.forget_stats,
            **self.deny.state_tensors(),
        }

    def loaded(self) -> None:
        """Call after `state_tensors()` were overwritten (a checkpoint was loaded)."""
        self.deny.refresh()

    def feature_index(self, name: str) -> int:
        return self.names.index(name)

    def size(self, feature: int) -> int:
        """Rows of ``feature`` held by ids."""
        return self.capacity[feature] - int(self.num_free[feature])

    def lookup(self, feature: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Local row (within its feature's block) of each (feature, id), -1 where it has none."""
        if self.backend == "triton":
            from kernels.cuckoo import cuckoo_lookup_segmented

            return cuckoo_lookup_segmented(self.keys, self.slot_rows, feature, ids, self._slot_base, self._num_buckets)
        slot = probe(self.keys, ids, self._slot_base[feature], self._num_buckets[feature])
        rows = self.slot_rows[slot.clamp(min=0)].to(torch.int64)
        return torch.where(slot >= 0, rows, torch.full_like(rows, -1))

    # --- the training step --------------------------------------------------------------------

    def assign(self, feature: torch.Tensor, ids: torch.Tensor, times: torch.Tensor, clock_ms: int) -> tuple[torch.Tensor, dict[str, Admitted]]:
        """Global rows (-1 = not admitted) of every occurrence (``feature[i]``, ``ids[i]``), seen at
        ``times[i]``; and per feature, this step's admissions."""
        unique_feature, unique_ids, inverse, counts = _unique_pairs(feature, ids)
        last = torch.full_like(unique_ids, NEVER).scatter_reduce_(0, inverse, times, reduce="amax")
        local = self.lookup(unique_feature, unique_ids)
        present = local >= 0
        flat = self._row_base[unique_feature[present]] + local[present]
        self.row_counts[flat] += counts[present]
        self.row_last_seen[flat] = torch.maximum(self.row_last_seen[flat], last[present])
        touched = torch.zeros_like(self.row_keys, dtype=torch.bool)
        touched[flat] = True

        self.expire(clock_ms, protect=touched)
        absent = (~present).nonzero().squeeze(1)
        admitted, displaced = self._admit(unique_feature[absent], unique_ids[absent], counts[absent], last[absent], touched)
        if displaced:  # rare: an insert left a resident without a slot, so it lost its row
            local = self.lookup(unique_feature, unique_ids)
        elif admitted:
            local[absent] = self.lookup(unique_feature[absent], unique_ids[absent])

        occurrence_feature, occurrence_local = feature, local[inverse]
        missing = occurrence_local < 0
        num_features = len(self.names)
        self.stats[:, 0] += torch.bincount(occurrence_feature, minlength=num_features).cpu()
        self.stats[:, 1] += torch.bincount(occurrence_feature[missing], minlength=num_features).cpu()
        rows = torch.where(missing, occurrence_local, occurrence_local + self._first_row[occurrence_feature])
        return rows, admitted

    def _admit(
        self, feature: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor, last: torch.Tensor, touched: torch.Tensor
    ) -> tuple[dict[str, Admitted], bool]:
        """Give rows to the ids whose count reached their feature's threshold; say whether any
        resident id was displaced out of its table on the way."""
        if ids.numel() == 0:
            return {}, False
        threshold = self._admit_after[feature]
        estimate = counts.clone()
        counted = threshold > 1  # admit_after = 1 admits at first sight: no need to count
        if bool(counted.any()):
            estimate[counted] = self.sketch.add(ids[counted] ^ self._salt[feature[counted]], counts[counted])
            self._age_sketch(int(counts[counted].sum()))
        earned = estimate >= threshold
        if not self.deny.empty and bool(earned.any()):
            self._refuse_forgotten(feature, ids, earned)
        admitted: dict[str, Admitted] = {}
        displaced = False
        for f in torch.unique(feature[earned]).tolist():
            mine = earned & (feature == f)
            new, lost = self._admit_feature(f, ids[mine], estimate[mine], last[mine], touched)
            displaced |= lost
            if new.rows.numel():
                admitted[self.names[f]] = new
        return admitted, displaced

    def _refuse_forgotten(self, feature: torch.Tensor, ids: torch.Tensor, earned: torch.Tensor) -> None:
        """Clear ``earned`` for forgotten ids (and take their new counts back from the sketch)."""
        for f in torch.unique(feature[earned]).tolist():
            candidates = (earned & (feature == f)).nonzero().squeeze(1)
            refused = candidates[self.deny.contains(self.names[f], ids[candidates].cpu()).to(candidates.device)]
            if refused.numel():
                earned[refused] = False
                self.forget_stats[f, 1] += refused.numel()
                if self.policies[f].admit_after > 1:
                    self.sketch.forget(ids[refused] ^ self._salt[f])

    def forget(self, feature: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Erase ids (``feature[i]``, ``ids[i]``): release their rows, take back their sketch counts
        and deny-list them. Returns per feature the global rows released (whose embedding and
        optimizer state the caller must reset). Idempotent."""
        released: dict[str, torch.Tensor] = {}
        if ids.numel() == 0:
            return released
        unique_feature, unique_ids, _, _ = _unique_pairs(feature, ids)
        local = self.lookup(unique_feature, unique_ids)
        for f in torch.unique(unique_feature).tolist():
            mine = unique_feature == f
            rows = local[mine & (local >= 0)]
            if rows.numel():
                self._evict_rows(f, rows)
                released[self.names[f]] = rows + self.first_row[f]
            self.forget_stats[f, 0] += self.deny.add(self.names[f], unique_ids[mine].cpu())
            if self.policies[f].admit_after > 1:
                self.sketch.forget(unique_ids[mine] ^ self._salt[f])
        return released

    def _age_sketch(self, added: int) -> None:
        """Halve every counter each time as many occurrences as the sketch has counters were added.

        Without aging, a sketch fed an endless stream of new ids saturates and lets every id in at
        first sight; with it, "seen admit_after times" means recently (an exponentially decayed
        count, the window about one sketch width of occurrences long).
        """
        self.sketch_added += added
        if int(self.sketch_added) >= self.sketch.width:
            self.sketch.counters.bitwise_right_shift_(1)
            self.sketch_added.zero_()

    def _admit_feature(
        self, f: int, ids: torch.Tensor, estimate: torch.Tensor, last: torch.Tensor, touched: torch.Tensor
    ) -> tuple[Admitted, bool]:
        shortfall = ids.numel() - int(self.num_free[f])
        if shortfall > 0:
            self._evict_by_policy(f, shortfall, protect=touched)
        room = int(self.num_free[f])
        if room < ids.numel():
            # Still short (every row was used by this very batch): the most frequent ids go first.
            order = torch.sort(estimate, descending=True, stable=True).indices[:room]
            ids, estimate, last = ids[order], estimate[order], last[order]
        rows = self._pop_rows(f, ids.numel())
        flat = self.row_base[f] + rows
        self.row_keys[flat] = ids
        self.row_counts[flat] = estimate
        self.row_last_seen[flat] = last
        homeless_ids, homeless_rows = self.tables[f].insert(ids, rows)
        kept = torch.ones_like(ids, dtype=torch.bool)
        residents_lost = 0
        if homeless_ids.numel():
            was_new = torch.isin(homeless_ids, ids)
            self._release(f, homeless_rows)
            residents_lost = int((~was_new).sum())
            self.stats[f, 4] += residents_lost
            kept = ~torch.isin(ids, homeless_ids)
        self.stats[f, 2] += int(kept.sum())
        return Admitted(rows=rows[kept] + self.first_row[f], ids=ids[kept]), residents_lost > 0

    def expire(self, clock_ms: int, protect: torch.Tensor | None = None) -> int:
        """Evict every id last seen more than its feature's expiry before ``clock_ms``."""
        if not self._expires:
            return 0
        stale = (self.row_keys != EMPTY_KEY) & (self.row_last_seen < clock_ms - self._row_horizon)
        if protect is not None:
            stale &= ~protect
        flat = stale.nonzero().squeeze(1)
        if flat.numel() == 0:
            return 0
        feature = torch.bucketize(flat, self._row_base, right=True) - 1
        for f in torch.unique(feature).tolist():
            rows = flat[feature == f] - self.row_base[f]
            self._evict_rows(f, rows)
            self.stats[f, 3] += rows.numel()
        return flat.numel()

    def _evict_by_policy(self, f: int, count: int, protect: torch.Tensor) -> None:
        """Free ``count`` rows of feature f: least recently (lru) or least often (lfu) seen first."""
        start, end = self.row_base[f], self.row_base[f] + self.capacity[f]
        candidates = ((self.row_keys[start:end] != EMPTY_KEY) & ~protect[start:end]).nonzero().squeeze(1)
        score = (self.row_last_seen if self.eviction == "lru" else self.row_counts)[start:end]
        victims = candidates[torch.sort(score[candidates], stable=True).indices[:count]]
        if victims.numel():
            self._evict_rows(f, victims)
            self.stats[f, 4] += victims.numel()

    def _evict_rows(self, f: int, rows: torch.Tensor) -> None:
        self.tables[f].remove(self.row_keys[self.row_base[f] + rows])
        self._release(f, rows)

    def _release(self, f: int, rows: torch.Tensor) -> None:
        """Clear the rows' metadata and push them on the free stack (their embeddings are reset on reuse)."""
        flat = self.row_base[f] + rows
        self.row_keys[flat] = EMPTY_KEY
        self.row_counts[flat] = 0
        self.row_last_seen[flat] = NEVER
        top = self.row_base[f] + int(self.num_free[f])
        self.free_rows[top : top + rows.numel()] = rows
        self.num_free[f] += rows.numel()

    def _pop_rows(self, f: int, count: int) -> torch.Tensor:
        top = self.row_base[f] + int(self.num_free[f])
        rows = self.free_rows[top - count : top].flip(0).clone()
        self.num_free[f] -= count
        return rows


def _unique_pairs(feature: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct (feature, id) pairs, the pair index of every input, and each pair's count."""
    if ids.numel() == 0:
        empty = ids.new_empty(0)
        return empty, empty, empty, empty
    by_id = torch.sort(ids, stable=True).indices
    order = by_id[torch.sort(feature[by_id], stable=True).indices]  # lexicographic (feature, id)
    sorted_feature, sorted_ids = feature[order], ids[order]
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[1:] = (sorted_feature[1:] != sorted_feature[:-1]) | (sorted_ids[1:] != sorted_ids[:-1])
    group = torch.cumsum(starts, dim=0) - 1
    inverse = torch.empty_like(group)
    inverse[order] = group
    return sorted_feature[starts], sorted_ids[starts], inverse, torch.bincount(group)


def _offsets(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out
