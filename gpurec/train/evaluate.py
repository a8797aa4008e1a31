"""Offline evaluation: a trained checkpoint and its baselines, scored on a held-out time split.

Every predictor (the model, popularity, logistic regression, the simulator's oracle) scores the
same rows in the same order, and every number comes from `gpurec.train.metrics`, so the columns of
the report differ only in the predictor. The model runs unsharded on CPU under `torch.no_grad()`
over the split in file order (no shuffle, no dropped tail): every row counts once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpurec.data import logs
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.model.checkpoint import find_checkpoint
from gpurec.model.dlrm import MultiTaskDLRM
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import Manifest, load_manifest
from gpurec.train.baselines import (
    LOGREG_MAX_ROWS,
    logreg_scores,
    oracle_scores,
    popularity_scores,
    read_split,
    sample_train,
    scan_split,
)
from gpurec.train.data import LoaderConfig, ParquetBatches
from gpurec.train.metrics import binary_metrics

METRICS: tuple[str, ...] = ("auc", "ne", "calibration", "logloss")


def task_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """AUC, normalized entropy, calibration and log loss of one task's probabilities."""
    computed = binary_metrics(labels, predictions)
    return {
        "auc": computed["auc"],
        "ne": computed["normalized_entropy"],
        "calibration": computed["calibration"],
        "logloss": computed["logloss"],
    }


def model_scores(
    model: MultiTaskDLRM,
    remap: nn.Module,
    manifest: Manifest,
    files: list[Path],
    batch_size: int = 8192,
) -> dict[str, np.ndarray]:
    """The model's probability per task for every row of `files`, in file order."""
    loader = ParquetBatches(files, manifest, LoaderConfig(batch_size=batch_size, shuffle=False, drop_last=False))
    parts: dict[str, list[np.ndarray]] = {task: [] for task in model.heads}
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(batch.dense_features, remap(batch.sparse_features))
            for task, part in parts.items():
                part.append(torch.sigmoid(logits[task]).double().numpy())
    return {task: np.concatenate(part) for task, part in parts.items()}


def oracle_log_dir(manifest: Manifest) -> Path | None:
    """The raw logs the features came from, if they are still there and hold an oracle log."""
    raw = manifest.source.get("input")
    if raw is None or not logs.list_days(raw, "oracle"):
        return None
    return Path(raw)


def _check_compatible(path: Path, num_dense: int, model: MultiTaskDLRM, manifest: Manifest) -> None:
    """Refuse features the checkpoint was not trained on: a mismatch would fail deep in the model,
    or worse, silently score columns in the wrong places."""
    missing = [t for t in model.heads if t not in manifest.label_names]
    if missing:
        raise InvalidInput(f"model tasks {missing} have no label column in the features (labels: {manifest.label_names})")
    sparse = [f.name for f in manifest.sparse_features]
    if num_dense != len(manifest.dense_features) or model.sparse_feature_names != sparse:
        raise InvalidInput(
            f"{path} was trained on other features ({num_dense} dense, sparse {model.sparse_feature_names}) "
            f"than the data holds ({len(manifest.dense_features)} dense, sparse {sparse})"
        )


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path,
    split: str = "test",
    batch_size: int = 8192,
    oracle_dir: str | Path | None = None,
    logreg_max_rows: int = LOGREG_MAX_ROWS,
) -> dict[str, Any]:
    """Score a checkpoint and the baselines on one split; the result is the `--json` report.

    `checkpoint`: a checkpoint directory or a training run directory (its best validated checkpoint,
    else its latest: `find_checkpoint`).
    `oracle_dir`: raw logs holding the oracle; default: the manifest's source input directory,
    and `oracle` is None when that has no oracle log (real data, or the logs were moved).
    `logreg_max_rows`: the logistic regression trains on a seeded sample of this many train rows
    when the split is larger. Raises FileNotFoundError for a missing checkpoint, manifest or
    explicit oracle log, ValueError for a missing or empty split or a checkpoint trained on other
    features or labels.
    """
    path = find_checkpoint(checkpoint)
    manifest = load_manifest(data_dir)
    raw = oracle_log_dir(manifest) if oracle_dir is None else Path(oracle_dir)
    if oracle_dir is not None and not logs.list_days(raw, "oracle"):
        raise InputNotFound(f"no oracle log under {raw} (expected {raw / 'oracle'}/day=YYYY-MM-DD/*.parquet)")
    rows = read_split(manifest, data_dir, split)
    model, remap, run = load_trained_model(path)
    tasks = list(model.heads)
    _check_compatible(path, run.num_dense, model, manifest)

    labels = {t: rows[t].to_numpy().astype(np.float64) for t in tasks}
    predictions = model_scores(model, remap, manifest, manifest.split_files(split, data_dir), batch_size)
    if any(p.size != rows.height for p in predictions.values()):
        raise RuntimeError("the model scored a different number of rows than the split holds")

    def scored(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        try:
            return {t: task_metrics(labels[t], p) for t, p in scores.items()}
        except ValueError as err:  # e.g. a split with a single class has no AUC
            raise InvalidInput(f"{data_dir} split {split!r}: {err}") from err

    train = scan_split(manifest, data_dir, "train")
    baselines = {
        "popularity": scored(popularity_scores(train.select("item_id", *tasks), rows, tasks)),
        "logreg": scored(logreg_scores(sample_train(manifest, data_dir, logreg_max_rows), rows, manifest, tasks)),
    }
    oracle = None if raw is None else scored(oracle_scores(rows, logs.scan(raw, "oracle"), tasks))
    return {
        "tasks": scored(predictions),
        "baselines": baselines,
        "oracle": oracle,
        "split": split,
        "rows": rows.height,
        "checkpoint": str(path),
        "data": str(Path(data_dir)),
    }
