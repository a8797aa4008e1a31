"""`gpurec train --online`: learn from the event log's `examples` as they arrive (long-running).

    gpurec train --online --from sqlite:///runs/demo/live/log.db --init runs/demo/train --out runs/demo/online
    gpurec train --online --from sqlite:///runs/demo/live/log.db --out runs/demo/online --drain --json

Starts from `--init` (a batch training run or checkpoint) the first time, and from `--out`'s latest
checkpoint (model + optimizer + id maps + the next offset of every partition) after that, so a
trainer stopped or killed at any point continues exactly after the last example it checkpointed.
Ctrl-C / SIGTERM checkpoints and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path

from gpurec.checks import non_negative_int, output_dir, positive_float, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--online", action="store_true", required=True, help="train on the event log's examples as they arrive")
    parser.add_argument("--from", dest="log", required=True, help="event log URL: sqlite:///path/log.db or kafka://host:port")
    parser.add_argument("--out", required=True, type=Path, help="online run directory: checkpoints with offsets, summary")
    parser.add_argument("--init", default=None, help="batch training run (or checkpoint) to start from when --out has none")
    parser.add_argument("--batch-size", type=positive_int, default=512, help="examples per step (all ranks together)")
    parser.add_argument("--linger-s", type=positive_float, default=1.0, help="train a partial batch once its oldest example waited this long")
    parser.add_argument(
        "--reference-batch",
        type=non_negative_int,
        default=None,
        help="a step of n examples weighs its loss by n / this, so each example moves the model as far as in batch "
        "training (default: the starting run's batch_size; 0: every step a plain mean)",
    )
    parser.add_argument("--checkpoint-every-s", type=positive_float, default=30.0, help="seconds between checkpoints (they hold the offsets)")
    parser.add_argument("--max-steps", type=non_negative_int, default=0, help="stop after this many steps in total (0: no limit)")
    parser.add_argument("--group", default="trainer", help="consumer group whose committed offsets show the lag")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="override the starting run's device")
    parser.add_argument("--sync-dir", type=Path, default=None, help="publish parameter deltas here for the served ranker (gpurec serve --sync-dir)")
    parser.add_argument("--sync-every-s", type=positive_float, default=5.0, help="seconds between deltas of touched embedding rows and id-map slots")
    parser.add_argument("--dense-every-s", type=positive_float, default=60.0, help="seconds between dense-weight deltas")
    parser.add_argument("--snapshot-every", type=positive_int, default=100, help="deltas between full snapshots (older files are deleted)")
    parser.add_argument("--drain", action="store_true", help="train until no example is left, checkpoint, stop")
    parser.add_argument("--json", action="store_true", help="print the final report as one JSON object")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    output_dir(args.out, "--out")
    import dataclasses

    from gpurec.errors import InvalidInput
    from gpurec.model.checkpoint import find_checkpoint, latest_checkpoint, read_trained_run
    from gpurec.stream.log import open_event_log
    from gpurec.sync.online import OnlineSettings, train_online
    from gpurec.sync.publish import DeltaPublisher
    from gpurec.train.config import TrainConfig

    settings = OnlineSettings(
        batch_size=args.batch_size,
        linger_s=args.linger_s,
        checkpoint_every_s=args.checkpoint_every_s,
        max_steps=args.max_steps,
        group=args.group,
        reference_batch=args.reference_batch,
    )
    start = latest_checkpoint(args.out) or (find_checkpoint(args.init) if args.init else None)
    train_config = None
    if start is not None and args.device is not None:
        written = TrainConfig.from_dict(dict(read_trained_run(start).train_config))
        train_config = dataclasses.replace(written, device=args.device)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.sync_dir is not None and args.sync_dir.exists() and not args.sync_dir.is_dir():
        raise InvalidInput(f"--sync-dir {args.sync_dir} is a file, not a directory")
    with open_event_log(args.log) as log:

        def publisher(trainer):
            return DeltaPublisher(
                trainer,
                args.sync_dir,
                rows_every_s=args.sync_every_s,
                dense_every_s=args.dense_every_s,
                snapshot_every=args.snapshot_every,
                log=log,
            )

        report = train_online(
            log,
            args.out,
            settings,
            train_config,
            init=args.init,
            drain=args.drain,
            stop=stop,
            progress=not args.json,
            listener=publisher if args.sync_dir is not None else None,
        )
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(report) if args.json else _human(report))
    return 0


def _human(report: dict) -> str:
    aucs = ", ".join(f"{k.removeprefix('auc_')} AUC {v}" for k, v in report.items() if k.startswith("auc_") and v is not None)
    return (
        f"trained {report['examples']:,} examples in {report['steps']} steps at {report['examples_per_s']:,} examples/s "
        f"(progressive {aucs or 'AUC n/a'}); {report['invalid']} invalid; lag {report['lag']}; checkpoint {report['checkpoint']}"
    )
