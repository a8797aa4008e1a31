"""`gpurec evaluate`: score a trained checkpoint against baselines and the oracle on a held-out split.

    gpurec evaluate --checkpoint runs/demo/train --data runs/demo/features
    gpurec evaluate --checkpoint runs/demo/train --data runs/demo/features --split valid --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gpurec.checks import positive_int, require_checkpoint, require_dir
from gpurec.data.logs import list_days
from gpurec.errors import InputNotFound
from gpurec.preprocess.manifest import load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, help="training run directory or one checkpoint directory")
    parser.add_argument("--data", required=True, type=Path, help="features directory (with manifest.json)")
    parser.add_argument("--split", default="test", choices=("test", "valid"), help="split to score (default: test)")
    parser.add_argument("--batch-size", type=positive_int, default=8192, help="rows per model forward pass")
    parser.add_argument("--oracle", type=Path, default=None, help="raw logs with the oracle log (default: the manifest's input)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    check_inputs(args)
    from gpurec.train.evaluate import evaluate  # torch is imported only when the command runs

    report = evaluate(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size, oracle_dir=args.oracle)
    if args.json:
        print(json.dumps(report))
    else:
        _print_table(report)
    return 0


def check_inputs(args: argparse.Namespace) -> None:
    """The checkpoint, the split to score, the train split (the baselines fit on it) and an
    explicit oracle log must be there, checked before torch is imported.

    gpurec.train.evaluate.evaluate finds most of these itself, but raises plain FileNotFoundError
    or ValueError for some; this keeps the command's errors typed until it does.
    """
    require_checkpoint(args.checkpoint)
    manifest = load_manifest(args.data)
    manifest.require_rows(args.split, args.data)
    manifest.require_rows("train", args.data)
    if args.oracle is not None and not list_days(require_dir(args.oracle, "--oracle"), "oracle"):
        raise InputNotFound(f"no oracle log under --oracle {args.oracle} (expected {args.oracle / 'oracle'}/day=YYYY-MM-DD/*.parquet)")


def _rows(report: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, float]]]]:
    rows = [("model", report["tasks"]), *report["baselines"].items()]
    if report["oracle"] is not None:
        rows.append(("oracle", report["oracle"]))
    return rows


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['split']} split, {report['rows']:,} rows: {report['checkpoint']}")
    for name, justify in (("predictor", "left"), ("task", "left"), ("AUC", "right"), ("NE", "right"), ("calibration", "right"), ("log loss", "right")):
        table.add_column(name, justify=justify)
    for name, metrics in _rows(report):
        for i, (task, values) in enumerate(metrics.items()):
            cells = [f"{values[k]:.4f}" for k in ("auc", "ne", "calibration", "logloss")]
            last = i == len(metrics) - 1
            table.add_row(name if i == 0 else "", task, *cells, style="bold" if name == "model" else None, end_section=last)
    console = Console()
    console.print(table)
    if report["oracle"] is None:
        console.print("oracle: none (no oracle log next to these features: real data, or the raw logs moved; see --oracle)")
