"""Event log throughput: the local SQLite backend (the baseline) against the Kafka backend on a
noida-db broker that this script starts on 127.0.0.1 and always stops.

Both backends get the same records: ``--records`` served-row-like records (``--value-bytes`` of
random bytes each, keys = user ids drawn from 10k users, event time = now) appended to a
``--partitions``-partition topic in batches of ``--batch`` (one `append` call = one transaction /
one flush: each batch is durable when the call returns), then read back partition by partition
with `read(..., max_records=--read-batch)` from offset 0 to the end. A third figure times the
consume-transform-produce step: `commit` of one offset, ``--commit-outputs`` output records and
one state upsert per call, ``--commits`` calls.

Each phase runs ``--rounds`` times on fresh topics and reports its median. Figures are records/s
(commits/s for the commit phase); ``ratio_*`` is kafka / local. The broker keeps its data under a
temporary directory; the local log is a file in another. The last stdout line is one JSON object.

    .venv/bin/python bench/event_log.py            # 100k records, ~1 minute on 2 cores
    .venv/bin/python bench/event_log.py --quick    # 20k records smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gpurec.stream.broker import KafkaBroker
from gpurec.stream.log import EventLog, Record, open_event_log


def make_records(n: int, value_bytes: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    return [Record(rng.randrange(10_000), rng.randbytes(value_bytes), now) for _ in range(n)]


def bench_append(log: EventLog, topic: str, records: list[Record], batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(records), batch):
        log.append(topic, records[i : i + batch])
    return len(records) / (time.perf_counter() - start)


def bench_read(log: EventLog, topic: str, expected: int, read_batch: int) -> float:
    start = time.perf_counter()
    seen = 0
    for partition in range(log.partitions(topic)):
        offset = 0
        while batch := log.read(topic, partition, offset, read_batch):
            seen += len(batch)
            offset = batch[-1].offset + 1
    elapsed = time.perf_counter() - start
    if seen != expected:
        raise SystemExit(f"read {seen} records, appended {expected}")
    return seen / elapsed


def bench_commit(
    log: EventLog, src: str, out: str, group: str, commits: int, outputs: int, value: bytes
) -> float:
    now = int(time.time() * 1000)
    start = time.perf_counter()
    for i in range(commits):
        log.commit(
            group,
            offsets={(src, 0): i + 1},
            outputs=[(out, Record(i * outputs + j, value, now)) for j in range(outputs)],
            state_changes={(src, 0): {b"pending-%d" % (i % 100): value}},
        )
    return commits / (time.perf_counter() - start)


def run_backend(
    log: EventLog, name: str, args: argparse.Namespace, records: list[Record]
) -> dict[str, float]:
    appends, reads, commits = [], [], []
    for r in range(args.rounds):
        topic, src, out = f"served-{name}-{r}", f"src-{name}-{r}", f"examples-{name}-{r}"
        log.create_topic(topic, args.partitions)
        log.create_topic(src, 1)
        log.create_topic(out, args.partitions)
        appends.append(bench_append(log, topic, records, args.batch))
        reads.append(bench_read(log, topic, len(records), args.read_batch))
        commits.append(
            bench_commit(log, src, out, f"joiner-{r}", args.commits, args.commit_outputs, records[0].value)
        )
        print(
            f"{name} round {r}: append {appends[-1]:,.0f}/s  read {reads[-1]:,.0f}/s  "
            f"commit {commits[-1]:,.0f}/s",
            file=sys.stderr,
        )
    return {
        "append_records_per_s": round(statistics.median(appends)),
        "read_records_per_s": round(statistics.median(reads)),
        "commits_per_s": round(statistics.median(commits), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=300)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--read-batch", type=int, default=5000)
    parser.add_argument("--commits", type=int, default=200)
    parser.add_argument("--commit-outputs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20k records, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.records, args.rounds, args.commits = 20_000, 1, 50
    records = make_records(args.records, args.value_bytes, seed=7)

    with tempfile.TemporaryDirectory(prefix="gpurec-bench-log-") as tmp:
        with open_event_log(Path(tmp) / "log.db") as local:
            local_figures = run_backend(local, "local", args, records)
        with KafkaBroker(Path(tmp) / "kafka") as broker, open_event_log(broker.url) as kafka:
            kafka_figures = run_backend(kafka, "kafka", args, records)

    result = {
        "bench": "event_log",
        "records": args.records,
        "value_bytes": args.value_bytes,
        "partitions": args.partitions,
        "batch": args.batch,
        "read_batch": args.read_batch,
        "commit_outputs": args.commit_outputs,
        "rounds": args.rounds,
        "local_sqlite": local_figures,
        "kafka_noida": kafka_figures,
        "ratio_append": round(
            kafka_figures["append_records_per_s"] / local_figures["append_records_per_s"], 3
        ),
        "ratio_read": round(kafka_figures["read_records_per_s"] / local_figures["read_records_per_s"], 3),
        "ratio_commit": round(kafka_figures["commits_per_s"] / local_figures["commits_per_s"], 3),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
