"""`gpurec join`: the long-running joiner (served rows + actions -> one labelled example per served row).

    gpurec join --log sqlite:///runs/demo/live/log.db                 # run until Ctrl-C / SIGTERM
    gpurec join --log sqlite:///runs/demo/live/log.db --drain --json  # to the end of the log, then stop
    gpurec join --log kafka://127.0.0.1:9092 --partitions 0,1         # a share of the partitions
    gpurec join --log kafka://127.0.0.1:9092 --engine quix --member joiner-1  # a Quix Streams app

Several processes split the partitions (`--partitions`); each commits its offsets, outputs and
state in one transaction, so any of them can be killed and restarted without losing or repeating
an example. Progress (records in, examples out, lag) is shown on stderr.

`--engine quix` runs the same joiner as a Quix Streams application (gpurec/stream/quix_join.py):
the consumer group spreads the partitions over the processes, each named by `--member` (Kafka
static membership: restart a process with the same name and it gets its partitions back at once);
`--state-dir` holds its RocksDB state (under <state-dir>/<member>; the changelog topic on Kafka
is the durable copy, so a lost directory is rebuilt from it).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from gpurec.checks import non_negative_int, positive_float, positive_int
from gpurec.errors import InvalidInput


def _partitions(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be partition numbers separated by commas, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be partition numbers separated by commas, got {text!r}")
    return sorted(set(values))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", required=True, help="event log URL: sqlite:///path/log.db (default backend) or kafka://host:port")
    parser.add_argument("--group", default="joiner", help="consumer group (offsets and state are kept per group)")
    parser.add_argument("--partitions", type=_partitions, default=None, help="comma-separated partitions (default: all)")
    parser.add_argument("--window-s", type=positive_float, default=600.0, help="join window W in event-time seconds")
    parser.add_argument("--grace-s", type=positive_float, default=600.0, help="how long closed rows wait for late actions")
    parser.add_argument("--late-policy", choices=("drop", "correct"), default="drop", help="late actions: dead letter, or a corrective example")
    parser.add_argument("--out-of-order-s", type=positive_float, default=5.0, help="allowed event-time disorder per input")
    parser.add_argument("--idle-s", type=positive_float, default=2.0, help="event-time seconds after which an idle input stops holding the watermark")
    parser.add_argument("--time-scale", type=positive_float, default=1.0, help="event-time seconds per wall-clock second (simulation speed-up)")
    parser.add_argument("--batch", type=positive_int, default=2000, help="records read per input partition per step")
    parser.add_argument("--create-partitions", type=non_negative_int, default=0, help="create missing topics with this many partitions (0: they must exist)")
    parser.add_argument("--feature-store", default=None, help="also keep this online feature store's counters current (sqlite:///path or redis://...)")
    parser.add_argument("--drain", action="store_true", help="process to the end of the log, close every window, stop")
    parser.add_argument("--json", action="store_true", help="print the final report as one JSON object")
    parser.add_argument("--engine", choices=("embedded", "quix"), default="embedded", help="embedded runner, or a Quix Streams app (kafka:// logs only)")
    parser.add_argument("--member", default="joiner-0", help="quix: this process's static member name in the group (keep it across restarts)")
    parser.add_argument("--state-dir", default=".quix-state", help="quix: local RocksDB state directory (one sub-directory per member)")


def run(args: argparse.Namespace) -> int:
    from gpurec.features.store import open_feature_store
    from gpurec.stream.join import SERVED, JoinSettings, ensure_topics, run_join
    from gpurec.stream.log import open_event_log

    settings = JoinSettings(
        window_ms=int(args.window_s * 1000),
        grace_ms=int(args.grace_s * 1000),
        late_policy=args.late_policy,
        out_of_order_ms=int(args.out_of_order_s * 1000),
        idle_ms=int(args.idle_s * 1000),
        time_scale=args.time_scale,
        batch=args.batch,
        group=args.group,
    )
    if args.engine == "quix":
        return _run_quix(args, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step in hand, commit, stop
        signal.signal(sig, lambda *_: stop.set())
    with open_event_log(args.log) as log:
        if args.create_partitions:
            ensure_topics(log, args.create_partitions)
        elif SERVED not in log.topics():
            raise InvalidInput(f"{args.log} has no {SERVED!r} topic yet (pass --create-partitions N to create it)")
        else:
            ensure_topics(log, log.partitions(SERVED))
        progress = _Progress(enabled=not args.json)
        store = open_feature_store(args.feature_store) if args.feature_store else None
        try:
            report = run_join(
                log, settings, args.partitions, drain=args.drain, stop=stop, on_step=progress.update, store=store
            )
        finally:
            progress.close()
            if store is not None:
                store.close()
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        counters = report.counters
        print(
            f"join: {report.records_in['served']:,} served rows, {report.records_in['actions']:,} actions -> "
            f"{report.examples:,} examples ({counters.get('positives', 0):,} positive), "
            f"{report.dead_letters:,} dead letters, {counters.get('late', 0):,} late, "
            f"{counters.get('duplicates', 0):,} duplicate actions, {counters.get('non_consenting', 0):,} rows "
            f"of non-consenting users; {report.seconds:.1f} s"
        )
    return 0


def _run_quix(args: argparse.Namespace, settings) -> int:
    from gpurec.stream.quix_join import kafka_bootstrap, run_quix_join

    kafka_bootstrap(args.log)  # a sqlite:// log is refused before anything starts
    if args.partitions is not None or args.feature_store:
        raise InvalidInput("--partitions and --feature-store are not supported with --engine quix")

    def restored(partition: int, entries: int) -> None:
        print(f"join: partition {partition} assigned, {entries:,} state entries restored", file=sys.stderr, flush=True)

    report = run_quix_join(
        args.log, settings, member=args.member, state_dir=args.state_dir, drain=args.drain,
        create_partitions=args.create_partitions, on_partition=restored,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        counters, records = report["counters"], report["records_in"]
        print(
            f"join (quix, partitions {report['partitions']}): {records['served']:,} served rows, "
            f"{records['actions']:,} actions -> {report['examples']:,} examples ({counters.get('positives', 0):,} "
            f"positive), {report['dead_letters']:,} dead letters; {report['seconds']:.1f} s"
        )
    return 0


class _Progress:
    """A tqdm line on stderr: records in, examples out, lag."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.seen = enabled, None, 0

    def update(self, report) -> None:
        if self.bar is None:  # made at the first step: a run refused before it prints only its error
            from tqdm import tqdm

            self.bar = tqdm(desc="join", unit=" rec", disable=not self.enabled, file=sys.stderr, mininterval=0.5)
        total = sum(report.records_in.values())
        self.bar.update(total - self.seen)
        self.seen = total
        self.bar.set_postfix(
            examples=report.examples, dead=report.dead_letters, lag_s=round(report.watermark_lag_ms / 1000, 1), refresh=False
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
