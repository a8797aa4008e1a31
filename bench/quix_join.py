"""The joiner as a Quix Streams app against the embedded runner, on the same Kafka broker.

    .venv/bin/python bench/quix_join.py [--requests 5000] [--batch 2000]

Starts a noida-db broker on 127.0.0.1, fills `served` and `actions` (2 partitions; 6 served rows
per request, about 0.6 actions per row), then drains them twice with the same joiner settings, each
in its own consumer group: `run_join` on `KafkaEventLog` (one Kafka transaction per step of
`batch` records per input) and `run_quix_join` (Quix Streams, exactly-once, a checkpoint
transaction every second, state in RocksDB + changelog). Records/s count served rows + actions over
the run's wall time; the Quix figure is also given from its first record on (its start-up: topic
and changelog creation, group join, end ticks). Both write to the same `examples` topic (the bench
reads neither). The last line is one JSON object.
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
    parser.add_argument("--requests", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=2_000)
    args = parser.parse_args()

    from test_join import SETTINGS, fill_log, make_stream

    from gpurec.stream.broker import KafkaBroker
    from gpurec.stream.join import run_join
    from gpurec.stream.log import open_event_log
    from gpurec.stream.quix_join import run_quix_join

    rows, actions = make_stream(args.requests, seed=11)
    records = len(rows) + len(actions)
    settings = dataclasses.replace(SETTINGS, batch=args.batch, grace_ms=SETTINGS.window_ms)
    with tempfile.TemporaryDirectory() as tmp, KafkaBroker(Path(tmp) / "kafka") as broker:
        fill_log(broker.url, rows, actions)
        with open_event_log(broker.url) as log:
            start = time.perf_counter()
            embedded = run_join(log, dataclasses.replace(settings, group="embedded"), drain=True)
            embedded_s = time.perf_counter() - start
        first: list[float] = []
        start = time.perf_counter()
        quix = run_quix_join(
            broker.url,
            dataclasses.replace(settings, group="quix"),
            state_dir=Path(tmp) / "state",
            drain=True,
            on_partition=lambda partition, entries: first.append(time.perf_counter()),
        )
        quix_s = time.perf_counter() - start
    assert quix["counters"]["examples"] == embedded.counters["examples"], "the engines disagree"
    processing_s = quix_s - (min(first) - start)
    result = {
        "records": records,
        "examples": embedded.counters["examples"],
        "embedded_on_kafka_s": round(embedded_s, 2),
        "embedded_records_per_s": round(records / embedded_s),
        "quix_s": round(quix_s, 2),
        "quix_records_per_s": round(records / quix_s),
        "quix_start_s": round(quix_s - processing_s, 2),
        "quix_records_per_s_after_start": round(records / processing_s),
        "ratio_quix_to_embedded": round(embedded_s / quix_s, 3),
        "ratio_after_start": round(embedded_s / processing_s, 3),
    }
    print(
        f"{records:,} records: embedded on Kafka {result['embedded_records_per_s']:,}/s, "
        f"quix {result['quix_records_per_s']:,}/s ({result['quix_records_per_s_after_start']:,}/s after "
        f"{result['quix_start_s']} s of start-up)"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
