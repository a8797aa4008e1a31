"""`gpurec export`: write a trained checkpoint as the next version of a Triton model repository.

    gpurec export --checkpoint runs/demo/train --repo runs/demo/repo
    gpurec export --checkpoint runs/demo/train --repo runs/demo/repo \
        --feature-store sqlite:///runs/demo/features.db --event-log sqlite:///runs/demo/log.db

The two URLs go into `feed/config.pbtxt` (SQLite paths made absolute); `gpurec serve` can
override them (see `gpurec.serve.feed_settings`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpurec.checks import non_negative_int, output_dir, positive_int, require_checkpoint
from gpurec.serve.feed_contract import DEFAULT_MAX_N
from gpurec.serve.feed_settings import FeedSettings, normalise_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="training run directory or one checkpoint directory")
    parser.add_argument("--repo", required=True, type=Path, help="Triton model repository to add a version to (created if missing)")
    parser.add_argument("--max-batch-size", type=positive_int, default=1024, help="most rows (candidates) per request (default: 1024)")
    parser.add_argument("--max-queue-delay-us", type=non_negative_int, default=500, help="dynamic batching: how long a request waits for others")
    parser.add_argument("--instances", type=positive_int, default=1, help="ranker instances (per GPU on GPU nodes)")
    parser.add_argument("--feature-store", default="", help="the feed's online feature store: sqlite:///PATH or redis://HOST:PORT/DB")
    parser.add_argument("--event-log", default="", help="the feed's event log (items, actions, served): sqlite:///PATH or kafka://HOST:PORT")
    parser.add_argument("--feed-max-n", type=positive_int, default=DEFAULT_MAX_N, help=f"most items one feed request may ask for (default: {DEFAULT_MAX_N})")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    # Checked before torch is imported; export_repository does not raise typed errors for these yet.
    require_checkpoint(args.checkpoint)
    output_dir(args.repo, "--repo")
    feed = FeedSettings(
        feature_store=normalise_url(args.feature_store, "--feature-store") if args.feature_store else "",
        event_log=normalise_url(args.event_log, "--event-log") if args.event_log else "",
        max_n=args.feed_max_n,
    )
    from gpurec.serve.export import export_repository  # torch is imported only when the command runs
    from gpurec.serve.model_config import BatchingConfig

    batching = BatchingConfig(max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instances)
    result = export_repository(args.checkpoint, args.repo, max_batch_size=args.max_batch_size, batching=batching, feed=feed)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"exported version {result.version} of {', '.join(result.to_json()['models'])} to {result.repo} "
            f"(artifact matches the trained model within {result.max_abs_diff:.1e}); serve it with: gpurec serve --repo {result.repo}"
        )
    return 0
