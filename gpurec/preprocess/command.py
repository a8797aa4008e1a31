"""`gpurec preprocess`: logs -> point-in-time features, time splits and a manifest."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gpurec.checks import fraction
from gpurec.preprocess.engine import ENGINES
from gpurec.preprocess.run import Summary, preprocess
from gpurec.preprocess.splits import Shard


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help="log directory (as written by `gpurec generate`)")
    parser.add_argument("--out", required=True, type=Path, help="output directory for features + manifest")
    parser.add_argument(
        "--engine", choices=ENGINES, default="auto", help="auto: GPU if cudf-polars and a CUDA device are present, else CPU"
    )
    parser.add_argument("--shard", type=_shard, default=None, metavar="i/N", help="process only block i of N of the days")
    parser.add_argument("--valid-fraction", type=fraction, default=0.1, help="share of the days (before test) for validation")
    parser.add_argument("--test-fraction", type=fraction, default=0.1, help="share of the last days for test")
    parser.add_argument(
        "--json", action="store_true", help="print exactly one JSON object with the summary (and no progress lines on stderr)"
    )


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record (a test's capture, a redirect)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def _print_summary(summary: Summary) -> None:
    rows = ", ".join(f"{name} {n:,}" for name, n in summary.rows_out.items())
    rejected = ", ".join(f"{name} {n:,}" for name, n in summary.rejected.items() if n) or "none"
    print(f"preprocess: {summary.rows_in:,} impressions in -> {rows} ({summary.engine} engine, {summary.seconds:.1f} s)")
    print(f"  rejected: {rejected}; excluded (no training consent or unknown user): {summary.excluded_no_consent:,}")
    print(f"  manifest: {summary.manifest_path}")


def run(args: argparse.Namespace) -> int:
    logger = logging.getLogger("gpurec.preprocess")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    # Progress lines are for a person watching; --json is for a program, which gets warnings only.
    logger.setLevel(logging.WARNING if args.json else logging.INFO)
    summary = preprocess(
        args.input,
        args.out,
        engine=args.engine,
        shard=args.shard,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
    )
    if args.json:
        print(json.dumps(summary.as_json()))
    else:
        _print_summary(summary)
    return 0


__all__ = ["add_arguments", "run"]
