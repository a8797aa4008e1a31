"""`gpurec train`: train the ranker on preprocessed features (one process or under torchrun).

    gpurec train --data runs/demo/features --out runs/demo/train
    torchrun --nproc_per_node 2 -m gpurec.cli train --data ... --out ... --sharding row_wise

Training resumes from `<out>/checkpoints/latest` when it exists. With validation (the default)
`<out>/checkpoints/best` names the checkpoint that scored best on the valid split: the one
`gpurec evaluate` and `gpurec export` read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from gpurec.checks import non_negative_int, output_dir, positive_int, require_file
from gpurec.errors import GpurecError, InputNotFound, InvalidInput
from gpurec.preprocess.manifest import load_manifest
from gpurec.train.config import DEFAULT_CONFIG

DEVICES = ("auto", "cpu", "cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="features directory (with manifest.json)")
    parser.add_argument("--out", required=True, type=Path, help="run directory: checkpoints, metrics, TensorBoard")
    parser.add_argument("--config", type=Path, default=None, help=f"TOML with [model] and [train] (default {DEFAULT_CONFIG.name})")
    parser.add_argument("--epochs", type=positive_int, help="override [train] epochs")
    parser.add_argument("--batch-size", type=positive_int, help="override [train] batch_size (per rank)")
    parser.add_argument("--max-steps", type=non_negative_int, help="override [train] max_steps (0: all epochs)")
    parser.add_argument("--sharding", help="override [train] sharding: auto, table_wise, row_wise, ...")
    parser.add_argument("--checkpoint-every", type=non_negative_int, help="override [train] checkpoint_every (steps)")
    parser.add_argument("--seed", type=non_negative_int, help="override [train] seed")
    parser.add_argument("--validate-every", type=non_negative_int, help="override [train] validate_every (steps; 0: each epoch)")
    parser.add_argument("--patience", type=non_negative_int, help="override [train] patience (0: never stop early)")
    parser.add_argument("--no-validate", action="store_true", help="no validation: no best checkpoint, no early stopping")
    parser.add_argument("--device", choices=DEVICES, help="override [train] device")
    parser.add_argument(
        "--id-tables", choices=["collisionless", "hashed"], help="override [model.ids] kind: own row per admitted id, or id mod rows"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> int:
    # Quiet the noisy parts of the stack before they are imported.
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    # Bad input is found here, before training starts; recipe.train and load_configs do not raise
    # typed errors yet (gpurec.errors), so the command checks what they would trip over.
    output_dir(args.out, "--out")
    load_manifest(args.data).require_rows("train", args.data)
    model_config, train_config = _load_configs(args)
    from gpurec.train.recipe import train

    if args.id_tables:
        model_config = replace(model_config, ids=replace(model_config.ids, kind=args.id_tables))
    summary = train(args.data, args.out, model_config, train_config, progress=not args.json)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary) if args.json else _human(summary))
    return 0


def _load_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and train configs of --config (or the default) with the flags' overrides.

    InputNotFound for a missing file; InvalidInput for one that is not TOML, has unknown keys,
    values of the wrong type (a string where a number belongs) or out of range.
    """
    import tomllib

    from gpurec.model.config import ModelConfig
    from gpurec.train.config import TrainConfig, load_configs

    path = require_file(args.config, "--config") if args.config is not None else DEFAULT_CONFIG
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_steps": args.max_steps,
        "sharding": args.sharding,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
        "device": args.device,
        "validate_every": args.validate_every,
        "patience": args.patience,
        "validate": False if args.no_validate else None,
    }
    try:
        TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"command-line overrides: {err}") from None
    if path.suffix.lower() == ".toml":
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise InvalidInput(f"{path}: not a readable TOML file: {err}") from None
        for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
            if isinstance(document.get(section), dict):
                _check_scalar_types(document[section], cls, section, path)
    try:
        model_config, train_config = load_configs(path, **overrides)
    except GpurecError:
        raise
    except FileNotFoundError as err:
        raise InputNotFound(f"--config {path}: {err}") from None
    except (OSError, ValueError, TypeError) as err:
        message = str(err)
        raise InvalidInput(message if message.startswith(str(path)) else f"{path}: {message}") from None
    if train_config.device not in DEVICES:
        raise InvalidInput(f"{path}: [train] device must be one of {DEVICES}, got {train_config.device!r}")
    if train_config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidInput("device cuda asked for, but torch sees no CUDA device (is this the CPU build?); use --device cpu")
    return model_config, train_config


_SCALARS: dict[str, tuple[type, ...]] = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_scalar_types(values: dict[str, Any], cls: type, section: str, path: Path) -> None:
    """InvalidInput for a scalar field of `cls` given a value of the wrong type (`epochs = "two"`):
    the config classes check ranges, not types, and a string learning rate would fail deep in torch.
    Unknown keys are left to the config loader, which names them."""
    for field in dataclasses.fields(cls):
        allowed = _SCALARS.get(str(field.type))
        if allowed is None or field.name not in values:
            continue
        value = values[field.name]
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise InvalidInput(f"{path}: [{section}] {field.name} must be {field.type}, got {value!r}")


def _human(summary: dict) -> str:
    lines = [
        f"trained {summary['steps']} steps ({summary['samples']:,} samples) on {summary['world_size']} x "
        f"{summary['device']} at {summary['samples_per_s']:,} samples/s, loss {summary['loss']:.4f}; "
        f"waited {summary['data_wait_s']} s on data; checkpoint {summary['checkpoint']}"
    ]
    validation = summary.get("validation")
    if validation:
        aucs = ", ".join(f"{task} {value:.4f}" for task, value in validation["best_auc"].items())
        how = "stopped early" if validation["stopped_early"] else "ran to the end"
        lines.append(
            f"validation: best at step {validation['best_step']} ({validation['best_epochs']} epochs; valid AUC {aucs}) "
            f"of {validation['rounds']} validations, {how}"
        )
    else:
        lines.append("validation: none (off, or no valid rows): the checkpoint is the latest")
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
