"""Forgetting one user: `gpurec forget` (request + purge + verify) against rebuilding the derived state.

    .venv/bin/python bench/forget.py [--users 600] [--items 1200] [--days 4] [--max-steps 60]

Builds a workspace in a temporary directory with the project's own commands (`gpurec generate`,
`preprocess`, `train` with tests/configs/small.toml, `export` with the feed pointing at the
workspace's live/features.db and live/log.db), puts every user and item into the online feature
store with the first impressions, and puts ``--log-impressions`` impressions as `served` rows (and
their actions) on the event log, so every artifact that forgetting touches holds data. Then, for
``--forget`` users (the ones with the most impressions), it times the steps of
`gpurec.privacy.forget.forget_user` one by one: the request (store + `consent` topic), the purge
(log, raw and feature Parquet, checkpoints, sync dir, Triton repository) and the verifier. The
bounded wait for an online trainer is left out: none runs here, and the CLI's `--wait-s` sets it.

The baseline, measured in the same run after the forgets, is what forgetting replaces: rebuilding
the derived state from the purged raw logs (`gpurec preprocess` + `gpurec train` of the same config
and step count + `gpurec export`). Every command runs in this process through `gpurec.cli.main`,
so neither side pays interpreter or import start-up. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL_CONFIG = ROOT / "tests" / "configs" / "small.toml"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def gpurec(*argv: str) -> float:
    """Run one `gpurec` command in this process (its output to stderr); seconds it took."""
    from gpurec.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"bench/forget.py: `gpurec {' '.join(map(str, argv))}` exited {code}")
    return time.perf_counter() - start


def derive(ws_root: Path, raw: Path, out: Path, args: argparse.Namespace, live: Path) -> dict[str, float]:
    """preprocess + train + export from `raw` into out/{features,train,repo}: seconds per step."""
    steps = {"preprocess": gpurec("preprocess", "--input", raw, "--out", out / "features", "--engine", "cpu")}
    train = ["train", "--data", out / "features", "--out", out / "train", "--config", SMALL_CONFIG]
    steps["train"] = gpurec(*train, "--max-steps", args.max_steps, "--device", "cpu")
    steps["export"] = gpurec(
        "export", "--checkpoint", out / "train", "--repo", out / "repo",
        "--feature-store", f"sqlite:///{live / 'features.db'}", "--event-log", f"sqlite:///{live / 'log.db'}",
    )  # fmt: skip
    return steps


def fill_live(ws, n_impressions: int) -> list[int]:
    """Profiles, items and impressions in the store; served rows and actions on the log. Returns
    the users with the most impressions in the logged slice (the ones to forget first)."""
    import polars as pl
    import pyarrow.parquet as pq

    from gpurec.data.hashing_core import hash_id
    from gpurec.features.store import open_feature_store
    from gpurec.stream.log import Record, open_event_log
    from gpurec.stream.records import Action, ModelInputs, ServedRow, encode, encode_inputs

    def read(name: str) -> pl.DataFrame:
        return pl.read_parquet(ws.raw / name / "**" / "*.parquet", hive_partitioning=False)

    impressions = read("impressions").sort("ts").head(n_impressions)
    impressions = impressions.with_columns(pl.col("ts").dt.epoch("ms").alias("ts_ms"))
    actions = read("actions").join(impressions.select("request_id", "item_id", "user_id"), on=["request_id", "item_id"])
    actions = actions.with_columns(pl.col("ts").dt.epoch("ms").alias("ts_ms"))
    with open_feature_store(ws.feature_store_url) as store:
        store.put_users(pq.read_table(ws.raw / "users"))
        store.put_items(pq.read_table(ws.raw / "items"))
        store.record_impressions(impressions.select("request_id", "item_id", "user_id", "ts_ms").to_dict(as_series=False))
    served, acted = [], []
    for row in impressions.iter_rows(named=True):
        sparse = {"user_id": (hash_id(row["user_id"], "user_id"),), "item_id": (hash_id(row["item_id"], "item_id"),)}
        inputs = encode_inputs(ModelInputs((0.5,) * 8, sparse))
        record = ServedRow(row["request_id"], row["item_id"], row["user_id"], row["ts_ms"], row["position"], "v1", 9000, True, inputs)
        served.append(Record(row["user_id"], encode(record), row["ts_ms"]))
    for i, row in enumerate(actions.iter_rows(named=True)):
        flags = (bool(row[k]) for k in ("like", "share", "comment", "follow", "skip"))
        record = Action(i, row["request_id"], row["item_id"], row["user_id"], row["ts_ms"], int(row["watch_ms"]), *flags)
        acted.append(Record(row["user_id"], encode(record), row["ts_ms"]))
    with open_event_log(ws.event_log_url) as event_log:
        for topic in ("served", "actions"):
            event_log.create_topic(topic, 4)
        event_log.append("served", served)
        event_log.append("actions", acted)
    log(f"live: {len(served)} served rows, {len(acted)} actions on the log; store filled")
    counts = impressions.group_by("user_id").len().sort(["len", "user_id"], descending=True)
    return [int(u) for u in counts["user_id"]]


def forget_one(ws, user: int) -> dict[str, float | bool]:
    """The steps of `forget_user` (no trainer wait), timed one by one."""
    from gpurec.privacy.forget import purge_artifacts, request_forget, verify

    start = time.perf_counter()
    request_forget(ws, user)
    requested = time.perf_counter()
    purge_artifacts(ws, user, user)
    purged = time.perf_counter()
    verdict = verify(ws, user, user)["verification"]
    done = time.perf_counter()
    if not verdict["verified"]:
        log(f"user {user}: traces left: {verdict.get('traces')}")
    return {
        "request_s": requested - start,
        "purge_s": purged - requested,
        "verify_s": done - purged,
        "forget_s": done - start,
        "verified": bool(verdict["verified"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--items", type=int, default=1200)
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-steps", type=int, default=60, help="training steps, the same for build and rebuild")
    parser.add_argument("--forget", type=int, default=3, help="users to forget, one after another")
    parser.add_argument("--log-impressions", type=int, default=20_000, help="impressions put on the event log as served rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="build the workspace here and keep it (default: a temporary directory)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from gpurec.model.library_warnings import quiet_library_warnings
    from gpurec.workspace import Workspace

    quiet_library_warnings()
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-forget-"))
        root = Path(tmp) / "ws"
        (root / "live").mkdir(parents=True)
        log(f"building the workspace ({args.users} users, {args.items} items, {args.days} days)")
        gpurec("generate", "--users", args.users, "--items", args.items, "--days", args.days, "--seed", args.seed, "--out", root / "raw")
        build = derive(root, root / "raw", root, args, root / "live")
        log(f"built: {', '.join(f'{k} {v:.1f} s' for k, v in build.items())}")
        ws = Workspace.open(root)
        users = fill_live(ws, args.log_impressions)[: args.forget]

        runs = []
        for user in users:
            runs.append(forget_one(ws, user))
            log(f"forget {user}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items() if k.endswith("_s")))

        # Baseline: the derived state rebuilt from the purged raw logs, same config and steps.
        rebuild = derive(root, root / "raw", Path(tmp) / "rebuild", args, root / "live")
        rebuild_s = sum(rebuild.values())
        log(f"rebuild: {', '.join(f'{k} {v:.1f} s' for k, v in rebuild.items())} = {rebuild_s:.1f} s")

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    forget_s = median("forget_s")
    result = {
        "bench": "forget",
        "workspace": f"{args.users} users, {args.items} items, {args.days} days, seed {args.seed}; small.toml, {args.max_steps} steps",
        "users_forgotten": len(runs),
        "forget_s_median": forget_s,
        "request_s_median": median("request_s"),
        "purge_s_median": median("purge_s"),
        "verify_s_median": median("verify_s"),
        "forget_s": [round(r["forget_s"], 3) for r in runs],
        "baseline": "rebuild from the purged raw logs: gpurec preprocess + train (same config and steps) + export",
        "rebuild_s": round(rebuild_s, 3),
        "rebuild_steps_s": {k: round(v, 3) for k, v in rebuild.items()},
        "ratio_rebuild_over_forget": round(rebuild_s / forget_s, 2),
        "verified": all(r["verified"] for r in runs),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, CPU",
    }
    print(
        f"forget: {forget_s:.2f} s per user (median of {len(runs)}; verify {result['verify_s_median']:.2f} s); "
        f"rebuild: {rebuild_s:.1f} s ({result['ratio_rebuild_over_forget']:.1f}x)"
    )
    print(json.dumps(result))
    return 0 if result["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
