"""The cuckoo kernels timed at HierarchicalKV's published setting (used by `bench/gpu_check.py`).

HierarchicalKV's README benchmarks a pure-HBM table of 64M uint64 keys with float32 values of dim
64, 1,048,576 keys per operation, at load factors 0.5, 0.75 and 1.0 (A100 80GB). Here, at one load:

- ``lookups``: the id -> row kernel on 1M present ids (HKV's ``find*``, which returns addresses);
- ``find_values``: the same plus gathering each id's dim-64 float32 row (HKV's ``find``);
- ``segmented_lookups``: 1M ids over ``tables`` tables of sizes 1 : 2 : ... in one launch;
- ``inserts``: 1M new ids into the table at that load, one launch (table restored between runs,
  untimed); ``insert_assign`` also writes their value rows (HKV's ``insert_or_assign``).

Every result is checked (rows found, homeless accounted, locks released). With ``profile=True``
only lookup, segmented lookup and insert run once each, after the fills, so that ncu can skip the
fill launches by count.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from kernel_checks import distinct_ids, rows_of, segmented_layout

from kernels import cuckoo as kc
from kernels.cuckoo_layout import SLOTS, empty_storage

Timer = Callable[..., float]


def bench_load(device: torch.device, sizes, load: float, timed: Timer, profile: bool = False) -> dict:
    cuda = device.type == "cuda"
    lookup_block = kc.LOOKUP_BLOCK if cuda else kc.INTERPRET_BLOCK
    insert_block = kc.INSERT_BLOCK if cuda else kc.INTERPRET_BLOCK
    num_buckets = sizes.capacity // SLOTS
    n_fill, batch = int(sizes.capacity * load), sizes.batch
    ids = distinct_ids(n_fill + batch, seed=int(load * 1000), device=device)
    fill_ids, new_ids = ids[:n_fill], ids[n_fill:]
    rows = torch.arange(n_fill + batch, dtype=torch.int32, device=device)
    fill_rows, new_rows = rows[:n_fill], rows[n_fill:]

    # The table at `load` (untimed), one insert launch.
    table = empty_storage(num_buckets, device)
    locks = torch.zeros(num_buckets, dtype=torch.int32, device=device)
    homeless_fill, _ = kc.cuckoo_insert(table, fill_ids, fill_rows, locks=locks)
    saved = table.keys.clone(), table.slot_rows.clone()
    # The segmented tables (untimed), one insert launch each.
    seg_keys, seg_rows, seg_base, seg_buckets, table_ids, table_rows = segmented_layout(
        sizes.capacity, sizes.tables, load, seed=int(load * 1000) + 1, device=device
    )

    gen = torch.Generator().manual_seed(0)
    queries = fill_ids[torch.randint(0, n_fill, (batch,), generator=gen).to(device)].contiguous()
    found = torch.empty_like(queries)
    counts = torch.tensor([t.numel() for t in table_ids], dtype=torch.float)
    seg_feature = torch.multinomial(counts, batch, replacement=True, generator=gen).to(device)
    seg_pick = (torch.rand(batch, generator=gen).to(device) * counts.to(device)[seg_feature]).long()
    offsets = torch.cumsum(torch.cat([torch.zeros(1), counts[:-1]]), 0).long().to(device)
    seg_queries = torch.cat(table_ids)[offsets[seg_feature] + seg_pick].contiguous()
    seg_want = torch.cat(table_rows)[offsets[seg_feature] + seg_pick]
    seg_found = torch.empty_like(seg_queries)
    out_ids = torch.empty_like(new_ids)
    out_rows = torch.empty_like(new_rows)
    homeless = torch.empty(batch, dtype=torch.int8, device=device)
    values = torch.zeros(sizes.capacity, sizes.dim, device=device) if not profile else None
    gathered = torch.empty(batch, sizes.dim, device=device)
    new_values = torch.ones(batch, sizes.dim, device=device)

    def lookup() -> None:
        kc.launch_lookup(queries, table.keys, table.slot_rows, num_buckets, found, lookup_block)

    def segmented() -> None:
        kc.launch_lookup_segmented(
            seg_queries, seg_feature, seg_base, seg_buckets, seg_keys, seg_rows, seg_found, lookup_block
        )

    def restore() -> None:
        table.keys.copy_(saved[0])
        table.slot_rows.copy_(saved[1])

    def insert() -> None:
        kc.launch_insert(
            new_ids,
            new_rows,
            table.keys,
            table.slot_rows,
            locks,
            out_ids,
            out_rows,
            homeless,
            num_buckets,
            128,
            insert_block,
        )

    def find_values() -> None:
        lookup()
        torch.index_select(values, 0, found.clamp(min=0), out=gathered)

    def insert_assign() -> None:
        insert()
        values.index_copy_(0, new_rows.to(torch.int64), new_values)

    ops: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
        "lookup": (lookup, None),
        "segmented_lookup": (segmented, None),
        "insert": (insert, restore),
    }
    if not profile:
        ops.update({"find_values": (find_values, None), "insert_assign": (insert_assign, restore)})
    runs = 1 if profile else sizes.warmup + sizes.iters
    ms = {
        name: statistics.median(
            [timed(fn, device, before) for _ in range(runs)][-max(1, runs - sizes.warmup) :]
        )
        for name, (fn, before) in ops.items()
    }

    # Checks of the last runs: every queried id at its row (none was left homeless at this load, or
    # it reads -1), the new ids stored or homeless, every lock released.
    want = torch.where(torch.isin(queries, homeless_fill), -1, rows_of(fill_ids, fill_rows)(queries))
    left = homeless.bool()
    not_stored = torch.isin(new_ids, out_ids[left])
    new_want = torch.where(not_stored, -1, new_rows.to(torch.int64))
    checks = {
        "lookups": torch.equal(found, want),
        "segmented_lookups": torch.equal(seg_found, seg_want),
        "inserts": torch.equal(kc.cuckoo_lookup(table, new_ids), new_want)
        and int(not_stored.sum()) == int(left.sum()),
        "locks_released": int(torch.count_nonzero(locks)) == 0,
    }
    result = {
        "load": load,
        "capacity": sizes.capacity,
        "batch": batch,
        "dim": sizes.dim,
        "fill_homeless": homeless_fill.numel(),
        "insert_homeless": int(left.sum()),
        "checks": checks,
        "checked": all(checks.values()),
        **{f"{name}_ms": round(t, 4) for name, t in ms.items()},
        "lookups_per_s": batch / (ms["lookup"] / 1e3),
        "segmented_lookups_per_s": batch / (ms["segmented_lookup"] / 1e3),
        "inserts_per_s": batch / (ms["insert"] / 1e3),
    }
    if not profile:
        result["find_values_per_s"] = batch / (ms["find_values"] / 1e3)
        result["insert_assign_per_s"] = batch / (ms["insert_assign"] / 1e3)
    return result
