"""`gpurec retention`: delete what a workspace keeps longer than its retention windows.

    gpurec retention --workspace runs/demo --dry-run          # what would go, nothing deleted
    gpurec retention --workspace runs/demo --json             # delete, report as one JSON object
    gpurec retention --workspace runs/demo --now 2026-03-01   # "now" in the world's event time

Windows come from the workspace's `[retention]` table (defaults otherwise; see
`gpurec.privacy.retention`). "Now" is the newest event time in the workspace unless `--now` says
otherwise: the simulated world's clock is not the wall clock. Run it periodically (cron, a
systemd timer); each run is idempotent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", required=True, type=Path, help="the deployment's workspace directory")
    parser.add_argument("--now", default=None, help="event time to measure windows back from (ISO-8601; default: newest event)")
    parser.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.privacy.retention import enforce, parse_now
    from gpurec.workspace import Workspace

    now_ms = parse_now(args.now) if args.now is not None else None
    workspace = Workspace.open(args.workspace)
    report = enforce(workspace, now_ms=now_ms, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"now = {report['now']} ({report['now_source']})")
    for name, part in report["deleted"].items():
        print(f"  {name:<13} {verb} {part['count']:>7} files  {part['bytes']:>12} bytes")
    for topic, part in report["topics"].items():
        window = "kept" if part["retention_days"] is None else f"{part['retention_days']:g} d"
        print(f"  topic {topic:<19} ({window}) {verb} {part['count']:>7} records {part['bytes']:>12} bytes")
    print(f"  total {verb} {report['total']['count']} files and records, {report['total']['bytes']} bytes")
    return 0
