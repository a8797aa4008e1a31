"""Preprocessing throughput: the Polars pipeline (CPU engine) against an idiomatic pandas version.

Both turn the same logs (>= 5M impressions from the synthetic world, generated once and reused)
into the same feature rows: validation of every input day, consent filter, labels from actions of
the impression's day and the next, point-in-time user/item counters, item age, duration and the
hashed sparse ids, written as zstd Parquet, one file per day.

- polars: `gpurec.preprocess.run.preprocess` exactly as `gpurec preprocess --engine cpu` runs it:
  one day in memory at a time, counters carried between days.
- pandas: `gpurec.preprocess.reference_pandas` (vectorised merge / merge_asof / groupby-cumsum, all
  days at once in memory, the way a competent pandas user writes it) plus the same per-day
  Parquet writing.

The outputs are checked equal (same rows; ints and lists exactly, floats to 1e-6 relative). Timing
alternates the two paths over `--rounds` rounds and reports each path's median round, so a slow
spell of a shared machine does not decide the ratio; CPU seconds (all threads) are reported too.
The last stdout line is one JSON object.

    .venv/bin/python bench/preprocess.py                       # generate (once) and run
    .venv/bin/python bench/preprocess.py --data runs/raw       # reuse any gpurec log directory
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from gpurec.data import logs
from gpurec.data.generate import generate_synthetic, load_world_config
from gpurec.data.world import WorldConfig
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.reference_pandas import reference_features
from gpurec.preprocess.run import ZSTD_LEVEL, preprocess
from gpurec.preprocess.splits import SPLITS, split_of

IMPRESSIONS_PER_USER_DAY = 44.6  # what the calibrated world produces; sizes the generated world
NOW_MS = 4_102_444_800_000  # 2100-01-01: validation's "now", fixed so both paths reject the same rows


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ensure_data(args: argparse.Namespace) -> Path:
    """The log directory: --data as given, or a synthetic world sized for --impressions (cached)."""
    if args.data:
        return Path(args.data)
    users = math.ceil(args.impressions / (args.days * IMPRESSIONS_PER_USER_DAY))
    config = WorldConfig(users=users, items=int(users * 2.5), days=args.days, seed=args.seed)
    root = Path(args.work) / f"logs-u{users}-d{args.days}-s{args.seed}"
    if (root / "world.json").exists() and load_world_config(root) == config:
        return root
    shutil.rmtree(root, ignore_errors=True)
    print(f"bench: generating {config.users} users x {config.days} days into {root}", file=sys.stderr)
    generate_synthetic(config, root)
    return root


def run_polars(data: Path, out: Path) -> dict:
    return preprocess(data, out, engine="cpu", now_ms=NOW_MS).as_json()


def run_pandas(data: Path, out: Path, valid_fraction: float, test_fraction: float) -> pd.DataFrame:
    """The pandas baseline, including writing one zstd file per day like the pipeline."""
    result = reference_features(data, now_ms=NOW_MS)
    frame = result.features
    days = logs.list_days(data, "impressions")
    split = split_of(days, valid_fraction, test_fraction)
    day = frame["ts"].dt.strftime("%Y-%m-%d")
    shutil.rmtree(out, ignore_errors=True)
    for name, group in frame.groupby(day, sort=True):
        path = out / split[name] / f"day={name}" / "part-00000.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        group.to_parquet(path, compression="zstd", compression_level=ZSTD_LEVEL, index=False)
    return frame


def check_equal(polars_out: Path, pandas_frame: pd.DataFrame) -> int:
    """Assert the two outputs hold the same rows and values; return the row count."""
    manifest = load_manifest(polars_out)
    files = [f for split in SPLITS for f in manifest.split_files(split, polars_out)]
    got = pl.concat([pl.read_parquet(f) for f in files]).sort("ts", "request_id", "item_id", maintain_order=True)
    want = pl.from_pandas(pandas_frame)
    if got.columns != want.columns or got.height != want.height:
        raise AssertionError(f"shape differs: polars {got.shape} {got.columns} vs pandas {want.shape} {want.columns}")
    for column in got.columns:
        a, b = got[column], want[column].cast(got[column].dtype)
        if a.dtype == pl.Float32:
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, err_msg=column)
        elif not a.equals(b, check_names=False):
            raise AssertionError(f"column {column} differs in {int((a != b).sum())} rows")
    return got.height


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="existing log directory (default: generate a synthetic world)")
    parser.add_argument("--impressions", type=int, default=5_000_000, help="size of the generated world")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default="runs/bench-preprocess", help="where data and outputs go")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each path's median counts")
    args = parser.parse_args()

    data = ensure_data(args)
    work = Path(args.work)
    polars_out, pandas_out = work / "out-polars", work / "out-pandas"
    polars_times, pandas_times = [], []
    summary: dict = {}
    pandas_frame = pd.DataFrame()
    for round_ in range(args.rounds):
        wall, cpu, summary = timed(lambda: run_polars(data, polars_out))
        polars_times.append((wall, cpu))
        print(f"bench: round {round_ + 1} polars {wall:.2f} s (cpu {cpu:.2f} s)", file=sys.stderr)
        wall, cpu, pandas_frame = timed(lambda: run_pandas(data, pandas_out, 0.1, 0.1))
        pandas_times.append((wall, cpu))
        print(f"bench: round {round_ + 1} pandas {wall:.2f} s (cpu {cpu:.2f} s)", file=sys.stderr)
    rows = check_equal(polars_out, pandas_frame)

    impressions = summary["rows_in"]
    polars_wall = statistics.median(t[0] for t in polars_times)
    pandas_wall = statistics.median(t[0] for t in pandas_times)
    polars_cpu = statistics.median(t[1] for t in polars_times)
    pandas_cpu = statistics.median(t[1] for t in pandas_times)
    print(
        json.dumps(
            {
                "bench": "preprocess",
                "impressions": impressions,
                "rows_out": rows,
                "polars_cpu_events_per_s": round(impressions / polars_wall),
                "pandas_events_per_s": round(impressions / pandas_wall),
                "ratio": round(pandas_wall / polars_wall, 2),
                "baseline": f"pandas {pd.__version__}",
                "engine": f"polars {pl.__version__} (CPU, in-memory per day)",
                "polars_seconds": round(polars_wall, 3),
                "pandas_seconds": round(pandas_wall, 3),
                "polars_cpu_seconds": round(polars_cpu, 3),
                "pandas_cpu_seconds": round(pandas_cpu, 3),
                "rounds": args.rounds,
                "outputs_equal": True,
                "data": str(data),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
