"""Live feed latency: `feed(user, 6)` (300 candidates) at a fixed request rate, against ranking alone.

In one run: the `make demo`-sized world (2,000 users, 5,000 items, 7 days; generated, preprocessed
and trained with the default config unless ``--run RUN --raw RAW`` name an existing run and its raw
logs), a SQLite feature store filled with the profiles, the items and the last day's impressions
and actions, a SQLite event log whose `items` / `actions` topics hold the uploads and that day's
engagement, `gpurec export` with the feed pointed at both, and one tritonserver. While measuring,
the rest of the live loop runs beside it as separate processes: `gpurec join` (served rows +
actions -> examples) and a user simulator that acts on about half of the served rows (it writes
`actions`, which the joiner and the feed's candidate source read). ``--no-joiner`` leaves both out.

Two paths, alternated over ``--rounds`` rounds, each open-loop at ``--rate`` requests/s from
``--threads`` client threads (a request is due at its scheduled time whatever the previous ones
did; latency is measured from that time, so a server falling behind shows as queueing):

- feed: `RankerClient.feed(user, 6, ts_ms=event time)` over gRPC: candidates, store read, BLS to
  `ranker`, top 6, served rows logged;
- ranker: `RankerClient.rank(None, rows)` over gRPC with the 300 rows of a feed request (taken
  from the same store and candidate source in this process), i.e. the ranking step alone.

The last stdout line is one JSON object: p50/p99 of both, their ratio and difference, the
server-side time per feed step (from the feed's Prometheus metrics) and whether the targets
(p50 <= 25 ms, p99 <= 60 ms at 50 requests/s on the 2-core reference machine) were met.

    .venv/bin/python bench/feed.py                                   # about 4 minutes on 2 cores
    .venv/bin/python bench/feed.py --run runs/demo/train --raw runs/demo/raw --seconds 20
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from gpurec.client import RankerClient, load_contract
from gpurec.features import open_feature_store
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC
from gpurec.serve.feed_settings import FeedSettings
from gpurec.serve.items import ITEMS_TOPIC, item_record, items_from_table
from gpurec.serve.model_config import BatchingConfig
from gpurec.serve.server import TritonServer
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Action, ServedRow, decode, encode

PARTITIONS = 4
PAGE = 6  # items per feed request, as in the synthetic world
TARGET_P50_MS, TARGET_P99_MS = 25.0, 60.0


def demo_run(root: Path) -> tuple[Path, Path]:
    """`make demo`'s world, features and ranker (default config)."""
    from gpurec.data.generate import generate_synthetic
    from gpurec.data.world import WorldConfig
    from gpurec.preprocess.run import preprocess
    from gpurec.train.config import load_configs
    from gpurec.train.recipe import train

    generate_synthetic(WorldConfig(users=2000, items=5000, days=7, seed=7), root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    model_config, train_config = load_configs(None)
    train(root / "features", root / "train", model_config, train_config, progress=False)
    return root / "train", root / "raw"


def fill(raw: Path, store_url: str, log_url: str) -> tuple[list[int], int]:
    """Store and log from the raw logs; returns the user ids and the world's last event time."""
    drop = lambda frame: frame.drop("day") if "day" in frame.columns else frame  # noqa: E731
    users, items = drop(pl.read_parquet(raw / "users")), drop(pl.read_parquet(raw / "items"))
    impressions, actions = drop(pl.read_parquet(raw / "impressions")), drop(pl.read_parquet(raw / "actions"))
    impressions = impressions.filter(pl.col("ts").dt.date() == impressions["ts"].max().date())
    actions = actions.join(impressions.select("request_id", "item_id", "user_id"), on=["request_id", "item_id"])
    actions = actions.with_columns(ts_ms=pl.col("ts").dt.epoch("ms")).with_row_index("action_id")
    with open_feature_store(store_url) as store:
        store.put_users(users)
        store.put_items(items)
        store.record_impressions(impressions)
        store.record_actions(actions.drop("ts_ms", "action_id", "user_id"))
    with open_event_log(log_url) as log:
        for topic in (ITEMS_TOPIC, ACTIONS_TOPIC, SERVED_TOPIC):
            log.create_topic(topic, PARTITIONS)
        log.append(ITEMS_TOPIC, [item_record(i) for i in items_from_table(items)])
        log.append(
            ACTIONS_TOPIC,
            [
                Record(a["user_id"], encode(Action(a["action_id"], a["request_id"], a["item_id"], a["user_id"], a["ts_ms"],
                       a["watch_ms"], a["like"], a["share"], a["comment"], a["follow"], a["skip"])), a["ts_ms"])
                for a in actions.iter_rows(named=True)
            ],
        )  # fmt: skip
    return users["user_id"].to_list(), int(actions["ts_ms"].max())


def act_on_served(log_url: str, seed: int = 0) -> None:
    """The simulated users (``--act-on-served``, a child process): act on about half of what was served."""
    rng = random.Random(seed)
    action_id = 10**12
    with open_event_log(log_url) as log:
        positions = dict.fromkeys(range(log.partitions(SERVED_TOPIC)), 0)
        while True:
            out = []
            for partition, offset in positions.items():
                records = log.read(SERVED_TOPIC, partition, offset, 2000)
                if records:
                    positions[partition] = records[-1].offset + 1
                for record in records:
                    row = decode(record.value, ServedRow)
                    if rng.random() < 0.5:
                        action_id += 1
                        watch = rng.randrange(max(1, row.duration_ms * 11 // 10))
                        ts = row.ts_ms + rng.randrange(1_000, 20_000)
                        act = Action(action_id, row.request_id, row.item_id, row.user_id, ts, watch,
                                     rng.random() < 0.05, rng.random() < 0.01, rng.random() < 0.02, False, watch < 2_000)  # fmt: skip
                        out.append(Record(row.user_id, encode(act), ts))
            if out:
                log.append(ACTIONS_TOPIC, out)
            time.sleep(0.2)


def open_loop(make_call: Callable[[], Callable[[int], None]], rate: float, seconds: float, threads: int) -> tuple[np.ndarray, int, float]:
    """Calls due every 1/rate s from `threads` threads; (latencies from due time in s, errors, achieved rate)."""
    total = int(rate * seconds)
    latencies = np.full(total, np.nan)
    errors: list[str] = []
    counter, lock = itertools.count(), threading.Lock()
    start = time.perf_counter() + 0.2

    def worker() -> None:
        call = make_call()
        while True:
            with lock:
                i = next(counter)
            if i >= total:
                return
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            try:
                call(i)
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                continue
            latencies[i] = time.perf_counter() - due

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        print(f"  {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
    return latencies[~np.isnan(latencies)], len(errors), total / elapsed


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and all their descendants' process groups so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    groups = set(pids)
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups or int(stat.parent.name) in groups:  # fields[2]: the process group
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def scrape(url: str) -> dict[tuple[str, str], float]:
    """(metric name, its labels as text) -> value, for the feed's metrics."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {(m, labels): float(v) for m, labels, v in re.findall(r"^(gpurec_feed_\w+)\{([^}]*)\} (\S+)$", text, re.MULTILINE)}


def summed(metrics: dict[tuple[str, str], float], name: str, label: str = "") -> float:
    return sum(v for (m, labels), v in metrics.items() if m == name and label in labels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="trained run to export (default: train the demo-sized one)")
    parser.add_argument("--raw", type=Path, default=None, help="the run's raw logs (with --run)")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second, each path")
    parser.add_argument("--seconds", type=float, default=15.0, help="per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000)
    parser.add_argument("--no-joiner", action="store_true", help="measure without the joiner and the simulated users")
    parser.add_argument("--joiner-nice", type=int, default=0, help="niceness of the joiner and the simulated users (default 0: same priority)")
    parser.add_argument("--act-on-served", default=None, help=argparse.SUPPRESS)  # the simulated users' child process
    args = parser.parse_args(argv)
    if args.act_on_served:
        act_on_served(args.act_on_served)
        return 0
    if (args.run is None) != (args.raw is None):
        parser.error("--run and --raw go together")
    from gpurec.serve.export import export_repository  # torch: not for the simulated users' process
    from gpurec.serve.feed import FeedService

    with tempfile.TemporaryDirectory(prefix="gpurec-bench-feed-") as tmp:
        root = Path(tmp)
        run, raw = (args.run, args.raw) if args.run else demo_run(root)
        store_url, log_url = f"sqlite:///{root / 'features.db'}", f"sqlite:///{root / 'log.db'}"
        users, world_end_ms = fill(raw, store_url, log_url)
        settings = FeedSettings(feature_store=store_url, event_log=log_url)
        export_repository(run, root / "repo", batching=BatchingConfig(max_queue_delay_us=args.max_queue_delay_us), feed=settings)
        contract = load_contract(root / "repo")
        started = time.perf_counter()

        def event_ms() -> int:  # event time runs on from the world's end at wall-clock speed
            return world_end_ms + int((time.perf_counter() - started) * 1000)

        local = FeedService(settings, contract, "1").start()  # the same candidates and rows, for the ranker path
        rng = random.Random(0)
        plans = [local.plan(rng.choice(users), PAGE, event_ms()) for _ in range(50)]
        local.close()
        candidates = float(np.mean([len(p.candidates) for p in plans]))

        children: list[subprocess.Popen] = []
        if not args.no_joiner:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "gpurec.cli", "join", "--log", log_url, "--create-partitions", str(PARTITIONS),
                 "--window-s", "30", "--grace-s", "30", "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=lambda: os.nice(args.joiner_nice)))  # fmt: skip
            children.append(subprocess.Popen([sys.executable, __file__, "--act-on-served", log_url], preexec_fn=lambda: os.nice(args.joiner_nice)))
        timings: dict[str, list[np.ndarray]] = {"feed": [], "ranker": []}
        achieved: dict[str, list[float]] = {"feed": [], "ranker": []}
        failures = {"feed": 0, "ranker": 0}
        try:
            with TritonServer(root / "repo") as server:
                clients: list[RankerClient] = []

                def feed_call() -> Callable[[int], None]:
                    client = RankerClient(server.grpc_url, contract, protocol="grpc", retries=0)
                    clients.append(client)
                    return lambda i: client.feed(users[(i * 7919) % len(users)], PAGE, ts_ms=event_ms())

                def rank_call() -> Callable[[int], None]:
                    client = RankerClient(server.grpc_url, contract, protocol="grpc", retries=0)
                    clients.append(client)
                    return lambda i: client.rank(None, plans[i % len(plans)].inputs)

                paths = {"feed": feed_call, "ranker": rank_call}
                for make in paths.values():  # warm-up: connections, both models' first batches
                    open_loop(make, args.rate, 3.0, args.threads)
                before = scrape(server.metrics_url)
                load_before = os.getloadavg()[0]
                assert server.pid is not None
                cpu_before = {"server": cpu_seconds([server.pid]), "loop": cpu_seconds([c.pid for c in children]), "bench": time.process_time()}
                wall_before = time.perf_counter()
                for r in range(args.rounds):
                    for name, make in paths.items():
                        lat, errors, rps = open_loop(make, args.rate, args.seconds, args.threads)
                        timings[name].append(lat)
                        achieved[name].append(rps)
                        failures[name] += errors
                        print(f"round {r + 1} {name}: p50 {np.percentile(lat, 50) * 1e3:.1f} ms p99 {np.percentile(lat, 99) * 1e3:.1f} ms", file=sys.stderr)
                after = scrape(server.metrics_url)
                load_after = os.getloadavg()[0]
                cpu_after = {"server": cpu_seconds([server.pid]), "loop": cpu_seconds([c.pid for c in children]), "bench": time.process_time()}
                wall = time.perf_counter() - wall_before
                for client in clients:
                    client.close()
            alive = [child.poll() is None for child in children]  # a joiner that died ran only part of the time
        finally:
            for child in children:
                child.terminate()
                child.wait(timeout=30)
        with open_event_log(log_url) as log:  # what the rest of the loop did meanwhile
            written = {t: sum(log.end_offsets(t).values()) for t in (SERVED_TOPIC, ACTIONS_TOPIC, "examples") if t in log.topics()}

    def delta(name: str, label: str = "") -> float:
        return summed(after, name, label) - summed(before, name, label)

    figures = {}
    for name, rounds in timings.items():
        lat = np.concatenate(rounds) * 1e3
        figures[name] = {
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2),
            "requests": int(lat.size),
            "errors": failures[name],
            "achieved_rps": round(float(np.median(achieved[name])), 1),
            # per round, to tell a slow system from a burst of the machine's other jobs
            "rounds_p50_p99_ms": [[round(float(np.percentile(r, q)) * 1e3, 1) for q in (50, 99)] for r in rounds],
        }
    stages = {
        stage: round(delta("gpurec_feed_stage_ms_sum", f'stage="{stage}"') / max(1.0, delta("gpurec_feed_stage_ms_count", f'stage="{stage}"')), 2)
        for stage in ("candidates", "features", "rank", "log")
    }
    feed, ranker = figures["feed"], figures["ranker"]
    result = {
        "bench": "feed",
        "rate_rps": args.rate,
        "threads": args.threads,
        "candidates": candidates,
        "n": PAGE,
        "joiner": not args.no_joiner and all(alive),
        "joiner_nice": args.joiner_nice,
        "records_in_log": written,  # served rows, actions (the world's last day + simulated) and the joiner's examples
        "load_average_1m": [round(load_before, 2), round(load_after, 2)],  # the machine is shared: how busy it was
        # cores used while measuring: tritonserver + its stubs, joiner + simulated users, this client process
        "cores_used": {k: round((cpu_after[k] - cpu_before[k]) / wall, 2) for k in cpu_before},
        "figures": figures,
        "ratio_p50": round(feed["p50_ms"] / ranker["p50_ms"], 2),
        "added_p50_ms": round(feed["p50_ms"] - ranker["p50_ms"], 2),
        "server_feed_mean_ms": round(delta("gpurec_feed_latency_ms_sum") / max(1.0, delta("gpurec_feed_latency_ms_count")), 2),
        "server_stage_mean_ms": stages,
        "degraded_reads": delta("gpurec_feed_degraded_reads_total"),
        "log_failures": delta("gpurec_feed_log_failures_total"),
        "targets": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS, "met": feed["p50_ms"] <= TARGET_P50_MS and feed["p99_ms"] <= TARGET_P99_MS},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
