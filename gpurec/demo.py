"""`gpurec demo`: the whole pipeline on the embedded default, batch stages then the live path.

    gpurec demo --out runs/demo              # what `make demo` runs after its batch stages
    gpurec demo --out runs/demo --json       # the same, ending with one JSON object

Each batch stage runs only when its output is missing under --out (so `make demo` can show them one
by one first): generate -> preprocess -> train -> evaluate -> export (the feed pointed at an
embedded feature store and event log under OUT/live). Then the live loop, for --live-seconds:
tritonserver with the feed (started by `gpurec simulate`, its ranker following the parameter
deltas), `gpurec join` keeping examples and the online counters current, `gpurec train --online`
learning from the examples and publishing deltas every second, and simulated users from the same
world requesting feeds and acting on what they were shown. At the end the joiner drains (every
window closes), the trainer trains what is left, and the figures are printed: feed latency,
requests/s, examples joined, late / duplicate / dead-letter counts, examples trained, deltas
served, freshness (action -> served score) p50/p95, online vs frozen like-AUC on the same live
examples (each scored before the online model trained on it), table occupancy, and where
everything went. Every process it starts is stopped, by PID, also on Ctrl-C.

A driver like `gpurec.cli`: it runs the stages' own commands as child processes, one after
another, so each stage's output and errors are exactly what that command shows on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpurec.checks import non_negative_int, positive_float, positive_int
from gpurec.errors import GpurecError, InvalidInput

JOINER_PARTITIONS = 4
WINDOW_S = 600  # event-time join window: a simulated 10 minutes
# The online trainer in the demo: small batches and a 1 s sync interval, so what users do shows in
# their feeds within seconds (on 2 cores shared with the server, the joiner and the users).
ONLINE_SETTINGS = ["--batch-size", "128", "--linger-s", "0.5", "--sync-every-s", "1", "--dense-every-s", "10",
                   "--checkpoint-every-s", "15"]  # fmt: skip


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
    online, sync_dir = out / "online", live / "sync"
    _create_topics(log_url)  # before the joiner and the trainer start reading them
    join_args = ["join", "--log", log_url, "--feature-store", store_url, "--time-scale", str(args.speedup),
                 "--window-s", str(WINDOW_S), "--grace-s", str(WINDOW_S), "--idle-s", str(60)]  # fmt: skip
    online_args = ["train", "--online", "--from", log_url, "--init", str(train_dir), "--out", str(online),
                   "--sync-dir", str(sync_dir), *ONLINE_SETTINGS]  # fmt: skip
    background = []
    try:
        for argv, name in ((join_args, "joiner"), (online_args, "trainer")):
            print(f"$ gpurec {' '.join(argv)} &", file=show, flush=True)
            background.append(_start(argv, live / f"{name}.log"))
        _wait_for_first_delta(background[-1][0], sync_dir, live / "trainer.log")
        chosen: dict[str, int] = {}
        midway = _privacy_midway(args.live_seconds / 2, raw, live / "features.db", store_url, log_url, out, chosen, show)
        simulated = json.loads(
            gpurec("simulate", "--repo", str(repo), "--log", log_url, "--feature-store", store_url,
                   "--world", str(raw), "--users", str(args.live_users), "--rate", str(args.rate),
                   "--duration", str(args.live_seconds), "--speedup", str(args.speedup),
                   "--partitions", str(JOINER_PARTITIONS), "--sync-dir", str(sync_dir), "--json",
                   capture=True).strip().splitlines()[-1]
        )  # fmt: skip
    finally:
        for process, log_file in background:
            _stop(process)  # SIGTERM: the joiner commits its step, the trainer checkpoints
            log_file.close()
    midway.join()
    if len(chosen) != 2:
        raise GpurecError("the privacy step half-way through the traffic failed; see its output above")
    opted_out, forgotten = chosen["opted_out"], chosen["forgotten"]
    # Close every window that the traffic opened (the drained joiner's report has the totals), then
    # train what is left, so both models are compared on all of the live examples.
    joined = json.loads(
        gpurec("join", "--log", log_url, "--feature-store", store_url, "--window-s", str(WINDOW_S),
               "--grace-s", str(WINDOW_S), "--drain", "--json", capture=True).strip().splitlines()[-1]
    )  # fmt: skip
    live_trainer = _last_json(live / "trainer.log")  # its report when the traffic stopped
    trained = json.loads(gpurec(*online_args, "--drain", "--json", capture=True).strip().splitlines()[-1])
    trained["lag_at_traffic_end"] = live_trainer.get("lag")
    trained["forgotten_users"] = live_trainer.get("forgotten_users", 0) + trained.get("forgotten_users", 0)
    compared = _online_vs_frozen(log_url, online, train_dir)
    # The erasure's purge, with the loop stopped: log, Parquet, checkpoints, deltas, repository; then
    # the verifier searches every artifact (exit 1 when it finds a trace: reported, not fatal here).
    print(f"$ gpurec forget --workspace {out} --user {forgotten} --json", file=show, flush=True)
    command = [sys.executable, "-m", "gpurec.cli", "forget", "--workspace", str(out), "--user", str(forgotten), "--json"]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=show, text=True)
    if done.returncode not in (0, 1):
        raise GpurecError(f"`gpurec forget` failed (exit {done.returncode}); see its output above")
    erased = json.loads(done.stdout.strip().splitlines()[-1])
    privacy = {"opted_out_user": opted_out, "forgotten_user": forgotten, "forget": erased}
    summary = _summary(simulated, joined, trained, compared, out, log_url, store_url, privacy)
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
    return 0


def _last_json(path: Path) -> dict[str, Any]:
    """The last line of a stage's log as JSON (its --json report), {} if it has none."""
    lines = path.read_text().strip().splitlines() if path.exists() else []
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}


def _create_topics(log_url: str) -> None:
    from gpurec.serve.consent import create_consent_topic
    from gpurec.stream.join import ensure_topics
    from gpurec.stream.log import open_event_log

    with open_event_log(log_url) as log:
        ensure_topics(log, JOINER_PARTITIONS)
        create_consent_topic(log, JOINER_PARTITIONS)  # the joiner and the trainer follow it from their start


def _privacy_users(raw: Path, store_path: Path) -> tuple[int, int]:
    """Of the users the simulation put in the online store (the live ones), the two with the most
    impressions in the world's logs: one opts out, one is forgotten. (The embedded store's file is
    read directly: the store interface has no listing, and a demo needs none elsewhere.)"""
    import sqlite3

    import polars as pl

    with contextlib.closing(sqlite3.connect(f"file:{store_path}?mode=ro", uri=True)) as db:
        live = [row[0] for row in db.execute("SELECT user_id FROM users WHERE consent_personalisation AND consent_training")]
    counts = (
        pl.scan_parquet(raw / "impressions" / "**" / "*.parquet", hive_partitioning=False)
        .filter(pl.col("user_id").is_in(live)).group_by("user_id").len()
        .sort(["len", "user_id"], descending=[True, False]).head(2).collect()
    )  # fmt: skip
    opted_out, forgotten = counts["user_id"].to_list()
    return int(opted_out), int(forgotten)


def _privacy_midway(
    delay_s: float, raw: Path, store_path: Path, store_url: str, log_url: str, out: Path, chosen: dict[str, int], show
) -> threading.Thread:
    """Half-way through the traffic: one live user turns personalisation and training off (the
    consent model's logic, `ConsentService`), another asks to be forgotten (`gpurec forget
    --no-purge`). Their ids go into `chosen`."""

    def act() -> None:
        from gpurec.serve.consent import ConsentService
        from gpurec.serve.feed_settings import FeedSettings

        time.sleep(delay_s)
        opted_out, forgotten = _privacy_users(raw, store_path)
        service = ConsentService(FeedSettings(feature_store=store_url, event_log=log_url))
        try:
            service.apply(opted_out, personalisation=False, training=False)
        finally:
            service.close()
        print(f"privacy: user {opted_out} turned personalisation and training off", file=show, flush=True)
        command = [sys.executable, "-m", "gpurec.cli", "forget", "--workspace", str(out), "--user", str(forgotten), "--no-purge"]
        if subprocess.run(command, stdout=show, stderr=show, check=False).returncode == 0:
            chosen.update(opted_out=opted_out, forgotten=forgotten)  # both done: the demo goes on

    thread = threading.Thread(target=act, name="privacy-midway", daemon=True)
    thread.start()
    return thread


def _start(argv: list[str], log_path: Path) -> tuple[subprocess.Popen, Any]:
    """A long-running stage in its own process group (so a hang can be killed whole), output to a file."""
    log_file = log_path.open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two cores shared with the server and the users
    process = subprocess.Popen(
        [sys.executable, "-m", "gpurec.cli", *argv, "--json"],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    return process, log_file


def _wait_for_first_delta(trainer: subprocess.Popen, sync_dir: Path, log_path: Path, timeout_s: float = 300.0) -> None:
    """Traffic starts once the trainer has published its first snapshot (it is loaded and
    following the log), so its start-up (importing torch, loading the checkpoint) does not compete
    with the first feed requests for the two cores."""
    from gpurec.sync.deltafile import list_deltas

    deadline = time.monotonic() + timeout_s
    while not list_deltas(sync_dir):
        if trainer.poll() is not None:
            raise GpurecError(f"the online trainer stopped (exit {trainer.returncode}); see {log_path}")
        if time.monotonic() > deadline:
            raise GpurecError(f"the online trainer published nothing in {timeout_s:.0f} s; see {log_path}")
        time.sleep(0.2)


def _online_vs_frozen(log_url: str, online: Path, frozen: Path) -> dict[str, Any]:
    from gpurec.model.library_warnings import quiet_library_warnings
    from gpurec.stream.log import open_event_log
    from gpurec.sync.progressive import online_vs_frozen

    quiet_library_warnings()

    with open_event_log(log_url) as log:
        return online_vs_frozen(log, online, frozen)


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


def _summary(
    simulated: dict[str, Any],
    joined: dict[str, Any],
    trained: dict[str, Any],
    compared: dict[str, Any],
    out: Path,
    log_url: str,
    store_url: str,
    privacy: dict[str, Any],
) -> dict[str, Any]:
    counters = joined.get("counters", {})
    erased = privacy["forget"]
    verification = erased.get("verification", {})
    dead = counters.get("dead_letters", {})
    tables = trained.get("id_tables") or {}
    return {
        "requests": simulated.get("requests", 0),
        "requests_per_s": simulated.get("achieved_rate"),
        "served_rows": simulated.get("served_rows", 0),
        "unlogged_rows": simulated.get("unlogged_rows", 0),  # a forgotten user's: answered, never logged
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
        "serve_p50_ms": simulated.get("feed_p50_ms"),  # what a user waits for a feed, sync running
        "serve_p99_ms": simulated.get("feed_p99_ms"),
        "auc_online": compared.get("auc_online_like"),  # like-AUC, progressive: scored before trained on
        "auc_frozen": compared.get("auc_frozen_like"),  # the batch model it started from, same examples
        "auc_online_finish": compared.get("auc_online_finish"),
        "auc_frozen_finish": compared.get("auc_frozen_finish"),
        "examples_scored": compared.get("examples_scored", 0),
        "examples_trained": trained.get("examples_total", 0),
        "trainer_lag_at_traffic_end": trained.get("lag_at_traffic_end"),  # examples not yet trained
        "freshness_p50_s": simulated.get("freshness_p50_s"),
        "freshness_p95_s": simulated.get("freshness_p95_s"),
        "freshness_breakdown_p50_s": simulated.get("freshness_breakdown_p50_s"),
        "deltas_applied": simulated.get("deltas_served", 0),
        "table_occupancy": {name: round(t["occupancy"], 4) for name, t in tables.items()},
        "errors": simulated.get("errors", {}),
        "event_log": log_url,
        "feature_store": store_url,
        "joiner_log": str(out / "live" / "joiner.log"),
        "trainer_log": str(out / "live" / "trainer.log"),
        "online_run": str(out / "online"),
        "sync_dir": str(out / "live" / "sync"),
        "repo": str(out / "repo"),
        "workspace": str(out.resolve()),
        "opted_out_user": privacy["opted_out_user"],
        "forgotten_user": privacy["forgotten_user"],
        "forget_verified": bool(verification.get("verified")),
        "forget_traces": len(verification.get("traces", [])),
        "forget_purged": erased.get("purged", {}),
        "forgotten_users_trained": trained.get("forgotten_users", 0),
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
        f"loop: {s['examples_trained']:,} examples trained online ({s['trainer_lag_at_traffic_end']} waiting when "
        f"the traffic stopped), {s['deltas_applied']:,} deltas served; "
        f"freshness (action -> served score) p50 {_num(s['freshness_p50_s'])} s, p95 {_num(s['freshness_p95_s'])} s "
        f"{s['freshness_breakdown_p50_s'] or ''}\n"
        f"AUC on the {s['examples_scored']:,} live examples, each scored before it was trained on (online / frozen "
        f"batch model): like {_num(s['auc_online'])} / {_num(s['auc_frozen'])}, finish "
        f"{_num(s['auc_online_finish'])} / {_num(s['auc_frozen_finish'])}; "
        f"id-table occupancy {s['table_occupancy']}\n"
        f"where: event log {s['event_log']} (topics items, served, actions, examples, joiner.dead_letter, sync), "
        f"feature store {s['feature_store']}, joiner log {s['joiner_log']}, trainer log {s['trainer_log']}, "
        f"online run {s['online_run']}, deltas {s['sync_dir']}, model repository {s['repo']}\n"
        f"privacy: user {s['opted_out_user']} opted out of personalisation and training half-way; user "
        f"{s['forgotten_user']} was forgotten (the online trainer reset {s['forgotten_users_trained']} user rows), "
        f"then purged from workspace {s['workspace']}: verifier "
        f"{'found no trace' if s['forget_verified'] else 'FOUND ' + str(s['forget_traces']) + ' traces'}"
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
