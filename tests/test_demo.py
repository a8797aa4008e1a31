"""`gpurec demo --json` on a tiny world: the batch stages, then the live loop (feed, joiner, online
trainer, parameter sync) with simulated users."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_the_live_path_and_accounts_for_every_served_row(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "gpurec.cli", "demo", "--out", str(out), "--users", "200", "--items", "400",
         "--days", "3", "--max-steps", "40", "--live-seconds", "8", "--rate", "5", "--live-users", "100", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("requests", "served_rows", "actions", "examples", "late_actions", "dead_letter", "feed_p50_ms", "feed_p99_ms"):
        assert key in summary, key
    assert summary["requests"] > 0 and summary["served_rows"] >= summary["requests"]
    assert summary["actions"] > 0 and summary["feed_p50_ms"] > 0
    # Every served row became one example, or was withheld for lack of training consent, or (the
    # forgotten user's, after the forget) was never logged.
    assert summary["examples"] + summary["non_consenting_rows"] + summary["unlogged_rows"] == summary["served_rows"]
    # Privacy: one user opted out, one was forgotten and then purged from the whole workspace.
    assert summary["workspace"] == str(out.resolve())
    assert summary["opted_out_user"] != summary["forgotten_user"]
    assert summary["forget_verified"] is True, summary["forget_purged"]
    # The loop closed: every example was trained online, deltas reached the server, and both models
    # were scored on the same live examples (each before the online model trained on it).
    assert summary["examples_trained"] == summary["examples_scored"] == summary["examples"]
    assert summary["deltas_applied"] > 0 and summary["freshness_p50_s"] > 0
    assert summary["freshness_p95_s"] >= summary["freshness_p50_s"]
    for key in ("auc_online", "auc_frozen", "serve_p50_ms", "serve_p99_ms", "table_occupancy"):
        assert key in summary, key
    # Stage output went to stderr; stdout is the one JSON object.
    assert len(proc.stdout.strip().splitlines()) == 1 and "gpurec simulate" in proc.stderr
    # Every process it started is gone: no joiner or server left on this demo's files.
    leftover = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not leftover, f"processes left running: {leftover}"
