"""`gpurec train`: train the ranker on preprocessed features (one process or under torchrun).

    gpurec train --data runs/demo/features --out runs/demo/train
    torchrun --nproc_per_node 2 -m gpurec.cli train --data ... --out ... --sharding row_wise

Training resumes from `<out>/checkpoints/latest` when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
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
    summary = train(args.data, args.out, model_config, train_config, progress=not args.json)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary) if args.json else _human(summary))
    return 0


def _human(summary: dict) -> str:
    return (
        f"trained {summary['steps']} steps ({summary['samples']:,} samples) on {summary['world_size']} x "
        f"{summary['device']} at {summary['samples_per_s']:,} samples/s, loss {summary['loss']:.4f}; "
        f"waited {summary['data_wait_s']} s on data; checkpoint {summary['checkpoint']}"
    )
