"""`gpurec demo`: the whole pipeline on the embedded default, batch stages then the live path.

    gpurec demo --out runs/demo              # what `make demo` runs after its batch stages
    gpurec demo --out runs/demo --json       # the same, ending with one JSON object

Each batch stage runs only when its output is missing under --out (so `make demo` can show them one
by one first): generate -> preprocess -> train -> evaluate -> export (the feed pointed at an
embedded feature store and event log under OUT/live). Then the live path, for --live-seconds:
tritonserver with the feed (started by `gpurec simulate`), `gpurec join` keeping examples and the
online counters current, and simulated users from the same world requesting feeds and acting on
what they were shown. At the end the joiner drains (every window closes) and the figures are
printed: feed latency, requests/s, examples joined, late / duplicate / dead-letter counts, and where
everything went. Every process it starts is stopped, by PID, also on Ctrl-C.

A driver like `gpurec.cli`: it runs the stages' own commands as child processes, one after
another, so each stage's output and errors are exactly what that command shows on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gpurec.checks import non_negative_int, positive_float, positive_int
from gpurec.errors import GpurecError, InvalidInput

JOINER_PARTITIONS = 4
WINDOW_S = 600  # event-time join window: a simulated 10 minutes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="where every stage writes (default runs/demo)")
    parser.add_argument("--users", type=positive_int, default=2000, help="users of the generated world")
    parser.add_argument("--items", type=positive_int, default=5000, help="items of the generated world")
    parser.add_argument("--days", type=positive_int, default=7, help="days of the generated world")
    parser.add_argument("--seed", type=non_negative_int, default=7, help="seed of the world")
    parser.add_argument("--max-steps", type=non_negative_int, default=0, help="cap the training steps (0: the config's epochs)")
    parser.add_argument("--live-seconds", type=positive_float, default=60.0, help="seconds of simulated traffic")
    parser.add_argument("--rate", type=positive_float, default=10.0, help="feed requests per second")
    parser.add_argument("--live-users", type=positive_int, default=1000, help="simulated users (sampled from the world's)")
    parser.add_argument("--speedup", type=positive_float, default=1440.0, help="event-time speed x wall time (1440: a day a minute)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object (stage output goes to stderr)")


def run(args: argparse.Namespace) -> int:
    out = args.out
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file, not a directory")
    live = out / "live"
    log_url, store_url = f"sqlite:///{(live / 'log.db').resolve()}", f"sqlite:///{(live / 'features.db').resolve()}"
    show = sys.stderr if args.json else sys.stdout

    def gpurec(*argv: str, capture: bool = False) -> str:
        """One stage's own command; its output shown (or returned), its failure ends the demo."""
        command = [sys.executable, "-m", "gpurec.cli", *argv]
        print(f"$ gpurec {' '.join(argv)}", file=show, flush=True)
        done = subprocess.run(command, stdout=subprocess.PIPE if capture else show, text=True)
        if done.returncode != 0:
            raise GpurecError(f"`gpurec {argv[0]}` failed (exit {done.returncode}); see its output above")
        return done.stdout or ""

    raw, features, train_dir, repo = out / "raw", out / "features", out / "train", out / "repo"
    if not (raw / "world.json").exists():
        gpurec("generate", "--out", str(raw), "--users", str(args.users), "--items", str(args.items),
               "--days", str(args.days), "--seed", str(args.seed))  # fmt: skip
    if not (features / "manifest.json").exists():
        gpurec("preprocess", "--input", str(raw), "--out", str(features))
    if not (train_dir / "checkpoints" / "latest").exists():
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps else []
        gpurec("train", "--data", str(features), "--out", str(train_dir), *steps)
        gpurec("evaluate", "--checkpoint", str(train_dir), "--data", str(features))
    if not (repo / "feed").is_dir():
        gpurec("export", "--checkpoint", str(train_dir), "--repo", str(repo),
               "--feature-store", store_url, "--event-log", log_url)  # fmt: skip

    live.mkdir(parents=True, exist_ok=True)
    join_args = ["join", "--log", log_url, "--feature-store", store_url, "--time-scale", str(args.speedup),
                 "--window-s", str(WINDOW_S), "--grace-s", str(WINDOW_S), "--idle-s", str(60),
                 "--create-partitions", str(JOINER_PARTITIONS)]  # fmt: skip
    print(f"$ gpurec {' '.join(join_args)} &", file=show, flush=True)
    joiner_log = (live / "joiner.log").open("w")
    joiner = subprocess.Popen(
        [sys.executable, "-m", "gpurec.cli", *join_args, "--json"],
        stdout=joiner_log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        simulated = json.loads(
            gpurec("simulate", "--repo", str(repo), "--log", log_url, "--feature-store", store_url,
                   "--world", str(raw), "--users", str(args.live_users), "--rate", str(args.rate),
                   "--duration", str(args.live_seconds), "--speedup", str(args.speedup),
                   "--partitions", str(JOINER_PARTITIONS), "--json", capture=True).strip().splitlines()[-1]
        )  # fmt: skip
    finally:
        _stop(joiner)
        joiner_log.close()
    # Close every window that the traffic opened: the drained joiner's report has the totals.
    joined = json.loads(
        gpurec("join", "--log", log_url, "--feature-store", store_url, "--window-s", str(WINDOW_S),
               "--grace-s", str(WINDOW_S), "--drain", "--json", capture=True).strip().splitlines()[-1]
    )  # fmt: skip
    summary = _summary(simulated, joined, out, log_url, store_url)
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
    return 0


def _stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (the joiner finishes its step and commits), then SIGKILL of its group if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _summary(simulated: dict[str, Any], joined: dict[str, Any], out: Path, log_url: str, store_url: str) -> dict[str, Any]:
    counters = joined.get("counters", {})
    dead = counters.get("dead_letters", {})
    return {
        "requests": simulated.get("requests", 0),
        "requests_per_s": simulated.get("achieved_rate"),
        "served_rows": simulated.get("served_rows", 0),
        "actions": simulated.get("actions", 0),
        "uploads": simulated.get("uploads", 0),
        "examples": counters.get("examples", 0),
        "positives": counters.get("positives", 0),
        "late_actions": counters.get("late", 0),
        "duplicate_actions": counters.get("duplicates", 0),
        "dead_letter": sum(dead.values()) if isinstance(dead, dict) else dead,
        "dead_letter_by_reason": dead,
        "non_consenting_rows": counters.get("non_consenting", 0),
        "feed_p50_ms": simulated.get("feed_p50_ms"),
        "feed_p99_ms": simulated.get("feed_p99_ms"),
        "errors": simulated.get("errors", {}),
        "event_log": log_url,
        "feature_store": store_url,
        "joiner_log": str(out / "live" / "joiner.log"),
        "repo": str(out / "repo"),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _print(s: dict[str, Any]) -> None:
    p50 = f"{s['feed_p50_ms']:.1f}" if s["feed_p50_ms"] is not None else "-"
    p99 = f"{s['feed_p99_ms']:.1f}" if s["feed_p99_ms"] is not None else "-"
    rate = f"{s['requests_per_s']:.1f}" if s["requests_per_s"] is not None else "-"
    print(
        f"\nlive: {s['requests']:,} feed requests ({rate}/s), p50 {p50} ms, p99 {p99} ms; "
        f"{s['served_rows']:,} served rows, {s['actions']:,} actions, {s['uploads']:,} uploads\n"
        f"join: {s['examples']:,} examples ({s['positives']:,} positive), {s['late_actions']:,} late and "
        f"{s['duplicate_actions']:,} duplicate actions, {s['dead_letter']:,} dead letters {s['dead_letter_by_reason']}, "
        f"{s['non_consenting_rows']:,} rows of users without training consent\n"
        f"where: event log {s['event_log']} (topics items, served, actions, examples, joiner.dead_letter), "
        f"feature store {s['feature_store']}, joiner log {s['joiner_log']}, model repository {s['repo']}"
    )
