"""A bucketed cuckoo hash from 64-bit ids to embedding rows, kept in torch tensors.

This is the id -> row map behind a collisionless embedding table: every stored id has its own
row, so two distinct ids never share an embedding. It is also the pure-torch reference of the GPU
kernels in `kernels/cuckoo.py` (the layout, hash and probe below come from `kernels/cuckoo_layout.py`,
which both use), and the path the CPU runs.

Layout (one table = one partition of one feature's id space):

    keys      int64 [num_buckets * SLOTS]   slot -> id, EMPTY_KEY when free
    slot_rows int32 [num_buckets * SLOTS]   slot -> row, -1 when free

Bucket ``b`` is slots ``[b * SLOTS, (b + 1) * SLOTS)``: 8 ids = 64 bytes, one CPU cache line
(half a GPU one), so a probe reads one line per bucket. Each id may live in one of two buckets,
``bucket_hash(id, SEED_1)`` or ``bucket_hash(id, SEED_2)``; a lookup reads both. Inserting into
two full buckets moves a resident id to its other bucket (a displacement chain), which is what lets
a 2-choice, 8-slot table fill beyond 95% before an insert fails. Rows are values, not positions:
displacing an id moves its (id, row) pair, never its embedding, so rows and their optimizer state
stay put for as long as the id is stored.

The hash is murmur3's 64-bit finaliser with logical shifts written as arithmetic shift + mask and
wrapping int64 multiplies, because those mean the same thing in torch, numpy (the Triton
interpreter) and Triton's compiled code.
"""

from __future__ import annotations

import math

import torch

from kernels.cuckoo_layout import (  # noqa: F401  (re-exported: the table's format)
    DEFAULT_MAX_ROUNDS,
    EMPTY_KEY,
    LOW_31,
    MIX_1,
    MIX_2,
    NON_NEGATIVE,
    SEED_1,
    SEED_2,
    SLOTS,
    bucket_pair,
    mix64,
    probe,
)

OWNER_SEED = 0x3C6EF372FE94F82B  # picks the partition (rank) that owns an id; independent of buckets


def owner_of(ids: torch.Tensor, num_partitions: int, seed: int = OWNER_SEED) -> torch.Tensor:
    """Which partition (= rank in row-wise training) owns each id."""
    return mix64(ids, seed) % num_partitions


def fold_empty(ids: torch.Tensor, empty_key: int = EMPTY_KEY) -> torch.Tensor:
    """Map the one reserved id (EMPTY_KEY) onto its neighbour so every id can be stored."""
    return torch.where(ids == empty_key, torch.full_like(ids, empty_key + 1), ids)


def buckets_for_rows(rows: int, target_load: float = 0.95) -> int:
    """Buckets needed so that ``rows`` ids fill the table to at most ``target_load``."""
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    return max(1, math.ceil(rows / (SLOTS * target_load)))


class CuckooTable:
    """One partition's id -> row map: batched ``lookup``, ``insert`` and ``remove`` over tensors.

    Ids handed to ``insert`` must be distinct, not yet stored and not EMPTY_KEY (the collisionless
    layer above guarantees it; ``fold_empty`` maps EMPTY_KEY away). Nothing here allocates rows: the caller
    chooses which row each new id gets, so the GPU kernel and this reference produce the same
    id -> row mapping even though they may place ids in different slots.
    """

    def __init__(
        self,
        num_buckets: int,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        storage: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """A new empty table, or one over ``storage``: (keys, slot_rows) views into larger
        tensors that hold several tables back to back (what `IdPartition` does)."""
        if num_buckets <= 0:
            raise ValueError(f"num_buckets must be positive, got {num_buckets}")
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        self.num_buckets = num_buckets
        self.backend = backend
        if storage is None:
            storage = (
                torch.full((num_buckets * SLOTS,), EMPTY_KEY, dtype=torch.int64, device=device),
                torch.full((num_buckets * SLOTS,), -1, dtype=torch.int32, device=device),
            )
        self.keys, self.slot_rows = storage
        if self.keys.numel() != num_buckets * SLOTS or self.slot_rows.numel() != num_buckets * SLOTS:
            raise ValueError(f"a table of {num_buckets} buckets needs {num_buckets * SLOTS} slots")

    @property
    def num_slots(self) -> int:
        return self.keys.numel()

    def size(self) -> int:
        return int((self.keys != EMPTY_KEY).sum())

    def load_factor(self) -> float:
        return self.size() / self.num_slots

    # --- lookup -------------------------------------------------------------------------------

    def find_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot holding each id, -1 where absent."""
        return probe(self.keys, ids, 0, self.num_buckets)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id (int64), -1 where the id is not stored."""
        if self.backend == "triton":
            from kernels.cuckoo import cuckoo_lookup

            return cuckoo_lookup(self, ids)
        slot = self.find_slots(ids)
        rows = self.slot_rows[slot.clamp(min=0)].to(torch.int64)
        return torch.where(slot >= 0, rows, torch.full_like(rows, -1))

    # --- insert -------------------------------------------------------------------------------

    def insert(self, ids: torch.Tensor, rows: torch.Tensor, max_rounds: int = DEFAULT_MAX_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
        """Store distinct new ``ids`` with their ``rows``; return the (ids, rows) left homeless.

        Homeless pairs are what a full table could not place after ``max_rounds`` displacement
        rounds. They may include ids that were stored before the call and got displaced: the
        caller must treat every returned id as no longer stored (and free its row).
        """
        if ids.numel() != rows.numel():
            raise ValueError(f"insert: {ids.numel()} ids but {rows.numel()} rows")
        if ids.numel() == 0:
            return ids, rows.to(torch.int64)
        if bool((ids == EMPTY_KEY).any()):
            raise ValueError("insert: EMPTY_KEY marks free slots and cannot be stored (fold it with fold_empty)")
        if self.backend == "triton":
            from kernels.cuckoo import cuckoo_insert

            return cuckoo_insert(self, ids, rows, max_rounds)
        return self._insert_rounds(ids.to(torch.int64), rows.to(torch.int32), max_rounds)

    def _insert_rounds(self, ids: torch.Tensor, rows: torch.Tensor, max_rounds: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Vectorised insertion in rounds, each one placing as many pending ids as it can.

        Per round, every pending id aims at the emptier of its buckets (for an id just displaced:
        the bucket it was not displaced from). Ids aiming at a bucket with free slots take them in
        order; ids aiming at a full bucket elect one per bucket to displace a resident, which
        becomes pending with its other bucket as target. Deterministic: same input, same table.
        """
        avoid = torch.full_like(ids, -1)  # bucket an id was just displaced from
        for round_index in range(max_rounds):
            if ids.numel() == 0:
                break
            first, second = bucket_pair(ids, self.num_buckets)
            free = (self.keys.view(self.num_buckets, SLOTS) == EMPTY_KEY).sum(dim=1)
            free_first, free_second = free[first], free[second]
            prefer_second = (free_second > free_first) | (avoid == first)
            prefer_second &= avoid != second
            target = torch.where(prefer_second, second, first)
            # Full both ways: walk the chain through alternating buckets, varied per id and round.
            both_full = (free_first == 0) & (free_second == 0) & (avoid < 0)
            flip = (mix64(ids, round_index) & 1).bool()
            target = torch.where(both_full & flip, second, target)

            rank = _rank_within_groups(target)
            free_target = free[target]
            placed = rank < free_target
            displace = (free_target == 0) & (rank == 0)

            # Placement: the rank-th free slot of the target bucket.
            empty = self.keys.view(self.num_buckets, SLOTS)[target[placed]] == EMPTY_KEY
            nth_empty = (empty.cumsum(dim=1) == (rank[placed] + 1)[:, None]) & empty
            slot = target[placed] * SLOTS + nth_empty.to(torch.int8).argmax(dim=1)
            self.keys[slot] = ids[placed]
            self.slot_rows[slot] = rows[placed]

            # Displacement: swap into a pseudo-random slot; the resident moves on.
            victim_slot = target[displace] * SLOTS + (mix64(ids[displace], round_index + 7) % SLOTS)
            victim_ids, victim_rows = self.keys[victim_slot].clone(), self.slot_rows[victim_slot].clone()
            self.keys[victim_slot] = ids[displace]
            self.slot_rows[victim_slot] = rows[displace]

            waiting = ~placed & ~displace
            ids = torch.cat([ids[waiting], victim_ids])
            rows = torch.cat([rows[waiting], victim_rows])
            avoid = torch.cat([avoid[waiting], target[displace]])
        return ids, rows.to(torch.int64)

    # --- remove -------------------------------------------------------------------------------

    def remove(self, ids: torch.Tensor) -> torch.Tensor:
        """Delete ``ids``; return their rows (-1 for ids that were not stored)."""
        slot = self.find_slots(ids)
        present = slot >= 0
        rows = torch.full_like(ids, -1)
        rows[present] = self.slot_rows[slot[present]].to(torch.int64)
        self.keys[slot[present]] = EMPTY_KEY
        self.slot_rows[slot[present]] = -1
        return rows


def _rank_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements (in input order) share its group value."""
    order = torch.sort(groups, stable=True).indices
    sorted_groups = groups[order]
    position = torch.arange(groups.numel(), device=groups.device)
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    group_start = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = torch.empty_like(position)
    rank[order] = position - group_start
    return rank
