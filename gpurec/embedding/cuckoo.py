"""A bucketed cuckoo hash from 64-bit ids to embedding rows, kept in torch tensors.

This is the id -> row map behind a collisionless embedding table: every stored id has its own
row, so two distinct ids never share an embedding. It is also the pure-torch reference of the GPU
kernels in `kernels/cuckoo.py` (same layout, same hash functions, bit for bit), and the path the
CPU runs.

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

SLOTS = 8  # ids per bucket: 8 x int64 = one 64-byte cache line
EMPTY_KEY = -(2**63)  # marks a free slot; the one id it shadows is folded into EMPTY_KEY + 1
SEED_1 = 0x2545F4914F6CDD1D
SEED_2 = 0x1B873593CC9E2D51 - 2**63  # as a signed int64
OWNER_SEED = 0x3C6EF372FE94F82B  # picks the partition (rank) that owns an id; independent of buckets
# murmur3 fmix64 multipliers as signed int64 (Triton and torch take signed literals).
MIX_1 = 0xFF51AFD7ED558CCD - 2**64
MIX_2 = 0xC4CEB9FE1A85EC53 - 2**64
LOW_31 = 0x7FFFFFFF  # (x >> 33) & LOW_31 == logical shift right by 33 of an int64
NON_NEGATIVE = 0x7FFFFFFFFFFFFFFF
DEFAULT_MAX_ROUNDS = 128  # displacement rounds before the ids still homeless are reported as failed


# The constants reach the functions below as default arguments because TorchScript (the served
# artifact scripts them) cannot read module globals; callers never pass them.


def mix64(
    ids: torch.Tensor, seed: int, m1: int = MIX_1, m2: int = MIX_2, low_31: int = LOW_31, non_negative: int = NON_NEGATIVE
) -> torch.Tensor:
    """murmur3 fmix64 of ``ids ^ seed``, cleared to a non-negative int64."""
    x = ids ^ seed
    x = x ^ ((x >> 33) & low_31)
    x = x * m1
    x = x ^ ((x >> 33) & low_31)
    x = x * m2
    x = x ^ ((x >> 33) & low_31)
    return x & non_negative


def bucket_pair(
    ids: torch.Tensor, num_buckets: torch.Tensor, seed_1: int = SEED_1, seed_2: int = SEED_2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two candidate buckets of each id (equal only when ``num_buckets == 1``).

    ``num_buckets`` is an int, or a tensor with one bucket count per id when ids of several
    tables are looked up at once.
    """
    first = mix64(ids, seed_1) % num_buckets
    second = mix64(ids, seed_2) % num_buckets
    # A second hash that lands on the first bucket would halve the id's choices: take the next one.
    second = torch.where(second == first, (first + 1) % num_buckets, second)
    return first, second


def owner_of(ids: torch.Tensor, num_partitions: int, seed: int = OWNER_SEED) -> torch.Tensor:
    """Which partition (= rank in row-wise training) owns each id."""
    return mix64(ids, seed) % num_partitions


def probe(
    keys: torch.Tensor, ids: torch.Tensor, slot_base: torch.Tensor, num_buckets: torch.Tensor, slots: int = SLOTS
) -> torch.Tensor:
    """The slot of ``keys`` holding each id, -1 where absent.

    ``keys`` may hold several tables back to back: an id's table starts at slot ``slot_base`` (a
    multiple of ``slots``) and has ``num_buckets`` buckets (ints, or tensors with one value per id).
    """
    first, second = bucket_pair(ids, num_buckets)
    base = torch.div(slot_base, slots, rounding_mode="floor")
    buckets = keys.view(-1, slots)
    # Whole-bucket row gathers (one 64-byte line per bucket), not 16 scattered element gathers.
    hit = torch.cat([buckets[base + first] == ids.unsqueeze(1), buckets[base + second] == ids.unsqueeze(1)], dim=1)
    position = hit.to(torch.int8).argmax(dim=1, keepdim=True)  # at most one hit per id
    found = hit.gather(1, position).squeeze(1)
    position = position.squeeze(1)
    bucket = torch.where(position < slots, base + first, base + second)
    slot = bucket * slots + position % slots
    return torch.where(found, slot, torch.full_like(slot, -1))


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
