"""Triton kernels for the bucketed cuckoo hash (`cuckoo_layout`; the CPU table is `gpurec.embedding.cuckoo`).

The table is the reference's, unchanged and operated on in place: ``keys`` int64 and ``slot_rows``
int32, ``num_buckets * SLOTS`` slots, bucket ``b`` = slots ``[b * SLOTS, (b + 1) * SLOTS)``, and
the two candidate buckets of an id are computed here exactly like ``bucket_pair`` (same constants,
imported from the reference; logical shifts written as ``(x >> 33) & LOW_31``; wrapping int64
multiplies; ``%`` of a non-negative int64). ``CuckooTable(backend="triton")`` calls
``cuckoo_lookup`` and ``cuckoo_insert`` below, ``IdPartition(backend="triton")`` calls
``cuckoo_lookup_segmented``. They run on CUDA tensors, and on CPU tensors when this module was
imported with ``TRITON_INTERPRET=1`` (Triton's interpreter, used by the tests).

Lookup: one lane per query id. The lane hashes its id, loads both buckets' 8 keys as a
``[BLOCK, SLOTS]`` tile (64 contiguous bytes per bucket, vectorised), compares, and loads the row
only at the matching slot. A query never matches a free slot (EMPTY_KEY queries return -1).

Segmented lookup: the same probe (``_probe``, shared with the one-table kernel) over several
tables stored back to back in one ``keys``/``slot_rows`` pair, as ``IdPartition`` keeps every
feature's table: each lane also loads its table index, gathers that table's first slot and bucket
count from two small per-table arrays, and hashes with its own bucket count; it returns the row
stored in that table (the partition's local row), exactly ``probe`` + ``slot_rows``. One launch
serves every feature of a batch.

Insert: one lane per new (id, row) pair, all rounds inside the kernel. The lane carries one pair at
a time. Each round, every lane still carrying a pair

1. picks a target bucket: for its own pair the emptier of the two (read without a lock, only a
   heuristic; both full: a pseudo-random one of the two); for a pair it displaced, that pair's
   other bucket;
2. tries the target's lock once: ``atomic_xchg(lock, 1, sem="acquire")`` is a test-and-set, the
   lane owns the bucket iff it read 0 (per-bucket int32 locks, all 0 between launches). A lane that
   loses retries next round, so no lane ever waits on another: no spinning, hence no intra-warp
   deadlock and no dependence on forward-progress guarantees between CTAs;
3. if it owns the bucket: reads its 8 keys and rows (volatile loads, bypassing the non-coherent
   L1), writes its pair into the first free slot and is done; if the bucket is full, it swaps its
   pair with a pseudo-random resident (the victim) and carries the victim from now on, towards the
   victim's other bucket;
4. releases the lock with ``atomic_xchg(lock, 0, sem="release")``.

After ``max_rounds`` rounds (or once no lane carries anything) a lane still carrying a pair writes
it to its own slot of the homeless outputs, which the host compacts into ``(ids, rows)`` exactly
like ``CuckooTable._insert_rounds``.

Correctness argument.
* Conservation: a pair moves only under its bucket's lock, and only between a lane and a slot
  (place: lane -> free slot; swap: lane <-> slot). So every pair that was in the table or in the
  input is, at every moment, either in exactly one slot or carried by exactly one lane: nothing is
  lost or duplicated, and a pair left carried at the end is reported homeless and is not stored.
  An EMPTY_KEY id (the caller folds those away) cannot be stored and comes back homeless.
* Placement: a pair is only written into one of its own two buckets (its target is computed from
  the carried key), so every stored id sits in one of its buckets, and keys/slot_rows stay paired
  (-1 exactly where EMPTY_KEY).
* Mutual exclusion: the test-and-set makes exactly one lane read 0 from a free lock, whether the
  contenders are lanes of one thread, one warp, one CTA or different CTAs (atomics on one address
  are totally ordered). A lane holds at most one lock, only within one round, and never waits.
* Memory ordering: the acquire (gpu scope) of the lock orders the owner's reads after the previous
  owner's release, which orders that owner's writes before it (PTX acquire/release). Triton gives
  no guarantee that the thread issuing a lane's atomic is the thread issuing that lane's loads and
  stores (the ``[BLOCK, SLOTS]`` tiles have another layout than the per-lane vectors), so the
  critical section is fenced by CTA barriers (``tl.debug_barrier``, i.e. ``bar.sync``): acquire ->
  barrier -> volatile loads -> barrier -> stores -> barrier -> release. ``bar.sync`` synchronises
  the CTA's threads, so by transitivity of causality order the reads happen after the acquire, the
  victim is read before it is overwritten, and the writes happen before the release, whichever
  threads issue them. The loop condition is a CTA-wide reduction, so every thread reaches every
  barrier.
* Termination: at most ``max_rounds`` rounds; each round does a bounded amount of work per lane.
  Locks are held only within a round, so all locks are 0 again when the kernel ends. Progress: in
  every round, each bucket with contenders is won by one of them.

Rounds count every attempt, including a lost lock, like the reference's rounds count waiting ids:
in a large table contention is rare and rounds are displacement steps; in a tiny table with many
lanes per bucket, lanes queue for locks (one pair per bucket per round) and use up rounds faster.

Interpreter notes: kernels use only Triton builtins and ``tl.reduce`` with triton's own combine
functions (``tl.sum``/``tl.max``/... are themselves ``@triton.jit`` functions, which fail under the
interpreter when triton was imported before ``TRITON_INTERPRET=1`` was set, as importing torchrec
does). The interpreter runs programs one after another, so it exercises contention between the
lanes of one program but never between programs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import cuckoo_layout as ref

SLOTS = tl.constexpr(ref.SLOTS)
EMPTY_KEY = tl.constexpr(ref.EMPTY_KEY)
SEED_1 = tl.constexpr(ref.SEED_1)
SEED_2 = tl.constexpr(ref.SEED_2)
MIX_1 = tl.constexpr(ref.MIX_1)
MIX_2 = tl.constexpr(ref.MIX_2)
LOW_31 = tl.constexpr(ref.LOW_31)
NON_NEGATIVE = tl.constexpr(ref.NON_NEGATIVE)
VICTIM_SEED = tl.constexpr(7)  # victim slot = mix64(id, round + 7) % SLOTS, as in the reference

# Launch configurations. On a GPU, BLOCK == 32 * num_warps: one lane per thread in the per-lane
# vectors (60-80 registers, see compile_all); under the interpreter, big blocks mean few (slow,
# sequential) programs.
LOOKUP_BLOCK = 256
LOOKUP_WARPS = 8
INSERT_BLOCK = 128
INSERT_WARPS = 4
HASH_BLOCK = 256
HASH_WARPS = 4
INTERPRET_BLOCK = 4096


# --- device helpers ---------------------------------------------------------------------------


@triton.jit
def _mix64(ids, seed):
    """murmur3 fmix64 of ``ids ^ seed`` cleared to non-negative: ``kernels.cuckoo_layout.mix64``."""
    x = ids ^ seed
    x = x ^ ((x >> 33) & LOW_31)  # >> of a signed int is arithmetic: the mask makes it logical
    x = x * MIX_1  # int64 * int64 wraps, like torch and numpy
    x = x ^ ((x >> 33) & LOW_31)
    x = x * MIX_2
    x = x ^ ((x >> 33) & LOW_31)
    return x & NON_NEGATIVE


@triton.jit
def _bucket_pair(ids, num_buckets):
    """Both candidate buckets (int64) of int64 ``ids``: ``kernels.cuckoo_layout.bucket_pair``."""
    first = _mix64(ids, SEED_1) % num_buckets  # non-negative % positive: srem == floor mod
    second = _mix64(ids, SEED_2) % num_buckets
    # (first + 1) % num_buckets without a third 64-bit remainder (first < num_buckets).
    bumped = tl.where(first + 1 == num_buckets, 0, first + 1)
    second = tl.where(second == first, bumped, second)
    return first, second


@triton.jit
def _sum(x, axis):
    # tl.reduce with triton's own combine function instead of tl.sum (see the module docstring).
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _probe(ids, valid, start_1, start_2, keys_ptr, slot_rows_ptr):
    """Row (int32) of each id found in the bucket starting at slot ``start_1`` or ``start_2``, else -1.

    One lane per id: both buckets' 8 keys are loaded as ``[BLOCK, SLOTS]`` tiles (one 64-byte
    bucket per lane), and the row only at the matching slot. Lanes not ``valid`` read nothing and
    give -1 (an EMPTY_KEY query must be invalid: it would match a free slot).
    """
    slot = tl.arange(0, SLOTS)[None, :]
    ptr_1 = start_1[:, None] + slot  # [BLOCK, SLOTS]
    ptr_2 = start_2[:, None] + slot
    keys_1 = tl.load(keys_ptr + ptr_1, mask=valid[:, None], other=EMPTY_KEY)
    keys_2 = tl.load(keys_ptr + ptr_2, mask=valid[:, None], other=EMPTY_KEY)
    hit_1 = (keys_1 == ids[:, None]) & valid[:, None]
    hit_2 = (keys_2 == ids[:, None]) & valid[:, None]
    # Rows are read only where the key matched (at most one slot of the 16): rows are >= 0, so the
    # max over the -1 fill is the row, or -1 when nothing matched.
    rows_1 = tl.load(slot_rows_ptr + ptr_1, mask=hit_1, other=-1)
    rows_2 = tl.load(slot_rows_ptr + ptr_2, mask=hit_2, other=-1)
    return tl.maximum(_max(rows_1, 1), _max(rows_2, 1))


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _bucket_pair_kernel(ids_ptr, first_ptr, second_ptr, n, num_buckets, BLOCK: tl.constexpr):
    """Writes both buckets of each id: lets the tests compare the device hash with the reference."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    first, second = _bucket_pair(ids, num_buckets)
    tl.store(first_ptr + offs, first, mask=mask)
    tl.store(second_ptr + offs, second, mask=mask)


@triton.jit
def _lookup_kernel(ids_ptr, keys_ptr, slot_rows_ptr, out_ptr, n, num_buckets, BLOCK: tl.constexpr):
    """out[i] = row of ids[i] (int64), -1 where the id is not stored."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    valid = in_range & (ids != EMPTY_KEY)  # an EMPTY_KEY query must not match a free slot
    first, second = _bucket_pair(ids, num_buckets)
    row = _probe(ids, valid, first * SLOTS, second * SLOTS, keys_ptr, slot_rows_ptr)
    tl.store(out_ptr + offs, row.to(tl.int64), mask=in_range)


@triton.jit
def _lookup_segmented_kernel(
    ids_ptr,
    feature_ptr,
    slot_base_ptr,
    num_buckets_ptr,
    keys_ptr,
    slot_rows_ptr,
    out_ptr,
    n,
    BLOCK: tl.constexpr,
):
    """out[i] = local row of ids[i] in table feature[i] (int64), -1 where the id is not stored there.

    Several tables back to back in ``keys``/``slot_rows``: table t starts at slot
    ``slot_base[t]`` (a multiple of SLOTS) and has ``num_buckets[t]`` buckets (``IdPartition``'s layout). Each lane
    gathers its table's base and bucket count (small arrays, L1/L2 resident), hashes with its own
    bucket count and probes like ``_lookup_kernel``: ``probe`` + ``slot_rows`` of the reference.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    ids = tl.load(ids_ptr + offs, mask=in_range, other=0)
    table = tl.load(feature_ptr + offs, mask=in_range, other=0)
    base = tl.load(slot_base_ptr + table, mask=in_range, other=0)
    num_buckets = tl.load(num_buckets_ptr + table, mask=in_range, other=1)  # masked lanes hash too: never % 0
    valid = in_range & (ids != EMPTY_KEY)
    first, second = _bucket_pair(ids, num_buckets)
    # Global bucket index times SLOTS (tables are whole buckets: base is a multiple of SLOTS), so the
    # compiler sees 64-byte aligned buckets and vectorises the tile loads as in _lookup_kernel;
    # ``base + first * SLOTS`` would hide that alignment (base comes from memory): 8-byte loads.
    bucket_base = base // SLOTS
    row = _probe(
        ids, valid, (bucket_base + first) * SLOTS, (bucket_base + second) * SLOTS, keys_ptr, slot_rows_ptr
    )
    tl.store(out_ptr + offs, row.to(tl.int64), mask=in_range)


@triton.jit
def _insert_kernel(
    ids_ptr,
    rows_ptr,
    keys_ptr,
    slot_rows_ptr,
    locks_ptr,
    out_ids_ptr,
    out_rows_ptr,
    out_homeless_ptr,
    n,
    num_buckets,
    max_rounds,
    BLOCK: tl.constexpr,
):
    """Insert distinct, not yet stored ids with their rows; flag the pairs left homeless.

    Lane state: the carried pair (key, row), ``active`` (carries a pair to place) and ``avoid``
    (-1 for the lane's own pair, else the bucket the carried pair was displaced from).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    key = tl.load(ids_ptr + offs, mask=in_range, other=0)
    row = tl.load(rows_ptr + offs, mask=in_range, other=-1)
    rejected = in_range & (key == EMPTY_KEY)  # cannot be stored: reported homeless
    active = in_range & (key != EMPTY_KEY)
    avoid = tl.full([BLOCK], -1, tl.int64)
    slot = tl.arange(0, SLOTS)[None, :]

    rounds = tl.full([], 0, tl.int32)
    pending = _sum(active.to(tl.int32), 0)
    while (pending > 0) & (rounds < max_rounds):
        first, second = _bucket_pair(key, num_buckets)
        fresh = active & (avoid < 0)
        # 1. Target. Own pair: the emptier bucket, read without the lock (only a heuristic).
        # (.cg: from L2, not from a line this SM's L1 kept from an earlier round)
        keys_1 = tl.load(
            keys_ptr + (first[:, None] * SLOTS + slot), mask=fresh[:, None], other=0, cache_modifier=".cg"
        )
        keys_2 = tl.load(
            keys_ptr + (second[:, None] * SLOTS + slot), mask=fresh[:, None], other=0, cache_modifier=".cg"
        )
        free_1 = _sum((keys_1 == EMPTY_KEY).to(tl.int32), 1)
        free_2 = _sum((keys_2 == EMPTY_KEY).to(tl.int32), 1)
        both_full = (free_1 == 0) & (free_2 == 0)
        coin = (_mix64(key, rounds) & 1) != 0  # both full: walk through either, varied per round
        take_second = (free_2 > free_1) | (both_full & coin)
        # A displaced pair goes to its other bucket (== first only when num_buckets == 1).
        other = tl.where(first == avoid, second, first)
        target = tl.where(avoid < 0, tl.where(take_second, second, first), other)

        # 2. Try the lock once (test-and-set); losers retry next round, nobody waits.
        was = tl.atomic_xchg(locks_ptr + target, 1, mask=active, sem="acquire")
        owner = active & (was == 0)
        tl.debug_barrier()  # the bucket reads below happen after the acquire, in every thread

        # 3. Under the lock: read the bucket, take the first free slot or swap with a victim.
        base = target * SLOTS
        cur_keys = tl.load(keys_ptr + (base[:, None] + slot), mask=owner[:, None], other=0, volatile=True)
        cur_rows = tl.load(
            slot_rows_ptr + (base[:, None] + slot), mask=owner[:, None], other=-1, volatile=True
        )
        first_free = _min(tl.where(cur_keys == EMPTY_KEY, slot, SLOTS), 1)
        placed = owner & (first_free < SLOTS)
        victim = (_mix64(key, rounds + VICTIM_SEED) % SLOTS).to(tl.int32)
        chosen = tl.where(placed, first_free, victim)
        picked = slot == chosen[:, None]
        old_key = _sum(tl.where(picked, cur_keys, 0), 1)  # exactly one slot picked per lane
        old_row = _sum(tl.where(picked, cur_rows, 0), 1)
        tl.debug_barrier()  # every read of the bucket happens before any write to it
        tl.store(keys_ptr + (base + chosen), key, mask=owner)
        tl.store(slot_rows_ptr + (base + chosen), row, mask=owner)
        tl.debug_barrier()  # the writes happen before the release, in every thread

        # 4. Release.
        tl.atomic_xchg(locks_ptr + target, 0, mask=owner, sem="release")

        displaced = owner & (first_free >= SLOTS)
        key = tl.where(displaced, old_key, key)
        row = tl.where(displaced, old_row, row)
        avoid = tl.where(displaced, target, avoid)
        active = active & ~placed
        rounds += 1
        pending = _sum(active.to(tl.int32), 0)

    tl.store(out_ids_ptr + offs, key, mask=in_range)
    tl.store(out_rows_ptr + offs, row, mask=in_range)
    tl.store(out_homeless_ptr + offs, (active | rejected).to(tl.int8), mask=in_range)


# --- host wrappers ----------------------------------------------------------------------------


def interpreted() -> bool:
    """True when this module's kernels run under Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_lookup_kernel, InterpretedFunction)


def _check_device(tensor: torch.Tensor, table_tensor: torch.Tensor) -> None:
    if tensor.device != table_tensor.device:
        raise ValueError(f"ids on {tensor.device} but the table on {table_tensor.device}")
    if tensor.device.type != "cuda" and not interpreted():
        raise RuntimeError(
            "the Triton cuckoo kernels need CUDA tensors, or TRITON_INTERPRET=1 set before kernels.cuckoo "
            "is imported to run on CPU tensors (or use CuckooTable(backend='torch'))"
        )


def _check_storage(keys: torch.Tensor, slot_rows: torch.Tensor) -> None:
    if keys.dtype != torch.int64 or slot_rows.dtype != torch.int32:
        raise TypeError(f"table keys/slot_rows must be int64/int32, got {keys.dtype}/{slot_rows.dtype}")
    if not (keys.is_contiguous() and slot_rows.is_contiguous()):
        raise ValueError("table keys and slot_rows must be contiguous")
    if slot_rows.numel() != keys.numel() or keys.numel() % ref.SLOTS:
        raise ValueError("table keys/slot_rows must hold the same whole number of buckets")
    if slot_rows.device != keys.device:
        raise ValueError(f"table keys on {keys.device} but slot_rows on {slot_rows.device}")


def _check_table(table) -> None:
    _check_storage(table.keys, table.slot_rows)
    if table.keys.numel() != table.num_buckets * ref.SLOTS:
        raise ValueError("table keys/slot_rows do not hold num_buckets * SLOTS slots")


def _block(device: torch.device, gpu_block: int, block: int | None) -> int:
    if block is not None:
        return block
    return gpu_block if device.type == "cuda" else INTERPRET_BLOCK


def bucket_pair_device(
    ids: torch.Tensor, num_buckets: int, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The device hash: both buckets of each id, computed by a kernel (for tests)."""
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    _check_device(ids, ids)
    first, second = torch.empty_like(ids), torch.empty_like(ids)
    if ids.numel():
        blk = _block(ids.device, HASH_BLOCK, block)
        with _on(ids.device):
            _bucket_pair_kernel[(triton.cdiv(ids.numel(), blk),)](
                ids, first, second, ids.numel(), num_buckets, BLOCK=blk, num_warps=HASH_WARPS
            )
    return first, second


def _on(device: torch.device):
    """Triton launches on the current CUDA device and stream: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch_lookup(
    ids: torch.Tensor,
    keys: torch.Tensor,
    slot_rows: torch.Tensor,
    num_buckets: int,
    out: torch.Tensor,
    block: int,
) -> None:
    """One lookup launch on flat contiguous tensors: ``out[i]`` = row of ``ids[i]`` or -1."""
    n = ids.numel()
    if n:
        with _on(ids.device):
            _lookup_kernel[(triton.cdiv(n, block),)](
                ids, keys, slot_rows, out, n, num_buckets, BLOCK=block, num_warps=LOOKUP_WARPS
            )


def launch_lookup_segmented(
    ids: torch.Tensor,
    feature: torch.Tensor,
    slot_base: torch.Tensor,
    num_buckets: torch.Tensor,
    keys: torch.Tensor,
    slot_rows: torch.Tensor,
    out: torch.Tensor,
    block: int,
) -> None:
    """One segmented lookup launch on flat contiguous int64 tensors (``slot_rows`` int32):
    ``out[i]`` = local row of ``ids[i]`` in table ``feature[i]``, or -1."""
    n = ids.numel()
    if n:
        with _on(ids.device):
            _lookup_segmented_kernel[(triton.cdiv(n, block),)](
                ids,
                feature,
                slot_base,
                num_buckets,
                keys,
                slot_rows,
                out,
                n,
                BLOCK=block,
                num_warps=LOOKUP_WARPS,
            )


def launch_insert(
    ids: torch.Tensor,
    rows: torch.Tensor,
    keys: torch.Tensor,
    slot_rows: torch.Tensor,
    locks: torch.Tensor,
    out_ids: torch.Tensor,
    out_rows: torch.Tensor,
    homeless: torch.Tensor,
    num_buckets: int,
    max_rounds: int,
    block: int,
) -> None:
    """One insert launch on flat contiguous tensors; ``homeless[i]`` = 1 where lane i's final
    pair ``(out_ids[i], out_rows[i])`` is left homeless. ``locks`` must be zeros and stay so."""
    n = ids.numel()
    if n:
        with _on(ids.device):
            _insert_kernel[(triton.cdiv(n, block),)](
                ids,
                rows,
                keys,
                slot_rows,
                locks,
                out_ids,
                out_rows,
                homeless,
                n,
                num_buckets,
                max_rounds,
                BLOCK=block,
                num_warps=INSERT_WARPS,
            )


def cuckoo_lookup(table, ids: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    """Row of each id (int64, same shape as ``ids``), -1 where absent: ``CuckooTable.lookup``."""
    _check_table(table)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    _check_device(flat, table.keys)
    if flat.numel() >= 2**31:
        raise ValueError(f"cuckoo_lookup: {flat.numel()} ids in one call, at most 2**31 - 1")
    out = torch.empty_like(flat)
    launch_lookup(
        flat, table.keys, table.slot_rows, table.num_buckets, out, _block(flat.device, LOOKUP_BLOCK, block)
    )
    return out.reshape(ids.shape)


def cuckoo_lookup_segmented(
    keys: torch.Tensor,
    slot_rows: torch.Tensor,
    feature: torch.Tensor,
    ids: torch.Tensor,
    slot_base: torch.Tensor,
    num_buckets: torch.Tensor,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Local row of each (``feature[i]``, ``ids[i]``) (int64, shape of ``ids``), -1 where absent.

    ``keys``/``slot_rows`` hold several tables back to back: table ``t`` starts at slot
    ``slot_base[t]`` (a multiple of SLOTS: tables are whole buckets) and has ``num_buckets[t]``
    buckets (one entry per table, any integer dtype).
    This is ``IdPartition.lookup``: the reference's ``probe`` with per-id base and bucket count,
    then ``slot_rows``. ``feature`` must have one table index per id, each in
    ``[0, len(slot_base))``, and every table must lie inside ``keys``: the kernel does not check
    (that would cost a device sync), it reads out of bounds otherwise.
    """
    _check_storage(keys, slot_rows)
    flat = ids.reshape(-1).to(torch.int64).contiguous()
    tables = feature.reshape(-1).to(torch.int64).contiguous()
    if tables.numel() != flat.numel():
        raise ValueError(f"cuckoo_lookup_segmented: {flat.numel()} ids but {tables.numel()} table indices")
    base = slot_base.reshape(-1).to(torch.int64).contiguous()
    buckets = num_buckets.reshape(-1).to(torch.int64).contiguous()
    if base.numel() != buckets.numel() or base.numel() == 0:
        raise ValueError(
            f"cuckoo_lookup_segmented: {base.numel()} slot bases but {buckets.numel()} bucket counts"
        )
    for tensor in (flat, tables, base, buckets):
        _check_device(tensor, keys)
    if flat.numel() >= 2**31:
        raise ValueError(f"cuckoo_lookup_segmented: {flat.numel()} ids in one call, at most 2**31 - 1")
    out = torch.empty_like(flat)
    launch_lookup_segmented(
        flat, tables, base, buckets, keys, slot_rows, out, _block(flat.device, LOOKUP_BLOCK, block)
    )
    return out.reshape(ids.shape)


def cuckoo_insert(
    table,
    ids: torch.Tensor,
    rows: torch.Tensor,
    max_rounds: int = ref.DEFAULT_MAX_ROUNDS,
    *,
    block: int | None = None,
    locks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store distinct new ``ids`` with ``rows``; return the homeless ``(ids, rows)`` (int64).

    Same contract as ``CuckooTable.insert``: the returned ids, which may include ids stored before
    the call and displaced by it, are not stored when this returns. ``locks`` (int32 zeros, one
    per bucket, left all-zero by every launch) may be passed in to reuse them across calls.
    """
    _check_table(table)
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    rows = rows.reshape(-1).to(torch.int32).contiguous()
    if ids.numel() != rows.numel():
        raise ValueError(f"cuckoo_insert: {ids.numel()} ids but {rows.numel()} rows")
    _check_device(ids, table.keys)
    _check_device(rows, table.keys)
    n = ids.numel()
    if n >= 2**31:
        raise ValueError(f"cuckoo_insert: {n} ids in one call, at most 2**31 - 1")
    if not 0 <= max_rounds < 2**31:
        raise ValueError(f"max_rounds must be in [0, 2**31), got {max_rounds}")
    if n == 0:
        return ids, rows.to(torch.int64)
    if locks is None:
        locks = torch.zeros(table.num_buckets, dtype=torch.int32, device=ids.device)
    elif locks.dtype != torch.int32 or locks.numel() < table.num_buckets or locks.device != ids.device:
        raise ValueError("locks must be int32 zeros with one entry per bucket, on the table's device")
    out_ids = torch.empty_like(ids)
    out_rows = torch.empty_like(rows)
    homeless = torch.empty(n, dtype=torch.int8, device=ids.device)
    launch_insert(
        ids,
        rows,
        table.keys,
        table.slot_rows,
        locks,
        out_ids,
        out_rows,
        homeless,
        table.num_buckets,
        max_rounds,
        _block(ids.device, INSERT_BLOCK, block),
    )
    left = homeless.bool()
    return out_ids[left], out_rows[left].to(torch.int64)


# --- ahead-of-time compilation ----------------------------------------------------------------


class KernelSpec(NamedTuple):
    """One kernel as launched on a GPU: what ``triton.compile(ASTSource(...))`` needs."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, int]
    num_warps: int

    @property
    def attrs(self) -> dict[tuple[int, ...], list[list]]:
        """Pointer arguments 16-byte aligned, as the launcher specialises them for torch allocations."""
        names = list(self.signature)
        return {
            (names.index(k),): [["tt.divisibility", 16]]
            for k, v in self.signature.items()
            if v.startswith("*")
        }


def kernel_specs() -> Iterator[KernelSpec]:
    """Every kernel of this module with the signature and constants the host wrappers launch it with.

    Integers are typed as the launcher specialises them for realistic tables (num_buckets, n and
    max_rounds below 2**31: i32); pointers as the tensors' dtypes.
    """
    yield KernelSpec(
        "cuckoo_lookup",
        _lookup_kernel,
        {
            "ids_ptr": "*i64",
            "keys_ptr": "*i64",
            "slot_rows_ptr": "*i32",
            "out_ptr": "*i64",
            "n": "i32",
            "num_buckets": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": LOOKUP_BLOCK},
        LOOKUP_WARPS,
    )
    yield KernelSpec(
        "cuckoo_lookup_segmented",
        _lookup_segmented_kernel,
        {
            "ids_ptr": "*i64",
            "feature_ptr": "*i64",
            "slot_base_ptr": "*i64",
            "num_buckets_ptr": "*i64",
            "keys_ptr": "*i64",
            "slot_rows_ptr": "*i32",
            "out_ptr": "*i64",
            "n": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": LOOKUP_BLOCK},
        LOOKUP_WARPS,
    )
    yield KernelSpec(
        "cuckoo_insert",
        _insert_kernel,
        {
            "ids_ptr": "*i64",
            "rows_ptr": "*i32",
            "keys_ptr": "*i64",
            "slot_rows_ptr": "*i32",
            "locks_ptr": "*i32",
            "out_ids_ptr": "*i64",
            "out_rows_ptr": "*i32",
            "out_homeless_ptr": "*i8",
            "n": "i32",
            "num_buckets": "i32",
            "max_rounds": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": INSERT_BLOCK},
        INSERT_WARPS,
    )
    yield KernelSpec(
        "cuckoo_bucket_pair",
        _bucket_pair_kernel,
        {
            "ids_ptr": "*i64",
            "first_ptr": "*i64",
            "second_ptr": "*i64",
            "n": "i32",
            "num_buckets": "i32",
            "BLOCK": "constexpr",
        },
        {"BLOCK": HASH_BLOCK},
        HASH_WARPS,
    )


KERNELS: list[KernelSpec] = list(kernel_specs())
