"""Collisionless vs hashed embedding tables at equal embedding memory (the Monolith comparison).

For each dataset (the synthetic world, MovieLens-100K) and each memory setting (rows per id), the
same model and training config is trained twice, changing only `[model.ids] kind`:

- collisionless: every admitted id has a row of its own (cuckoo map, admission, expiry, eviction);
  ids without a row read the shared default row 0;
- hashed: row = id mod rows (`ModuloRemap`), so distinct ids may share a row.

Both get the same `num_embeddings` per table (checked from the trained checkpoints), so the
embedding memory is equal and only the id -> row mapping differs. Each run is scored on the test
split (AUC of like and finish, the model alone: no baselines), and its id -> row map is measured
over the distinct ids of the training split, per sparse feature:

- collision_rate: the share of distinct ids whose own row is also the row of another distinct id
  (hashed: id mod rows; collisionless: the trained `IdLookup`, which must give 0);
- default_rate: the share of distinct ids with no row of their own at the end of training (never
  admitted, expired or evicted), which read the shared default row (always 0 for hashed).

Memory: ``rows_per_id`` r is the trainer's own `TrainConfig.rows_per_id`: each table gets r x the
manifest's cardinality estimate rows, between `min_rows` and `default_num_embeddings`, rounded up
to a multiple of 8 (a fractional r such as 0.5 makes a table smaller than the id space).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from gpurec.data.world import WorldConfig
from gpurec.errors import InvalidInput
from gpurec.model.config import ModelConfig
from gpurec.preprocess.manifest import Manifest, load_manifest
from gpurec.train.config import DEFAULT_CONFIG, TrainConfig, load_configs

DATASETS: tuple[str, ...] = ("synthetic", "movielens-100k")
ALIASES: dict[str, str] = {"movielens": "movielens-100k", "ml-100k": "movielens-100k"}
CONFIGS: dict[str, Path] = {"synthetic": DEFAULT_CONFIG, "movielens-100k": DEFAULT_CONFIG.parent / "movielens.toml"}
KINDS: tuple[str, ...] = ("collisionless", "hashed")
DEFAULT_WORLD = WorldConfig(users=2000, items=5000, days=7, seed=7)  # the `make demo` world
DEFAULT_OUT = Path("runs/experiment-collisionless")
# Per-feature counters of the collisionless train summary carried into the report.
TABLE_STATS: dict[str, str] = {
    "rows_used": "rows_used",
    "occupancy": "occupancy",
    "admitted": "admitted",
    "expired": "expired",
    "evicted": "evicted_full",
}


# ---- collision measurements -------------------------------------------------------------------


def shared_row_count(rows: np.ndarray) -> int:
    """How many entries of ``rows`` (one per distinct id) hold a row that another entry holds too.
    Negative entries (no row of their own) are not counted."""
    own = np.asarray(rows)[np.asarray(rows) >= 0]
    if own.size == 0:
        return 0
    _, inverse, counts = np.unique(own, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def collision_rate(ids: Sequence[int] | np.ndarray, num_rows: int) -> float:
    """Share of the distinct ``ids`` whose row ``id mod num_rows`` is shared with another distinct id.

    >>> collision_rate([0, 4, 1], 4)  # 0 and 4 share row 0, 1 is alone
    0.6666666666666666
    """
    distinct = np.unique(np.asarray(ids, dtype=np.int64))
    if distinct.size == 0:
        return 0.0
    return shared_row_count(np.mod(distinct, num_rows)) / distinct.size


def rows_of(remap: nn.Module, feature: str, ids: np.ndarray) -> np.ndarray:
    """The row each id reads in a trained id map; -1 where a collisionless table has no row for it."""
    values = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    return remap.feature_rows(feature, values).numpy()


def training_ids(manifest: Manifest, data_dir: Path) -> dict[str, np.ndarray]:
    """The distinct hashed ids of every sparse feature in the training split (bags flattened)."""
    from gpurec.train.baselines import scan_split

    frame = scan_split(manifest, data_dir, "train")
    queries = []
    for feature in manifest.sparse_features:
        column = pl.col(feature.column)
        if feature.multi_valued:
            column = column.explode()
        queries.append(frame.select(column.drop_nulls().unique().alias("id")))
    collected = pl.collect_all(queries)
    return {
        f.name: np.sort(part["id"].to_numpy().astype(np.int64)) for f, part in zip(manifest.sparse_features, collected, strict=True)
    }


def id_table_report(
    remap: nn.Module, ids: dict[str, np.ndarray], num_rows: dict[str, int], table_stats: Any
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Pooled and per-feature collision and default rates of a trained id map over ``ids``."""
    per_feature: dict[str, dict[str, Any]] = {}
    shared_total = missing_total = distinct_total = 0
    for feature, distinct in ids.items():
        rows = rows_of(remap, feature, distinct)
        shared, missing, n = shared_row_count(rows), int((rows < 0).sum()), int(distinct.size)
        entry: dict[str, Any] = {
            "rows": num_rows[feature],
            "distinct_ids": n,
            "collision_rate": shared / n if n else 0.0,
            "default_rate": missing / n if n else 0.0,
        }
        if isinstance(table_stats, dict) and feature in table_stats:
            stats = table_stats[feature]
            entry.update({name: round(float(stats[key]), 6) if name == "occupancy" else int(stats[key]) for name, key in TABLE_STATS.items()})
        per_feature[feature] = entry
        shared_total, missing_total, distinct_total = shared_total + shared, missing_total + missing, distinct_total + n
    pooled = {
        "collision_rate": shared_total / distinct_total if distinct_total else 0.0,
        "default_rate": missing_total / distinct_total if distinct_total else 0.0,
        "distinct_ids": distinct_total,
    }
    return pooled, per_feature


# ---- memory settings --------------------------------------------------------------------------


def with_kind(model_config: ModelConfig, kind: str) -> ModelConfig:
    return dataclasses.replace(model_config, ids=dataclasses.replace(model_config.ids, kind=kind))


# ---- data -------------------------------------------------------------------------------------


def prepare_dataset(dataset: str, root: Path, world: WorldConfig) -> Path:
    """Write the dataset's logs and features under ``root`` (from scratch); return the features."""
    from gpurec.preprocess.run import preprocess

    for name in ("raw", "features"):
        shutil.rmtree(root / name, ignore_errors=True)
    if dataset == "synthetic":
        from gpurec.data.generate import generate_synthetic

        generate_synthetic(world, root / "raw")
    else:
        from gpurec.data.movielens import convert_movielens_100k

        convert_movielens_100k(root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    return root / "features"


# ---- the study --------------------------------------------------------------------------------


def _setting_name(rows_per_id: float) -> float | int:
    return int(rows_per_id) if float(rows_per_id).is_integer() else float(rows_per_id)


def train_and_measure(
    data_dir: Path,
    run_dir: Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_ids: dict[str, np.ndarray],
    progress: bool,
) -> dict[str, Any]:
    """Train one table kind from scratch, score it on the test split, measure its id map."""
    from gpurec.model.trained import load_trained_model
    from gpurec.train.baselines import scan_split
    from gpurec.train.evaluate import model_scores, task_metrics
    from gpurec.train.recipe import train

    shutil.rmtree(run_dir, ignore_errors=True)  # no resuming from an older run
    summary = train(data_dir, run_dir, model_config, train_config, progress=progress)
    model, remap, run = load_trained_model(run_dir)
    manifest = load_manifest(data_dir)
    tasks = list(model.heads)
    labels = scan_split(manifest, data_dir, "test").select(tasks).collect()
    scores = model_scores(model, remap, manifest, manifest.split_files("test", data_dir))
    metrics = {t: task_metrics(labels[t].to_numpy().astype(np.float64), scores[t]) for t in tasks}
    num_rows = {spec.name: spec.num_embeddings for spec in run.sparse_specs}
    pooled, per_feature = id_table_report(remap, train_ids, num_rows, summary["id_tables"])
    return {
        "table": model_config.ids.kind,
        "rows": sum(num_rows.values()),
        "num_rows": num_rows,
        "embedding_dim": model_config.embedding_dim,
        "auc_like": metrics["like"]["auc"],
        "auc_finish": metrics["finish"]["auc"],
        **pooled,
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "per_feature": per_feature,
    }


def run_study(
    out: Path,
    datasets: Sequence[str] = DATASETS,
    rows_per_id: Sequence[float] = (1,),
    world: WorldConfig = DEFAULT_WORLD,
    seed: int = 7,
    epochs: int | None = None,
    max_steps: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run the whole comparison; returns ``{"results": [...], "seconds": ...}`` and writes it to
    ``out/results.json``. ``seed`` seeds the synthetic world and training."""
    started = time.perf_counter()
    out = Path(out)
    results: list[dict[str, Any]] = []
    for dataset in datasets:
        root = out / dataset
        say(f"{dataset}: writing logs and features under {root}")
        data_dir = prepare_dataset(dataset, root, dataclasses.replace(world, seed=seed))
        manifest = load_manifest(data_dir)
        train_ids = training_ids(manifest, data_dir)
        base_model, base_train = load_configs(CONFIGS[dataset], seed=seed, epochs=epochs, max_steps=max_steps)
        for setting in rows_per_id:
            model_config, train_config = base_model, dataclasses.replace(base_train, rows_per_id=setting)
            runs = []
            for kind in KINDS:
                name = _setting_name(setting)
                say(f"{dataset}: training {kind} tables at {name} rows per id")
                run_dir = root / f"rows-per-id-{name}" / kind
                result = train_and_measure(data_dir, run_dir, with_kind(model_config, kind), train_config, train_ids, progress)
                runs.append(result)
            # Equal memory: the trained checkpoints must hold tables of identical shape.
            shapes = [(r["num_rows"], r["embedding_dim"]) for r in runs]
            if any(shape != shapes[0] for shape in shapes):
                raise RuntimeError(f"{dataset}, rows_per_id {setting}: table sizes differ between kinds: {shapes}")
            for result in runs:
                del result["num_rows"], result["embedding_dim"]
                results.append({"dataset": dataset, "rows_per_id": _setting_name(setting), **result})
    report = {"results": [_ordered(r) for r in results], "seconds": round(time.perf_counter() - started, 3)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


_ORDER = ("dataset", "table", "rows", "auc_like", "auc_finish", "collision_rate", "default_rate", "rows_per_id")


def _ordered(result: dict[str, Any]) -> dict[str, Any]:
    head = {k: result[k] for k in _ORDER}
    return {**head, **{k: v for k, v in result.items() if k not in head and k != "per_feature"}, "per_feature": result["per_feature"]}


# ---- command ----------------------------------------------------------------------------------


def parse_datasets(text: str) -> list[str]:
    names = [ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names:
        raise InvalidInput(f"unknown datasets {unknown} (choose from {', '.join(DATASETS)}, or 'movielens')")
    return list(dict.fromkeys(names))


def parse_rows_per_id(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInput(f"--rows-per-id takes positive numbers separated by commas, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise InvalidInput(f"--rows-per-id takes positive numbers separated by commas, got {text!r}")
    return list(dict.fromkeys(values))


def run(args) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    datasets = parse_datasets(args.datasets)  # bad values raise InvalidInput: one line from the CLI
    settings = parse_rows_per_id(args.rows_per_id)
    world = WorldConfig(users=args.users, items=args.items, days=args.days, seed=args.seed)
    say = (lambda _: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    # With --json, stdout carries exactly one line: anything a stage prints goes to stderr.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:  # a missing dataset raises DatasetNotFound (an InputNotFound): one line from the CLI
        report = run_study(
            args.out, datasets, settings, world, args.seed, args.epochs, args.max_steps, progress=not args.json, say=say
        )
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, args.out)
    return 0


def print_report(report: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="collisionless vs hashed embedding tables at equal memory (test AUC; rates over distinct train ids)")
    for name in ("dataset", "rows/id", "table", "rows", "AUC like", "AUC finish", "collision rate", "default rate"):
        table.add_column(name, justify="left" if name in ("dataset", "table") else "right")
    results = report["results"]
    for i, r in enumerate(results):
        last = i + 1 == len(results) or (results[i + 1]["dataset"], results[i + 1]["rows_per_id"]) != (r["dataset"], r["rows_per_id"])
        table.add_row(
            r["dataset"], str(r["rows_per_id"]), r["table"], f"{r['rows']:,}", f"{r['auc_like']:.4f}", f"{r['auc_finish']:.4f}",
            f"{r['collision_rate']:.1%}", f"{r['default_rate']:.1%}", end_section=last,
        )
    detail = Table(title="per feature: hashed collision rate vs collisionless default rate, occupancy, evictions")
    for name in ("dataset", "rows/id", "feature", "rows", "train ids", "hashed collisions", "no own row", "occupancy", "evicted"):
        detail.add_column(name, justify="left" if name in ("dataset", "feature") else "right")
    by_key = {(r["dataset"], r["rows_per_id"], r["table"]): r for r in results}
    for (dataset, setting, kind), r in by_key.items():
        if kind != "collisionless":
            continue
        hashed = by_key.get((dataset, setting, "hashed"), {"per_feature": {}})["per_feature"]
        for feature, f in r["per_feature"].items():
            h = hashed.get(feature, {})
            detail.add_row(
                dataset, str(setting), feature, f"{f['rows']:,}", f"{f['distinct_ids']:,}",
                f"{h['collision_rate']:.1%}" if h else "-", f"{f['default_rate']:.1%}",
                f"{f['occupancy']:.1%}" if "occupancy" in f else "-", f"{f.get('evicted', 0):,}",
            )
    console = Console()
    if not console.is_terminal:  # a pipe or log file: wide enough for both tables, not rich's 80 columns
        console = Console(width=120)
    console.print(table)
    console.print(detail)
    console.print(f"{report['seconds']:.0f} s; runs and results.json under {out}")
