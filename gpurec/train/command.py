"""`gpurec train`: train the ranker on preprocessed features (one process or under torchrun).

    gpurec train --data runs/demo/features --out runs/demo/train
    torchrun --nproc_per_node 2 -m gpurec.cli train --data ... --out ... --sharding row_wise

Training resumes from `<out>/checkpoints/latest` when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

from gpurec.train.config import DEFAULT_CONFIG


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="features directory (with manifest.json)")
    parser.add_argument("--out", required=True, type=Path, help="run directory: checkpoints, metrics, TensorBoard")
    parser.add_argument("--config", type=Path, default=None, help=f"TOML with [model] and [train] (default {DEFAULT_CONFIG.name})")
    parser.add_argument("--epochs", type=int, help="override [train] epochs")
    parser.add_argument("--batch-size", type=int, help="override [train] batch_size (per rank)")
    parser.add_argument("--max-steps", type=int, help="override [train] max_steps")
    parser.add_argument("--sharding", help="override [train] sharding: auto, table_wise, row_wise, ...")
    parser.add_argument("--checkpoint-every", type=int, help="override [train] checkpoint_every (steps)")
    parser.add_argument("--seed", type=int, help="override [train] seed")
    parser.add_argument("--device", help="override [train] device: auto, cpu, cuda")
    parser.add_argument(
        "--id-tables", choices=["collisionless", "hashed"], help="override [model.ids] kind: own row per admitted id, or id mod rows"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    # Quiet the noisy parts of the stack before they are imported.
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    from gpurec.train.distributed import quiet_library_warnings

    quiet_library_warnings()
    from gpurec.train.config import load_configs
    from gpurec.train.recipe import train

    model_config, train_config = load_configs(
        args.config,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_steps=args.max_steps,
        sharding=args.sharding,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
    )
    if args.id_tables:
        model_config = replace(model_config, ids=replace(model_config.ids, kind=args.id_tables))
    summary = train(args.data, args.out, model_config, train_config, progress=not args.json)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary) if args.json else _human(summary))
    return 0


def _human(summary: dict) -> str:
    lines = [
        f"trained {summary['steps']} steps ({summary['samples']:,} samples) on {summary['world_size']} x "
        f"{summary['device']} at {summary['samples_per_s']:,} samples/s, loss {summary['loss']:.4f}; "
        f"waited {summary['data_wait_s']} s on data; checkpoint {summary['checkpoint']}"
    ]
    tables = summary.get("id_tables")
    if isinstance(tables, dict):
        lines.append(format_id_tables(tables))
    else:
        lines.append("id tables: hashed (row = id mod rows)")
    return "\n".join(lines)


def format_id_tables(tables: dict[str, dict[str, float]]) -> str:
    """A table of each collisionless id table's occupancy, admissions and evictions."""
    header = f"{'id table':<14}{'rows used':>16}{'occupancy':>11}{'load':>7}{'admitted':>10}{'expired':>9}{'evicted':>9}{'default path':>14}"
    lines = ["collisionless id tables (default path = occurrences without a row of their own):", header]
    for name, t in tables.items():
        default_share = t["unadmitted"] / max(1, t["occurrences"])
        lines.append(
            f"{name:<14}{t['rows_used']:>7,.0f} / {t['capacity']:<7,.0f}{t['occupancy']:>10.1%}{t['load_factor']:>7.2f}"
            f"{t['admitted']:>10,.0f}{t['expired']:>9,.0f}{t['evicted_full']:>9,.0f}{default_share:>14.2%}"
        )
    return "\n".join(lines)
