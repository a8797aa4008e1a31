"""`gpurec export`: write a trained checkpoint as the next version of a Triton model repository.

    gpurec export --checkpoint runs/demo/train --repo runs/demo/repo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpurec.checks import non_negative_int, output_dir, positive_int, require_checkpoint
from gpurec.serve.contract import RANKER_MODEL, RECOMMEND_MODEL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="training run directory or one checkpoint directory")
    parser.add_argument("--repo", required=True, type=Path, help="Triton model repository to add a version to (created if missing)")
    parser.add_argument("--max-batch-size", type=positive_int, default=1024, help="most rows (candidates) per request (default: 1024)")
    parser.add_argument("--max-queue-delay-us", type=non_negative_int, default=500, help="dynamic batching: how long a request waits for others")
    parser.add_argument("--instances", type=positive_int, default=1, help="ranker instances (per GPU on GPU nodes)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    # Checked before torch is imported; export_repository does not raise typed errors for these yet.
    require_checkpoint(args.checkpoint)
    output_dir(args.repo, "--repo")
    from gpurec.serve.export import export_repository  # torch is imported only when the command runs
    from gpurec.serve.model_config import BatchingConfig

    batching = BatchingConfig(max_queue_delay_us=args.max_queue_delay_us, instance_count=args.instances)
    result = export_repository(args.checkpoint, args.repo, max_batch_size=args.max_batch_size, batching=batching)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(
            f"exported version {result.version} of {RANKER_MODEL} and {RECOMMEND_MODEL} to {result.repo} "
            f"(artifact matches the trained model within {result.max_abs_diff:.1e}); serve it with: gpurec serve --repo {result.repo}"
        )
    return 0
