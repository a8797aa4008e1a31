"""`gpurec generate`: write the synthetic world's logs, or convert a real dataset, as Parquet.

Synthetic: `World` + the batch simulator, day by day, each day's impressions, actions and oracle
written as soon as it is simulated (memory holds one day). Items are written by upload day and
users by signup day, like the other logs. `world.json` records the exact config, so a manifest
downstream can say what world its features came from, and the same seed regenerates it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from gpurec.checks import iso_day, non_negative_int, output_dir, positive_int
from gpurec.data import logs
from gpurec.data.calibration import compute_stats, report
from gpurec.data.pseudonym import Pseudonymizer, add_key_file_argument, load_pseudonymizer, write_key_id
from gpurec.data.schema import LOGS
from gpurec.data.simulator import items_table, next_request_id_after, simulate_day, users_table
from gpurec.data.world import BehaviourConfig, World, WorldConfig
from gpurec.errors import InvalidInput, OutputExists

DATASETS = ("synthetic", "movielens-100k")
WORLD_FILE = "world.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output directory for the logs")
    parser.add_argument("--dataset", choices=DATASETS, default="synthetic", help="default: synthetic")
    parser.add_argument("--users", type=positive_int, default=WorldConfig.users)
    parser.add_argument("--items", type=positive_int, default=WorldConfig.items)
    parser.add_argument("--days", type=positive_int, default=WorldConfig.days)
    parser.add_argument("--seed", type=non_negative_int, default=WorldConfig.seed)
    parser.add_argument("--start-day", type=iso_day, default=WorldConfig.start_day, help="first day, YYYY-MM-DD (UTC)")
    parser.add_argument("--overwrite", action="store_true", help="replace logs already in --out")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the statistics")
    add_key_file_argument(parser, "write pseudonymous user ids keyed by this file")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse to append to existing logs (parts would double every row) unless told to replace.

    Raises InvalidInput when `out` (or a parent) is a file, OutputExists when it holds logs.
    """
    output_dir(out, "--out")
    existing = [name for name in LOGS if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExists(f"{out} already holds logs {existing}; pass --overwrite to replace them")
    for name in existing:
        shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)


def generate_synthetic(
    config: WorldConfig, out: Path, progress: bool = False, pseudonymizer: Pseudonymizer | None = None
) -> dict:
    """Simulate `config.days` days into `out`; return counts, speed and calibration statistics.

    With a `pseudonymizer` every user_id written is a pseudonym (the world's raw ids stay in memory)
    and `out`/pseudonym.json records its key id.
    """
    started = time.perf_counter()
    world = World(config)
    # The platform's logs get pseudonyms; world.json and the oracle stay the world's (simulator) side.
    edge = pseudonymizer.replace_user_ids if pseudonymizer is not None else (lambda table: table)
    write_key_id(out, pseudonymizer.key_id if pseudonymizer is not None else None)
    logs.write_by_day(edge(users_table(world)), out, "users")
    logs.write_by_day(items_table(world), out, "items")
    columns: dict[str, list[np.ndarray]] = {
        k: [] for k in ("watch", "like", "share", "comment", "follow", "user", "day", "item")
    }
    request_id = 1
    days = range(config.days)
    if progress:
        from tqdm import tqdm

        days = tqdm(days, desc="generate", unit="day")
    for day in days:
        day_logs = simulate_day(world, day, request_id)
        request_id = next_request_id_after(day_logs, request_id)
        # Sessions that cross midnight put impressions (and their oracle rows) on the next day, and
        # late actions too: every log is partitioned by its own timestamp, as the schema says.
        impression_days = pc.strftime(day_logs.impressions["ts"], format="%Y-%m-%d")
        for name in pc.unique(impression_days).to_pylist():
            on_day = pc.equal(impression_days, name)
            logs.write_day(edge(day_logs.impressions.filter(on_day)), out, "impressions", name)
            logs.write_day(day_logs.oracle.filter(on_day), out, "oracle", name)
        logs.write_by_day(day_logs.actions, out, "actions")
        actions = day_logs.actions
        columns["watch"].append(actions["watch_ms"].to_numpy())
        for flag in ("like", "share", "comment", "follow"):
            columns[flag].append(actions[flag].to_numpy(zero_copy_only=False))
        columns["user"].append(day_logs.user_index)
        columns["item"].append(day_logs.item_index)
        columns["day"].append(np.full(len(day_logs.user_index), day))
    seconds = time.perf_counter() - started
    cat = {k: np.concatenate(v) if v else np.empty(0) for k, v in columns.items()}
    n = len(cat["user"])
    stats = (
        compute_stats(
            cat["watch"],
            world.item_duration_ms[cat["item"]],
            cat["like"],
            cat["share"],
            cat["comment"],
            cat["follow"],
            cat["user"],
            cat["day"],
            cat["item"],
            config.items,
            world.item_duration_ms,
        )
        if n
        else {}
    )
    (out / WORLD_FILE).write_text(
        json.dumps({"generator": "gpurec.data.world", "config": dataclasses.asdict(config)}, indent=2)
    )
    return {
        "dataset": "synthetic",
        "out": str(out),
        "impressions": n,
        "users": config.users,
        "items": config.items,
        "days": config.days,
        "seconds": round(seconds, 3),
        "pseudonym_key_id": pseudonymizer.key_id if pseudonymizer is not None else None,
        "impressions_per_s": round(n / seconds),
        "stats": report(stats),
    }


def load_world_config(path: Path) -> WorldConfig:
    """The WorldConfig that generated a log directory (from its world.json)."""
    raw = json.loads((Path(path) / WORLD_FILE).read_text())["config"]
    raw["behaviour"] = BehaviourConfig(**raw["behaviour"])
    return WorldConfig(**raw)


def run(args: argparse.Namespace) -> int:
    pseudonymizer = load_pseudonymizer(args.pseudonym_key_file)  # a bad key file fails before any write
    prepare_out_dir(args.out, args.overwrite)
    if args.dataset == "movielens-100k":
        if pseudonymizer is not None:
            raise InvalidInput("--pseudonym-key-file is for the synthetic world; movielens-100k keeps its public ids")
        write_key_id(args.out, None)  # a pseudonym.json left by an overwritten synthetic run would lie
        from gpurec.data.movielens import convert_movielens_100k

        result = {"dataset": "movielens-100k", "out": str(args.out), **convert_movielens_100k(args.out)}
    else:
        config = WorldConfig(
            users=args.users, items=args.items, days=args.days, seed=args.seed, start_day=args.start_day
        )
        result = generate_synthetic(config, args.out, progress=not args.json, pseudonymizer=pseudonymizer)
        if result["impressions"] == 0:  # logs with nothing in them would only fail later, in preprocess
            raise InvalidInput(
                f"the world of {config.users} users, {config.items} items and {config.days} days produced no impressions; "
                "give it more users and items"
            )
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    return 0


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if result["dataset"] != "synthetic":
        console.print({k: v for k, v in result.items()})
        return
    console.print(
        f"[bold]generated[/] {result['impressions']:,} impressions, {result['users']:,} users, "
        f"{result['items']:,} items, {result['days']} days in {result['seconds']} s "
        f"({result['impressions_per_s']:,}/s) -> {result['out']}"
    )
    table = Table("statistic", "value", "published range", "")
    for name, s in result["stats"].items():
        mark = "ok" if s["in_range"] else ("off" if s["calibrated"] else "reference")
        table.add_row(name, f"{s['value']:.4g}", f"{s['target'][0]:g} - {s['target'][1]:g}", mark)
    console.print(table)
