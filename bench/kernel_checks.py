"""The cuckoo kernels against their torch reference at scale, and the insert kernel under contention.

`bench/gpu_check.py` runs these on a GPU with millions of ids (compiled kernels, real concurrency
between CTAs) and, in CI's dry run, on CPU tensors under Triton's interpreter with tiny sizes. The
caller sets TRITON_INTERPRET before this module is imported (it imports `kernels.cuckoo`). Every
check returns named facts (booleans) and figures; a check passes when all its facts are true.

The reference is `gpurec.embedding.cuckoo.CuckooTable(backend="torch")` (the CPU path, plain torch,
so it runs on the GPU too) and `kernels.cuckoo_layout.bucket_pair`/`probe`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpurec.embedding.cuckoo import CuckooTable
from kernels import cuckoo as kc
from kernels.cuckoo_layout import EMPTY_KEY, MIX_1, SLOTS, TableStorage, bucket_pair, empty_storage, probe

EDGE_IDS = [0, 1, -1, 2**63 - 1, EMPTY_KEY + 1, 2**32, -(2**32), 2**31 - 1, -(2**31), 12345]


@dataclass(frozen=True)
class CheckSizes:
    """How big the correctness and stress checks are."""

    hash_ids: int  # ids hashed per bucket count
    table_slots: int  # slots of the lookup/insert tables (loads up to 0.95)
    stress_slots: int  # slots of the one-launch fill under stress
    hot_buckets: int  # the contended table: this many buckets, 1.5x overfull
    hot_rounds: int  # its max_rounds: overfull, so some lanes always use them all
    batch: int  # ids per launch in the batched-like-training scenario
    repeats: int  # stress repetitions, each with other ids
    segmented_tables: int


GPU_SIZES = CheckSizes(
    hash_ids=1 << 20,
    table_slots=1 << 23,
    stress_slots=1 << 22,
    hot_buckets=1024,
    hot_rounds=4096,
    batch=1 << 16,
    repeats=5,
    segmented_tables=9,
)
DRY_SIZES = CheckSizes(
    hash_ids=2048,
    table_slots=2048,
    stress_slots=2048,
    hot_buckets=16,
    hot_rounds=64,
    batch=512,
    repeats=2,
    segmented_tables=3,
)


def distinct_ids(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` distinct int64 ids spread over the whole range, in random order, none EMPTY_KEY.

    ``k * MIX_1`` (odd) is a bijection of int64 mod 2**64, so consecutive ``k`` give distinct ids;
    ``k`` stays below 2**62 + n, never the one ``k`` that maps to EMPTY_KEY (2**63)."""
    gen = torch.Generator().manual_seed(seed)
    start = int(torch.randint(1, 2**62, (1,), generator=gen))
    ids = (torch.arange(n, dtype=torch.int64) + start) * MIX_1
    return ids[torch.randperm(n, generator=gen)].to(device)


def with_edge_ids(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with the edge ids (0, +-1, int64 max, EMPTY_KEY + 1, ...) in front, still distinct."""
    edge = torch.tensor(EDGE_IDS, dtype=torch.int64, device=ids.device)
    return torch.cat([edge, ids[~torch.isin(ids, edge)]])


def _rows(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Distinct rows 0..n-1 in random order (int32), so a row handed out twice would show."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(n, generator=gen).to(device=device, dtype=torch.int32)


def rows_of(ids: torch.Tensor, rows: torch.Tensor, missing: int = -1):
    """A function mapping a tensor of ids to their rows in (``ids``, ``rows``), ``missing`` elsewhere."""
    order = torch.argsort(ids)
    sorted_ids, sorted_rows = ids[order], rows.to(torch.int64)[order]

    def lookup(queries: torch.Tensor) -> torch.Tensor:
        if sorted_ids.numel() == 0:
            return torch.full_like(queries, missing)
        pos = torch.searchsorted(sorted_ids, queries).clamp(max=sorted_ids.numel() - 1)
        return torch.where(sorted_ids[pos] == queries, sorted_rows[pos], torch.full_like(queries, missing))

    return lookup


def table_facts(
    table,
    given_ids: torch.Tensor,
    given_rows: torch.Tensor,
    homeless_ids: torch.Tensor,
    homeless_rows: torch.Tensor,
    locks: torch.Tensor | None = None,
) -> dict[str, bool]:
    """The insert invariants: every given (id, row) pair (stored before, or inserted) is stored exactly
    once in one of its buckets or reported homeless, never both, never changed, never duplicated."""
    used = table.keys != EMPTY_KEY
    stored = table.keys[used]
    stored_rows = table.slot_rows[used].to(torch.int64)
    bucket = torch.nonzero(used).squeeze(1) // SLOTS
    first, second = bucket_pair(stored, table.num_buckets)
    given_row = rows_of(given_ids, given_rows, missing=-2)
    facts = {
        "keys_and_rows_paired": torch.equal(used, table.slot_rows != -1),
        "no_id_twice": torch.unique(stored).numel() == stored.numel(),
        "no_row_twice": torch.unique(stored_rows).numel() == stored_rows.numel(),
        "ids_in_own_bucket": bool(((bucket == first) | (bucket == second)).all()),
        "stored_pairs_as_given": bool((given_row(stored) == stored_rows).all()),
        "homeless_pairs_as_given": bool((given_row(homeless_ids) == homeless_rows).all()),
        "homeless_reported_once": torch.unique(homeless_ids).numel() == homeless_ids.numel(),
        "homeless_not_stored": not bool(torch.isin(homeless_ids, stored).any()),
        "nothing_lost": stored.numel() + homeless_ids.numel() == given_ids.numel(),
        "lookups_find_stored_rows": torch.equal(kc.cuckoo_lookup(table, stored), stored_rows),
        "lookups_miss_homeless": bool((kc.cuckoo_lookup(table, homeless_ids) == -1).all()),
    }
    if locks is not None:
        facts["locks_released"] = int(torch.count_nonzero(locks)) == 0
    return facts


def _result(facts: dict[str, bool], **figures) -> dict:
    return {"passed": all(facts.values()), "facts": facts, **figures}


# --- checks -----------------------------------------------------------------------------------


def check_hash(device: torch.device, sizes: CheckSizes, seed: int = 0) -> dict:
    """The device hash equals `bucket_pair` bit for bit, for int32 and int64 bucket counts."""
    ids = with_edge_ids(distinct_ids(sizes.hash_ids, seed, device))
    facts = {}
    for num_buckets in (1, 3, 1000, (1 << 20) + 7, 2**31 - 1, 2**31 + 11, 2**40 + 7):
        got = kc.bucket_pair_device(ids, num_buckets)
        want = bucket_pair(ids, num_buckets)
        facts[f"buckets_{num_buckets}"] = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    return _result(facts, ids=ids.numel())


def check_lookup(device: torch.device, sizes: CheckSizes, seed: int = 1) -> dict:
    """Kernel lookups equal the reference on tables the reference filled, at load 0.5 and 0.95:
    present ids (their rows), absent ids and edge ids (-1), in random order."""
    facts, figures = {}, {}
    num_buckets = sizes.table_slots // SLOTS
    for load in (0.5, 0.95):
        n = int(sizes.table_slots * load)
        ids = distinct_ids(n + n // 2, seed, device)
        stored_ids, absent = with_edge_ids(ids[:n]), ids[n:]
        rows = _rows(stored_ids.numel(), seed, device)
        reference = CuckooTable(num_buckets, device=device, backend="torch")
        homeless, _ = reference.insert(stored_ids, rows)
        queries = torch.cat([stored_ids, absent])
        queries = queries[torch.randperm(queries.numel(), device="cpu").to(device)]
        got = kc.cuckoo_lookup(reference, queries)
        want = reference.lookup(queries)
        # the inserted row, or -1 for absent ids and for ids the reference left homeless
        expected = torch.where(torch.isin(queries, homeless), -1, rows_of(stored_ids, rows)(queries))
        facts[f"load_{load}_equals_reference"] = torch.equal(got, want)
        facts[f"load_{load}_rows_as_inserted"] = torch.equal(got, expected)
        figures[f"load_{load}_queries"] = queries.numel()
        figures[f"load_{load}_reference_homeless"] = homeless.numel()
    return _result(facts, **figures)


def check_insert(device: torch.device, sizes: CheckSizes, seed: int = 2) -> dict:
    """Kernel inserts: into an empty table up to load 0.95 in one launch, and into a table the
    reference filled to 0.5, up to 0.95; then the reference reads the kernel-built table."""
    facts, figures = {}, {}
    num_buckets = sizes.table_slots // SLOTS
    n = int(sizes.table_slots * 0.95)
    ids = with_edge_ids(distinct_ids(n, seed, device))
    rows = _rows(ids.numel(), seed, device)

    table = empty_storage(num_buckets, device)
    homeless_ids, homeless_rows = kc.cuckoo_insert(table, ids, rows)
    for name, ok in table_facts(table, ids, rows, homeless_ids, homeless_rows).items():
        facts[f"empty_to_0.95_{name}"] = ok
    reference = CuckooTable(
        num_buckets, device=device, backend="torch", storage=(table.keys, table.slot_rows)
    )
    facts["reference_reads_kernel_table"] = torch.equal(reference.lookup(ids), kc.cuckoo_lookup(table, ids))
    figures["empty_to_0.95_homeless"] = homeless_ids.numel()

    half = int(sizes.table_slots * 0.5)
    prefilled = CuckooTable(num_buckets, device=device, backend="torch")
    ref_homeless, _ = prefilled.insert(ids[:half], rows[:half])
    given_ids = ids[~torch.isin(ids, ref_homeless)]
    given_rows = rows[~torch.isin(ids, ref_homeless)]
    homeless_ids, homeless_rows = kc.cuckoo_insert(prefilled, ids[half:], rows[half:])
    for name, ok in table_facts(prefilled, given_ids, given_rows, homeless_ids, homeless_rows).items():
        facts[f"half_to_0.95_{name}"] = ok
    figures["half_to_0.95_homeless"] = homeless_ids.numel()
    return _result(facts, **figures)


def segmented_layout(
    slots: int, tables: int, load: float, seed: int, device: torch.device, max_rounds: int = 128
):
    """``tables`` tables of sizes 1 : 2 : ... back to back in one keys/slot_rows pair, each filled to
    ``load`` by the insert kernel. Returns (keys, slot_rows, slot_base, num_buckets, ids per
    table, rows per table) with the homeless ids' rows set to -1."""
    weights = range(1, tables + 1)
    buckets = [max(1, (slots // SLOTS) * w // sum(weights)) for w in weights]
    bases = [sum(buckets[:t]) * SLOTS for t in range(tables)]
    keys = torch.full((sum(buckets) * SLOTS,), EMPTY_KEY, dtype=torch.int64, device=device)
    slot_rows = torch.full((keys.numel(),), -1, dtype=torch.int32, device=device)
    table_ids, table_rows = [], []
    for t, (base, b) in enumerate(zip(bases, buckets, strict=True)):
        fill = max(1, int(b * SLOTS * load))
        ids = distinct_ids(fill, seed * 1000 + t, device)  # tables may share ids: each answers its own
        rows = _rows(fill, seed * 1000 + t, device)
        view = TableStorage(keys[base : base + b * SLOTS], slot_rows[base : base + b * SLOTS], b)
        homeless, _ = kc.cuckoo_insert(view, ids, rows, max_rounds)
        table_ids.append(ids)
        table_rows.append(torch.where(torch.isin(ids, homeless), -1, rows.to(torch.int64)))
    slot_base = torch.tensor(bases, dtype=torch.int64, device=device)
    return (
        keys,
        slot_rows,
        slot_base,
        torch.tensor(buckets, dtype=torch.int64, device=device),
        table_ids,
        table_rows,
    )


def check_segmented(device: torch.device, sizes: CheckSizes, seed: int = 3) -> dict:
    """The segmented (multi-table) lookup equals the reference `probe` + slot_rows and the rows each
    table was filled with: ids asked of their own table, of another table, and absent ids."""
    tables = sizes.segmented_tables
    keys, slot_rows, slot_base, num_buckets, table_ids, table_rows = segmented_layout(
        sizes.table_slots, tables, 0.95, seed, device
    )
    own_ids = torch.cat(table_ids)
    own_table = torch.cat([torch.full((ids.numel(),), t, device=device) for t, ids in enumerate(table_ids)])
    own_rows = torch.cat(table_rows)
    absent = distinct_ids(own_ids.numel() // 4 + 1, seed + 99, device)
    absent = absent[~torch.isin(absent, own_ids)]
    gen = torch.Generator().manual_seed(seed)
    absent_table = torch.randint(0, tables, (absent.numel(),), generator=gen).to(device)
    other_table = (own_table + 1) % tables  # the same ids asked of the next table
    other_rows = torch.full_like(own_rows, -1)
    for t in range(tables):  # unless that table happens to hold the id too
        mask = other_table == t
        other_rows[mask] = rows_of(table_ids[t], table_rows[t])(own_ids[mask])
    ids = torch.cat([own_ids, own_ids, absent])
    feature = torch.cat([own_table, other_table, absent_table])
    want = torch.cat(
        [own_rows, other_rows, torch.full((absent.numel(),), -1, dtype=torch.int64, device=device)]
    )
    order = torch.randperm(ids.numel(), generator=gen).to(device)
    ids, feature, want = ids[order], feature[order], want[order]
    got = kc.cuckoo_lookup_segmented(keys, slot_rows, feature, ids, slot_base, num_buckets)
    slot = probe(keys, ids, slot_base[feature], num_buckets[feature])
    reference = torch.where(slot >= 0, slot_rows[slot.clamp(min=0)].to(torch.int64), -1)
    facts = {"equals_reference": torch.equal(got, reference), "rows_as_inserted": torch.equal(got, want)}
    return _result(facts, queries=ids.numel(), tables=tables)


# --- the insert kernel under contention -------------------------------------------------------


def stress_insert(device: torch.device, sizes: CheckSizes, seed: int = 4) -> dict:
    """Many CTAs inserting at once, repeated with other ids; every invariant checked after each.

    - fill: an empty table to load 0.95 in one launch (tens of thousands of CTAs on a GPU);
    - hot buckets: a table of ``hot_buckets`` buckets given 1.5x its capacity in one launch, so
      lanes of many CTAs fight for the same bucket locks and many pairs must come back homeless;
    - batches: launches of ``batch`` new ids into one table until 0.95, reusing one lock array,
      as a training step admits ids;
    - two streams (GPU only): two launches of disjoint ids into one table at once, sharing locks.
    """
    facts: dict[str, bool] = {}
    figures: dict[str, int] = {"homeless_hot": 0, "homeless_fill": 0}
    for r in range(sizes.repeats):
        s = seed * 100 + r
        # fill
        nb = sizes.stress_slots // SLOTS
        table, locks = empty_storage(nb, device), torch.zeros(nb, dtype=torch.int32, device=device)
        ids = distinct_ids(int(sizes.stress_slots * 0.95), s, device)
        rows = _rows(ids.numel(), s, device)
        h_ids, h_rows = kc.cuckoo_insert(table, ids, rows, locks=locks)
        _merge(facts, "fill", table_facts(table, ids, rows, h_ids, h_rows, locks))
        figures["homeless_fill"] += h_ids.numel()
        # hot buckets
        nb = sizes.hot_buckets
        table, locks = empty_storage(nb, device), torch.zeros(nb, dtype=torch.int32, device=device)
        ids = distinct_ids(nb * SLOTS * 3 // 2, s + 7, device)
        rows = _rows(ids.numel(), s + 7, device)
        h_ids, h_rows = kc.cuckoo_insert(table, ids, rows, max_rounds=sizes.hot_rounds, locks=locks)
        _merge(facts, "hot_buckets", table_facts(table, ids, rows, h_ids, h_rows, locks))
        facts["hot_buckets_filled_to_0.9"] = facts.get("hot_buckets_filled_to_0.9", True) and (
            int((table.keys != EMPTY_KEY).sum()) >= 0.9 * nb * SLOTS
        )
        figures["homeless_hot"] += h_ids.numel()
        # batches
        nb = sizes.stress_slots // SLOTS
        table, locks = empty_storage(nb, device), torch.zeros(nb, dtype=torch.int32, device=device)
        ids = distinct_ids(int(sizes.stress_slots * 0.95), s + 11, device)
        rows = _rows(ids.numel(), s + 11, device)
        homeless = [
            kc.cuckoo_insert(table, ids[i : i + sizes.batch], rows[i : i + sizes.batch], locks=locks)
            for i in range(0, ids.numel(), sizes.batch)
        ]
        h_ids = torch.cat([h for h, _ in homeless])
        h_rows = torch.cat([r_ for _, r_ in homeless])
        _merge(facts, "batches", table_facts(table, ids, rows, h_ids, h_rows, locks))
        if device.type == "cuda":
            _merge(facts, "two_streams", _two_streams(device, sizes, s + 13))
    return _result(facts, **figures, repeats=sizes.repeats)


def _two_streams(device: torch.device, sizes: CheckSizes, seed: int) -> dict[str, bool]:
    nb = sizes.stress_slots // SLOTS
    table, locks = empty_storage(nb, device), torch.zeros(nb, dtype=torch.int32, device=device)
    ids = distinct_ids(int(sizes.stress_slots * 0.9), seed, device)
    rows = _rows(ids.numel(), seed, device)
    halves = [
        (ids[: ids.numel() // 2], rows[: ids.numel() // 2]),
        (ids[ids.numel() // 2 :], rows[ids.numel() // 2 :]),
    ]
    outs = [
        (torch.empty_like(i), torch.empty_like(r), torch.empty(i.numel(), dtype=torch.int8, device=device))
        for i, r in halves
    ]
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream(device))
    # launch_insert (not cuckoo_insert, whose compaction syncs) so both launches are in flight at once.
    for stream, (i, r), (oi, orow, hl) in zip(streams, halves, outs, strict=True):
        with torch.cuda.stream(stream):
            kc.launch_insert(i, r, table.keys, table.slot_rows, locks, oi, orow, hl, nb, 128, kc.INSERT_BLOCK)
    torch.cuda.synchronize(device)
    h_ids = torch.cat([oi[hl.bool()] for oi, _, hl in outs])
    h_rows = torch.cat([orow[hl.bool()].to(torch.int64) for _, orow, hl in outs])
    return table_facts(table, ids, rows, h_ids, h_rows, locks)


def _merge(facts: dict[str, bool], scenario: str, new: dict[str, bool]) -> None:
    """A fact of a scenario holds only if it held in every repetition."""
    for name, ok in new.items():
        key = f"{scenario}_{name}"
        facts[key] = facts.get(key, True) and bool(ok)


CHECKS = {
    "hash": check_hash,
    "lookup": check_lookup,
    "insert": check_insert,
    "segmented_lookup": check_segmented,
    "insert_stress": stress_insert,
}
