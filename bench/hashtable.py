"""Id -> row hash map on CPU: gpurec's CuckooTable against a Python dict and TorchRec's MCH remap.

All three map the same N distinct random int64 ids (rows 0..N-1, inserted in batches of
``--batch``) and then answer the same pre-generated query batches, in the same process:

- cuckoo: `gpurec.embedding.cuckoo.CuckooTable`, torch backend, ``buckets_for_rows(N)`` buckets
  (``--load-factor`` sizes it for that final load instead). ``insert`` per batch, ``lookup`` per
  query batch (read-only; absent ids come back as -1).
- dict: the naive Python way, given tensor batches: ``d.update(zip(ids.tolist(), rows.tolist()))``
  (faster than a ``d[i] = r`` loop, so the ratio is conservative) and
  ``torch.tensor([d.get(i, -1) for i in ids.tolist()])``.
- mch: TorchRec's `MCHManagedCollisionModule` (DistanceLFU eviction) inside a
  `ManagedCollisionCollection`, called on KeyedJaggedTensor batches (one feature, one id per
  example) exactly as a model calls it: input hash (``v % input_hash_size``, which also keeps ids
  off MCH's int64-max "empty" sentinel), ``profile`` (training mode only: copy the ids into a
  history buffer and, every ``eviction_interval`` calls, ``torch.unique`` the history, match it
  against the table, admit new ids into free or evicted slots by eviction score and re-sort the
  whole table), then ``remap`` (``searchsorted`` in the sorted id array; misses go to the
  reserved last slot). Its ``zch_size`` is the cuckoo table's slot count, i.e. the same id
  capacity; one slot is reserved for misses.

What each MCH figure measures, and how like-for-like it is:

- ``inserts_per_s``: training-mode forward over the N distinct ids with eviction_interval 1, so
  every id is admitted in the call where it first appears, as ``CuckooTable.insert`` does. It
  includes the remap and the KJT handling, and every call re-sorts the whole table
  (O(zch_size log zch_size) per batch): that is MCH's design (sorted array + periodic batch
  rebuild), not a mis-use, but it is the reason the figure falls with N.
- ``inserts_per_s_amortised``: the same with eviction_interval ``--mch-interval`` (ids only get
  their own row up to that many calls after first seen; meanwhile they share the miss row), which
  amortises the re-sort. Not the same semantics as an insert.
- ``lookups_per_s`` / ``lookups_per_s_large_batch``: eval-mode forward (profile is a no-op), i.e.
  input hash + searchsorted remap + KJT: a pure read-only lookup, the like-for-like counterpart of
  ``CuckooTable.lookup``.
- ``train_lookups_per_s`` (and ``_amortised``): training-mode forward on the query batches, which is
  what an MCH model pays per step: absent ids are admitted or evicted at each interval, so it does
  more work than a read-only lookup (the cuckoo counterpart would be lookup + insert of misses).

Queries: a ``--hit-rate`` share of present ids drawn Zipf(``--zipf``) over a random ranking of the
stored ids, the rest uniform over N never-inserted ids. ``--query-batches`` batches of ``--batch``
plus one of ``--large-batch`` are generated before timing. Inserts and read-only lookups alternate
the paths over ``--rounds`` rounds (fresh tables per insert round) and report each path's median;
the stateful MCH training-mode runs are timed once. Lookup results are checked equal across the
three maps before timing. The "gpu_estimate" block is arithmetic on paper, not a measurement (no
GPU here). The last stdout line is one JSON object.

    .venv/bin/python bench/hashtable.py            # N = 1M, batch 8192, ~40 s on 2 cores
    .venv/bin/python bench/hashtable.py --quick    # N = 50k smoke run, ~5 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchrec
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.cuckoo import SLOTS, CuckooTable, buckets_for_rows

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MCH_INPUT_HASH_SIZE = INT64_MAX  # v % (2**63 - 1): every id in [0, 2**63 - 2], never the sentinel
FEATURE = "f"

# --- GPU on paper ------------------------------------------------------------------------------
SECTOR_BYTES = 32
# One lane per query: 2 random buckets x 64 B of keys = 4 sectors, the hit's int32 row = 1 sector,
# the query id (8 B) and the int64 output (8 B) streamed, i.e. coalesced.
BYTES_PER_LOOKUP = 2 * 2 * SECTOR_BYTES + SECTOR_BYTES + 8 + 8
A100_BANDWIDTH = {"a100_40gb_sxm": 1.555e12, "a100_80gb_pcie": 1.935e12, "a100_80gb_sxm": 2.039e12}
ASSUMED_EFFICIENCY = 0.6  # share of peak HBM bandwidth random 32 B gathers reach (assumption)
# NVIDIA-Merlin/HierarchicalKV README benchmark, pure-HBM table: A100 80GB PCIe, uint64 keys,
# float32 x 8 values, capacity 128M, load factor 0.75, 1,048,576 keys per op, Billion-KV/s.
HKV_FIND = 2.452e9  # `find`: copies the values out
HKV_FIND_PTR = 3.374e9  # `find*`: returns value addresses, the closer analogue of id -> row


def gpu_estimate() -> dict[str, object]:
    bound = {name: bw / BYTES_PER_LOOKUP for name, bw in A100_BANDWIDTH.items()}
    same_card = bound["a100_80gb_pcie"]  # HKV's figures are from the 80GB PCIe card
    expected = same_card * ASSUMED_EFFICIENCY
    return {
        "measured": False,
        "kernel": "kernels/cuckoo.py lookup (Triton), one lane per query id",
        "bytes_per_lookup": BYTES_PER_LOOKUP,
        "lookups_per_s_bound": {name: round(v, -6) for name, v in bound.items()},
        "assumed_bandwidth_efficiency": ASSUMED_EFFICIENCY,
        "lookups_per_s_expected_a100_80gb_pcie": round(expected, -6),
        "hkv_find_per_s": HKV_FIND,
        "hkv_find_ptr_per_s": HKV_FIND_PTR,
        "hkv_source": (
            "NVIDIA-Merlin/HierarchicalKV README benchmark: A100 80GB PCIe, uint64 keys, dim 8, "
            "capacity 128M, load factor 0.75, 1M keys per op (find 2.452, find* 3.374 B-KV/s)"
        ),
        "ratio_expected_vs_hkv_find": round(expected / HKV_FIND, 2),
        "ratio_expected_vs_hkv_find_ptr": round(expected / HKV_FIND_PTR, 2),
        "ratio_bound_vs_hkv_find": round(same_card / HKV_FIND, 2),
        "reasoning": (
            "Estimate, not a measurement. Memory-bound: a lookup of a random id in a table much "
            "larger than L2 touches 2 buckets x 64 B of keys = 4 x 32 B sectors, 1 sector for the "
            "int32 row, plus the 8 B query and 8 B output streamed: 176 B. Peak HBM / 176 B gives "
            "8.8 G/s (40GB, 1.555 TB/s) to 11.6 G/s (80GB SXM, 2.039 TB/s); on HKV's card (80GB "
            "PCIe, 1.935 TB/s) 11.0 G/s, times an assumed 60% efficiency for random sector gathers "
            "= 6.6 G/s expected. Ignores L2 hits (a 1M-id table, 12.6 MB, fits in A100's 40 MB L2 "
            "and would run faster), compute, and absent ids (no row read). HKV's find also copies "
            "32 B of values per key, so find* is the closer comparison."
        ),
    }


# --- data ----------------------------------------------------------------------------------------


def distinct_ids(count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct random int64 ids (never EMPTY_KEY), in random order."""
    ids = torch.empty(0, dtype=torch.int64)
    while ids.numel() < count:
        more = torch.randint(INT64_MIN + 1, INT64_MAX, (count + 1024,), generator=generator)
        ids = torch.cat([ids, more]).unique()
    return ids[torch.randperm(ids.numel(), generator=generator)[:count]]


def make_queries(
    present: torch.Tensor, absent: torch.Tensor, sizes: list[int], hit_rate: float, alpha: float, seed: int
) -> list[torch.Tensor]:
    """Query batches: Zipf(alpha) over a random ranking of ``present``, uniform over ``absent``."""
    generator = torch.Generator().manual_seed(seed)
    ranking = present[torch.randperm(present.numel(), generator=generator)]
    cdf = torch.arange(1, present.numel() + 1, dtype=torch.float64).pow(-alpha).cumsum(0)
    cdf /= cdf[-1].clone()
    batches = []
    for size in sizes:
        rank = torch.searchsorted(cdf, torch.rand(size, generator=generator, dtype=torch.float64))
        hits = ranking[rank.clamp(max=present.numel() - 1)]
        misses = absent[torch.randint(0, absent.numel(), (size,), generator=generator)]
        batches.append(torch.where(torch.rand(size, generator=generator) < hit_rate, hits, misses))
    return batches


def kjt_of(ids: torch.Tensor) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[FEATURE], values=ids, lengths=torch.ones(ids.numel(), dtype=torch.int32)
    )


# --- the three maps ------------------------------------------------------------------------------


def cuckoo_insert(num_buckets: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> CuckooTable:
    table = CuckooTable(num_buckets)
    for ids, rows in batches:
        homeless, _ = table.insert(ids, rows)
        if homeless.numel():
            raise RuntimeError(f"cuckoo insert left {homeless.numel()} ids homeless")
    return table


def dict_insert(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, int]:
    table: dict[int, int] = {}
    for ids, rows in batches:
        table.update(zip(ids.tolist(), rows.tolist(), strict=True))
    return table


def dict_lookup(table: dict[int, int], ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor([table.get(i, -1) for i in ids.tolist()], dtype=torch.int64)


def build_mch(zch_size: int, interval: int) -> tuple[ManagedCollisionCollection, MCHManagedCollisionModule]:
    module = MCHManagedCollisionModule(
        zch_size=zch_size,
        device=torch.device("cpu"),
        eviction_policy=DistanceLFU_EvictionPolicy(),
        eviction_interval=interval,
        input_hash_size=MCH_INPUT_HASH_SIZE,
        input_hash_func=lambda values, size: torch.remainder(values, size),
    )
    config = EmbeddingConfig(name="t", num_embeddings=zch_size, embedding_dim=8, feature_names=[FEATURE])
    collection = ManagedCollisionCollection({"t": module}, [config])
    return collection.train(), module


def mch_fill(
    collection: ManagedCollisionCollection,
    module: MCHManagedCollisionModule,
    kjts: list[KeyedJaggedTensor],
    interval: int,
) -> None:
    """Training-mode forward over the insert batches, padded with empty batches up to the next
    eviction so that every id has been admitted when it returns."""
    mch_run(collection, kjts, len(kjts))
    mch_run(collection, [kjt_of(torch.empty(0, dtype=torch.int64))], -len(kjts) % interval)
    stored = module.output_size() - 1 - int(module.open_slots())
    if stored != sum(k.values().numel() for k in kjts):
        raise AssertionError(f"MCH holds {stored} ids after the fill")


def mch_run(collection: ManagedCollisionCollection, kjts: list[KeyedJaggedTensor], steps: int) -> torch.Tensor:
    out = torch.empty(0)
    for i in range(steps):
        out = collection(kjts[i % len(kjts)]).values()
    return out


# --- timing --------------------------------------------------------------------------------------


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="distinct ids inserted")
    parser.add_argument("--batch", type=int, default=8192, help="ids per insert / query batch")
    parser.add_argument("--large-batch", type=int, default=1_000_000, help="ids in the one large query batch")
    parser.add_argument("--query-batches", type=int, default=32, help="distinct query batches per lookup pass")
    parser.add_argument("--hit-rate", type=float, default=0.9, help="share of queried ids that are stored")
    parser.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of the stored ids' popularity")
    parser.add_argument("--load-factor", type=float, help="size the cuckoo table for this final load")
    parser.add_argument("--mch-n", type=int, help="ids for MCH if N is too slow for it (default: N)")
    parser.add_argument("--mch-interval", type=int, default=10, help="eviction interval of the amortised MCH run")
    parser.add_argument("--mch-steps", type=int, default=40, help="training-mode MCH query calls")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; each path's median counts")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: N 50k, large batch 100k")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.large_batch, args.mch_steps = 50_000, 100_000, 20
    if min(args.n, args.batch, args.large_batch, args.query_batches, args.rounds, args.mch_interval) < 1:
        parser.error("sizes, --rounds and --mch-interval must be positive")
    torch.set_num_threads(args.threads)
    wall_start = time.perf_counter()

    generator = torch.Generator().manual_seed(args.seed)
    everything = distinct_ids(2 * args.n, generator)
    present, absent = everything[: args.n], everything[args.n :]
    rows = torch.arange(args.n, dtype=torch.int64)
    inserts = [(present[i : i + args.batch], rows[i : i + args.batch]) for i in range(0, args.n, args.batch)]
    queries = make_queries(
        present, absent, [args.batch] * args.query_batches + [args.large_batch], args.hit_rate, args.zipf, args.seed + 1
    )
    small, large = queries[:-1], queries[-1]
    queried = args.batch * args.query_batches
    if args.load_factor:
        num_buckets = math.ceil(args.n / (SLOTS * args.load_factor))
    else:
        num_buckets = buckets_for_rows(args.n)
    log(f"N={args.n:,} ids, batch {args.batch:,}, {num_buckets:,} buckets, {args.threads} threads")

    with torch.no_grad():
        # Inserts: fresh tables each round, alternating.
        insert_times: dict[str, list[float]] = {"cuckoo": [], "dict": []}
        table, mapping = CuckooTable(1), {}
        for round_ in range(args.rounds):
            start = time.perf_counter()
            table = cuckoo_insert(num_buckets, inserts)
            insert_times["cuckoo"].append(time.perf_counter() - start)
            start = time.perf_counter()
            mapping = dict_insert(inserts)
            insert_times["dict"].append(time.perf_counter() - start)
            log(
                f"round {round_ + 1} insert: cuckoo {args.n / insert_times['cuckoo'][-1]:,.0f}/s, "
                f"dict {args.n / insert_times['dict'][-1]:,.0f}/s"
            )
        load = table.load_factor()

        # The MCH table, filled with the same ids (interval 1: each id admitted when first seen).
        mch_n = args.mch_n or args.n
        mch_zch = num_buckets * SLOTS if mch_n == args.n else buckets_for_rows(mch_n) * SLOTS
        mch_inserts = [kjt_of(present[i : min(i + args.batch, mch_n)]) for i in range(0, mch_n, args.batch)]
        mch_small = [kjt_of(q) for q in small]
        mch_large = kjt_of(large)
        collection, module = build_mch(mch_zch, interval=1)
        mch_insert_s = seconds(lambda: mch_fill(collection, module, mch_inserts, 1))
        log(f"mch insert (interval 1): {mch_n / mch_insert_s:,.0f}/s, open slots {int(module.open_slots())}")

        # The three agree before anything is timed (MCH only when it holds the same ids).
        want = dict_lookup(mapping, small[0])
        if not torch.equal(table.lookup(small[0]), want):
            raise AssertionError("cuckoo and dict lookups differ")
        collection.eval()
        if mch_n == args.n:
            mch_hit = collection(mch_small[0]).values() != mch_zch - 1
            if not torch.equal(mch_hit, want >= 0):
                raise AssertionError("MCH hits differ from the dict's")

        # Read-only lookups, alternating: cuckoo.lookup, dict, MCH eval-mode forward.
        paths: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "cuckoo": (lambda: [table.lookup(q) for q in small], lambda: table.lookup(large)),
            "dict": (lambda: [dict_lookup(mapping, q) for q in small], lambda: dict_lookup(mapping, large)),
            "mch": (lambda: mch_run(collection, mch_small, len(mch_small)), lambda: collection(mch_large)),
        }
        lookup_times: dict[str, list[float]] = {name: [] for name in paths}
        large_times: dict[str, list[float]] = {name: [] for name in paths}
        for name, (batch_fn, _) in paths.items():  # warm-up
            batch_fn()
            log(f"warm-up {name} done")
        for round_ in range(args.rounds):
            for name, (batch_fn, large_fn) in paths.items():
                lookup_times[name].append(seconds(batch_fn))
                large_times[name].append(seconds(large_fn))
            log(
                f"round {round_ + 1} lookup/s (batch {args.batch:,} | {args.large_batch:,}): "
                + ", ".join(
                    f"{name} {queried / lookup_times[name][-1]:,.0f} | {args.large_batch / large_times[name][-1]:,.0f}"
                    for name in paths
                )
            )

        # Training-mode MCH: what a step pays (admission/eviction of the queried ids included).
        collection.train()
        mch_train_s = seconds(lambda: mch_run(collection, mch_small, args.mch_steps))
        log(f"mch train lookup (interval 1): {args.mch_steps * args.batch / mch_train_s:,.0f}/s")
        amortised, amortised_module = build_mch(mch_zch, interval=args.mch_interval)
        mch_insert_amortised_s = seconds(
            lambda: mch_fill(amortised, amortised_module, mch_inserts, args.mch_interval)
        )
        mch_train_amortised_s = seconds(lambda: mch_run(amortised, mch_small, args.mch_steps))
        log(
            f"mch interval {args.mch_interval}: insert {mch_n / mch_insert_amortised_s:,.0f}/s, "
            f"train lookup {args.mch_steps * args.batch / mch_train_amortised_s:,.0f}/s"
        )

    def median_rate(times: list[float], count: int) -> float:
        return count / statistics.median(times)

    cuckoo = {
        "inserts_per_s": round(median_rate(insert_times["cuckoo"], args.n)),
        "lookups_per_s": round(median_rate(lookup_times["cuckoo"], queried)),
        "lookups_per_s_large_batch": round(median_rate(large_times["cuckoo"], args.large_batch)),
        "load_factor": round(load, 4),
        "num_buckets": num_buckets,
    }
    plain = {
        "inserts_per_s": round(median_rate(insert_times["dict"], args.n)),
        "lookups_per_s": round(median_rate(lookup_times["dict"], queried)),
        "lookups_per_s_large_batch": round(median_rate(large_times["dict"], args.large_batch)),
    }
    mch = {
        "n": mch_n,
        "zch_size": mch_zch,
        "eviction_policy": "DistanceLFU_EvictionPolicy",
        "inserts_per_s": round(mch_n / mch_insert_s),
        "lookups_per_s": round(median_rate(lookup_times["mch"], queried)),
        "lookups_per_s_large_batch": round(median_rate(large_times["mch"], args.large_batch)),
        "train_lookups_per_s": round(args.mch_steps * args.batch / mch_train_s),
        "amortised_eviction_interval": args.mch_interval,
        "inserts_per_s_amortised": round(mch_n / mch_insert_amortised_s),
        "train_lookups_per_s_amortised": round(args.mch_steps * args.batch / mch_train_amortised_s),
    }

    def ratio(a: float, b: float) -> float:
        return round(a / b, 2)

    result: dict[str, object] = {
        "bench": "hashtable",
        "n": args.n,
        "batch": args.batch,
        "large_batch": args.large_batch,
        "queries": {"hit_rate": args.hit_rate, "zipf": args.zipf, "batches": args.query_batches},
        "cuckoo": cuckoo,
        "dict": plain,
        "mch": mch,
        "ratios": {
            "cuckoo_vs_dict_insert": ratio(cuckoo["inserts_per_s"], plain["inserts_per_s"]),
            "cuckoo_vs_dict_lookup": ratio(cuckoo["lookups_per_s"], plain["lookups_per_s"]),
            "cuckoo_vs_dict_lookup_large_batch": ratio(
                cuckoo["lookups_per_s_large_batch"], plain["lookups_per_s_large_batch"]
            ),
            "cuckoo_vs_mch_insert": ratio(cuckoo["inserts_per_s"], mch["inserts_per_s"]),
            "cuckoo_vs_mch_insert_amortised": ratio(cuckoo["inserts_per_s"], mch["inserts_per_s_amortised"]),
            "cuckoo_vs_mch_lookup": ratio(cuckoo["lookups_per_s"], mch["lookups_per_s"]),
            "cuckoo_vs_mch_lookup_large_batch": ratio(
                cuckoo["lookups_per_s_large_batch"], mch["lookups_per_s_large_batch"]
            ),
            "cuckoo_vs_mch_train_lookup": ratio(cuckoo["lookups_per_s"], mch["train_lookups_per_s"]),
            "cuckoo_vs_mch_train_lookup_amortised": ratio(
                cuckoo["lookups_per_s"], mch["train_lookups_per_s_amortised"]
            ),
        },
        "baselines": f"python {platform.python_version()} dict; torchrec {torchrec.__version__} MCHManagedCollisionModule",
        "gpu_estimate": gpu_estimate(),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "seconds": round(time.perf_counter() - wall_start, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
