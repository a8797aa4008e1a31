"""Microbenchmark of the Triton cuckoo kernels: bulk insert to a target load, then lookups.

    python -m kernels.bench_cuckoo [--slots 4194304] [--load 0.9] [--lookups 4194304] [--iters 10] [--tables 9]
    ncu --set full -k regex:"_insert_kernel|_lookup_kernel|_lookup_segmented_kernel" -c 6 \
        python -m kernels.bench_cuckoo --iters 2
    python -m kernels.bench_cuckoo --interpret     # no GPU: tiny sizes under Triton's interpreter

Per iteration the insert is timed on an empty table of ``--slots`` slots filled to ``--load`` in
one launch (ids pre-generated and distinct; the reset of the table is not timed), and the lookup
on ``--lookups`` queries, ``--hit-rate`` of them present. Times are CUDA events around the kernel
launches only (no host compaction of homeless ids); the medians give inserts/s and finds/s.

The segmented lookup (``IdPartition``'s) gets the same number of slots split into ``--tables``
tables of sizes 1 : 2 : ... : tables, back to back in one pair of tensors, each filled to
``--load`` by the insert kernel (not timed); its ``--lookups`` queries pick a table at random
(weighted by size), ``--hit-rate`` of them present in it, and are checked against the reference
``probe``. The last iteration is checked (every pair stored once in one of its buckets or reported homeless,
lookups exact, locks released; exit 1 otherwise): on a GPU this is the test of the kernels under
real concurrency between CTAs, which the interpreter cannot run. The last line printed is one JSON object.
Without a GPU it exits 2, unless ``--interpret`` (CPU tensors, Triton's interpreter, small sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

INTERPRET_DEFAULTS = {"slots": 4096, "lookups": 4096, "iters": 1, "warmup": 0}
GPU_DEFAULTS = {"slots": 2**22, "lookups": 2**22, "iters": 10, "warmup": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (or cuda:N); --interpret runs on cpu")
    parser.add_argument(
        "--interpret", action="store_true", help="run under TRITON_INTERPRET=1 on CPU, tiny sizes"
    )
    parser.add_argument(
        "--slots", type=int, default=None, help="table slots (default 2**22; 4096 with --interpret)"
    )
    parser.add_argument("--load", type=float, default=0.9, help="fill the table to this load factor")
    parser.add_argument("--lookups", type=int, default=None, help="queries per lookup launch")
    parser.add_argument("--hit-rate", type=float, default=0.5, help="fraction of queries that are stored")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (compilation)")
    parser.add_argument("--max-rounds", type=int, default=128, help="insert rounds before ids go homeless")
    parser.add_argument(
        "--tables", type=int, default=9, help="tables of the segmented lookup (sizes 1 : 2 : ...)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = INTERPRET_DEFAULTS if args.interpret else GPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.slots < 8 or args.slots % 8:
        parser.error("--slots must be a positive multiple of 8")
    if not 0 < args.load <= 1 or not 0 <= args.hit_rate <= 1:
        parser.error("--load must be in (0, 1] and --hit-rate in [0, 1]")
    if args.tables < 1 or args.tables * (args.tables + 1) // 2 > args.slots // 8:
        parser.error("--tables must be >= 1, with at least tables * (tables + 1) / 2 buckets in --slots")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels are decorated: before importing them
        args.device = "cpu"
    elif __import__("triton").knobs.runtime.interpret:  # TRITON_INTERPRET, read as triton reads it
        print(
            "bench_cuckoo: TRITON_INTERPRET is set: pass --interpret, or unset it to time the GPU",
            file=sys.stderr,
        )
        return 2

    import torch

    if not args.interpret and not torch.cuda.is_available():
        print(
            "bench_cuckoo: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to time. "
            "Run it on a machine with an NVIDIA GPU, or pass --interpret to run tiny sizes under "
            "Triton's interpreter on CPU.",
            file=sys.stderr,
        )
        return 2

    from kernels import cuckoo as kc
    from kernels.cuckoo_layout import EMPTY_KEY, MIX_1, SLOTS, bucket_pair, empty_storage

    device = torch.device(args.device)
    num_buckets = args.slots // SLOTS
    n_fill = int(args.slots * args.load)
    n_hit = int(args.lookups * args.hit_rate)
    n_miss = args.lookups - n_hit
    # Distinct ids: k * (odd constant) is a bijection of int64 (mod 2**64); k >= 1 never gives EMPTY_KEY.
    ids = torch.arange(1, n_fill + n_miss + 1, dtype=torch.int64, device=device) * MIX_1
    fill_ids, miss_ids = ids[:n_fill], ids[n_fill:]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    fill_rows = torch.randperm(n_fill, generator=gen).to(device=device, dtype=torch.int32)
    hit_index = torch.randint(0, max(n_fill, 1), (n_hit,), generator=gen).to(device)
    order = torch.randperm(args.lookups, generator=gen).to(device)
    queries = torch.cat([fill_ids[hit_index], miss_ids])[order].contiguous()

    table = empty_storage(num_buckets, device)
    locks = torch.zeros(num_buckets, dtype=torch.int32, device=device)
    out_ids = torch.empty(n_fill, dtype=torch.int64, device=device)
    out_rows = torch.empty(n_fill, dtype=torch.int32, device=device)
    homeless = torch.empty(n_fill, dtype=torch.int8, device=device)
    found = torch.empty_like(queries)
    insert_block = kc.INSERT_BLOCK if device.type == "cuda" else kc.INTERPRET_BLOCK
    lookup_block = kc.LOOKUP_BLOCK if device.type == "cuda" else kc.INTERPRET_BLOCK

    def reset() -> None:
        table.keys.fill_(EMPTY_KEY)
        table.slot_rows.fill_(-1)

    def insert() -> None:
        kc.launch_insert(
            fill_ids, fill_rows, table.keys, table.slot_rows, locks, out_ids, out_rows, homeless,
            num_buckets, args.max_rounds, insert_block,
        )  # fmt: skip

    def lookup() -> None:
        kc.launch_lookup(queries, table.keys, table.slot_rows, num_buckets, found, lookup_block)

    insert_ms = [timed(insert, device, before=reset) for _ in range(args.warmup + args.iters)][args.warmup :]
    lookup_ms = [timed(lookup, device) for _ in range(args.warmup + args.iters)][args.warmup :]

    # Check the last iteration: the table holds each inserted id at most once, in one of its
    # buckets, with keys and rows consistent; every inserted id maps to its row unless it ended
    # homeless (a lane left homeless may carry a displaced resident: that id is the one not stored);
    # no lock is left taken; and the timed lookups found exactly those rows.
    used = table.keys != EMPTY_KEY
    stored = table.keys[used]
    slot_bucket = torch.nonzero(used).squeeze(1) // SLOTS
    first, second = bucket_pair(stored, num_buckets)
    left = homeless.bool()
    not_stored = torch.isin(fill_ids, out_ids[left])
    want_fill = torch.where(not_stored, -1, fill_rows.to(torch.int64))
    miss_rows = torch.full((n_miss,), -1, dtype=torch.int64, device=device)
    want_found = torch.cat([want_fill[hit_index], miss_rows])[order]
    checks = {
        "rows_match_keys": torch.equal(used, table.slot_rows != -1),
        "stored_once": torch.unique(stored).numel() == stored.numel(),
        "in_own_bucket": bool(((slot_bucket == first) | (slot_bucket == second)).all()),
        "stored_or_homeless": stored.numel() + int(left.sum()) == n_fill
        and int(not_stored.sum()) == int(left.sum()),
        "only_inserted_ids": bool(torch.isin(stored, fill_ids).all()),
        "inserted_rows": torch.equal(kc.cuckoo_lookup(table, fill_ids), want_fill),
        "lookups": torch.equal(found, want_found),
        "locks_released": int(locks.abs().sum()) == 0,
    }
    segmented_ms, segmented_checks = bench_segmented(args, device, ids)
    checks.update(segmented_checks)
    checked = all(checks.values())
    if not checked:
        print(f"bench_cuckoo: CHECK FAILED: {[k for k, ok in checks.items() if not ok]}", file=sys.stderr)

    result = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "interpret": args.interpret,
        "slots": args.slots,
        "num_buckets": num_buckets,
        "inserted": n_fill,
        "homeless": int(left.sum()),
        "load_factor": round(stored.numel() / args.slots, 6),
        "insert_ms": round(statistics.median(insert_ms), 4),
        "inserts_per_s": n_fill / (statistics.median(insert_ms) / 1e3),
        "lookups": args.lookups,
        "hit_rate": args.hit_rate,
        "lookup_ms": round(statistics.median(lookup_ms), 4),
        "lookups_per_s": args.lookups / (statistics.median(lookup_ms) / 1e3),
        "tables": args.tables,
        "segmented_lookup_ms": round(statistics.median(segmented_ms), 4),
        "segmented_lookups_per_s": args.lookups / (statistics.median(segmented_ms) / 1e3),
        "iters": args.iters,
        "checked": checked,
    }
    print(
        f"insert {n_fill} ids into {args.slots} slots: {result['insert_ms']} ms "
        f"({result['inserts_per_s']:.3g}/s, load {result['load_factor']:.4f}, {result['homeless']} homeless); "
        f"lookup {args.lookups} ids: {result['lookup_ms']} ms ({result['lookups_per_s']:.3g}/s); "
        f"segmented lookup over {args.tables} tables: {result['segmented_lookup_ms']} ms "
        f"({result['segmented_lookups_per_s']:.3g}/s); checked={checked}"
    )
    print(json.dumps(result))
    return 0 if checked else 1


def bench_segmented(args: argparse.Namespace, device, ids) -> tuple[list[float], dict[str, bool]]:
    """Times of the segmented lookup over ``args.tables`` tables back to back, and its checks.

    ``ids`` are distinct; table t is filled with the next ``fill_t`` of them, local rows
    0..fill_t - 1; the ids left over are the misses (asked of a random table)."""
    import torch

    from kernels import cuckoo as kc
    from kernels.cuckoo_layout import EMPTY_KEY, SLOTS, TableStorage, probe

    weights = range(1, args.tables + 1)
    buckets = [max(1, (args.slots // SLOTS) * w // sum(weights)) for w in weights]
    bases = [sum(buckets[:t]) * SLOTS for t in range(args.tables)]
    fills = [int(b * SLOTS * args.load) for b in buckets]
    starts = [sum(fills[:t]) for t in range(args.tables)]
    keys = torch.full((sum(buckets) * SLOTS,), EMPTY_KEY, dtype=torch.int64, device=device)
    slot_rows = torch.full((keys.numel(),), -1, dtype=torch.int32, device=device)
    homeless = []
    for base, b, start, fill in zip(bases, buckets, starts, fills, strict=True):
        storage = (keys[base : base + b * SLOTS], slot_rows[base : base + b * SLOTS])
        view = TableStorage(*storage, b)
        left, _ = kc.cuckoo_insert(view, ids[start : start + fill], torch.arange(fill, device=device), args.max_rounds)
        homeless.append(left)
    stored = ids[: sum(fills)]
    stored_table = torch.repeat_interleave(torch.arange(args.tables), torch.tensor(fills)).to(device)
    stored_row = torch.cat([torch.arange(fill) for fill in fills]).to(device)
    stored_row[torch.isin(stored, torch.cat(homeless))] = -1  # homeless: not stored
    spare = ids[sum(fills) :]

    gen = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    n_hit = int(args.lookups * args.hit_rate) if stored.numel() else 0
    n_miss = args.lookups - n_hit
    hit = torch.randint(0, max(stored.numel(), 1), (n_hit,), generator=gen).to(device)
    miss = torch.randint(0, max(spare.numel(), 1), (n_miss,), generator=gen).to(device)
    miss_table = torch.multinomial(
        torch.tensor(buckets, dtype=torch.float), max(n_miss, 1), replacement=True, generator=gen
    )
    order = torch.randperm(args.lookups, generator=gen).to(device)
    queries = torch.cat([stored[hit], spare[miss]])[order].contiguous()
    feature = torch.cat([stored_table[hit], miss_table[:n_miss].to(device)])[order].contiguous()
    slot_base = torch.tensor(bases, dtype=torch.int64, device=device)
    num_buckets = torch.tensor(buckets, dtype=torch.int64, device=device)
    found = torch.empty_like(queries)
    block = kc.LOOKUP_BLOCK if device.type == "cuda" else kc.INTERPRET_BLOCK

    def lookup() -> None:
        kc.launch_lookup_segmented(queries, feature, slot_base, num_buckets, keys, slot_rows, found, block)

    times = [timed(lookup, device) for _ in range(args.warmup + args.iters)][args.warmup :]
    # The reference (IdPartition.lookup's torch path), and the rows the ids were inserted with.
    slot = probe(keys, queries, slot_base[feature], num_buckets[feature])
    reference = torch.where(slot >= 0, slot_rows[slot.clamp(min=0)].to(torch.int64), -1)
    want = torch.cat([stored_row[hit], torch.full((n_miss,), -1, dtype=torch.int64, device=device)])[order]
    checks = {
        "segmented_reference": torch.equal(found, reference),
        "segmented_rows": torch.equal(found, want),
    }
    return times, checks


def timed(fn, device, before=None) -> float:
    """Milliseconds of ``fn()``: CUDA events on a GPU, wall clock under the interpreter."""
    import torch

    if before is not None:
        before()
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


if __name__ == "__main__":
    sys.exit(main())
