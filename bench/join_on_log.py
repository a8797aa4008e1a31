"""The joiner on the embedded event log: actions/s end to end, against the state machine alone.

    .venv/bin/python bench/join_on_log.py [--requests 20000] [--batch 2000]

Fills a SQLite event log (2 partitions) with served rows (6 per request) and actions (about 1.2 per
served row with some repeated and late), then times `run_join(..., drain=True)`: reading, decoding,
joining, encoding and committing offsets + examples + state in one transaction per step, on one
core. The baseline, measured in the same run, is the same joiner state machine fed the same decoded
records in memory (no log, no commits), so the ratio is what the exactly-once log costs. The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2_000)
    args = parser.parse_args()

    from test_join import SETTINGS, fill_log, make_stream

    from gpurec.stream.join import run_join
    from gpurec.stream.joiner import Joiner
    from gpurec.stream.log import open_event_log
    from gpurec.stream.records import INT64_MAX

    rows, actions = make_stream(args.requests, seed=11)
    settings = dataclasses.replace(SETTINGS, batch=args.batch, grace_ms=SETTINGS.window_ms)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/log.db"
        fill_log(url, rows, actions)
        with open_event_log(url) as log:
            start = time.perf_counter()
            report = run_join(log, settings, drain=True)
            on_log_s = time.perf_counter() - start

    # Baseline: the state machine alone on the same records, in event-time order, one watermark per
    # `batch` records (what the runner does per step), no decoding or log.
    events = sorted([(r.ts_ms, 0, r) for r in rows] + [(a.ts_ms, 1, a) for a, _ in actions], key=lambda e: (e[0], e[1]))
    joiner = Joiner(settings.joiner_config)
    start = time.perf_counter()
    for i, (ts, kind, record) in enumerate(events):
        (joiner.on_served if kind == 0 else joiner.on_action)(record)
        if i % settings.batch == 0:
            joiner.on_watermark(ts - settings.out_of_order_ms)
    joiner.on_watermark(INT64_MAX)
    joiner.drain_changes()
    in_memory_s = time.perf_counter() - start

    n_actions, n_served = len(actions), len(rows)
    result = {
        "bench": "join_on_log",
        "served_rows": n_served,
        "actions": n_actions,
        "examples": report.examples,
        "commits": report.commits,
        "seconds": round(on_log_s, 3),
        "actions_per_s": round(n_actions / on_log_s),
        "records_per_s": round((n_actions + n_served) / on_log_s),
        "baseline": "the Joiner state machine alone on the same records in memory (no log, decode or commit)",
        "baseline_records_per_s": round((n_actions + n_served) / in_memory_s),
        "ratio_vs_baseline": round(in_memory_s / on_log_s, 3),
    }
    print(
        f"joiner on the SQLite log: {result['actions_per_s']:,} actions/s ({result['records_per_s']:,} records/s, "
        f"{report.commits} commits); state machine alone: {result['baseline_records_per_s']:,} records/s"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
