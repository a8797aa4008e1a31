"""Validation during training: a saved checkpoint's AUC per task on the valid split.

It scores exactly what `gpurec evaluate --split valid` scores: the checkpoint loaded into the
unsharded model with every rank's id-map partition merged (`load_trained_model`), sigmoid of the
logits, exact AUC (`gpurec.train.metrics.auc`). So the number that picks the best checkpoint is
the number a user can reproduce, and it does not depend on the world size or sharding.

Under torchrun every rank loads the checkpoint (a collective read), scores its slice of each batch
of the valid split, and rank 0 computes the AUC from everyone's (label, probability) pairs and
broadcasts it: every rank gets the same numbers and so takes the same stopping decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import Validation
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import Manifest
from gpurec.train.data import LoaderConfig, ParquetBatches
from gpurec.train.metrics import auc

VALID = "valid"


def has_valid_rows(manifest: Manifest) -> bool:
    """Whether the features have a non-empty valid split (too few days of input leave none)."""
    return VALID in manifest.splits and manifest.splits[VALID].rows > 0


def check_valid_labels(manifest: Manifest, data_dir: str | Path, tasks: Sequence[str]) -> None:
    """InvalidInput, before training starts, when a task's labels in the valid split are all one
    class: its AUC is undefined, so validation would fail after the first epoch."""
    tasks = [t for t in tasks if t in manifest.label_names]  # a missing label is named by the trainer
    labels = pq.read_table(manifest.split_files(VALID, data_dir), columns=tasks)
    for task in tasks:
        column = labels[task]
        positives = pc.sum(column.cast("int64")).as_py() or 0
        if positives in (0, len(column)):
            raise InvalidInput(
                f"the valid split of {data_dir} has only {'positive' if positives else 'negative'} {task!r} labels, "
                "so its AUC is undefined: preprocess more days, or train with --no-validate ([train] validate = false)"
            )


def validation_auc(
    checkpoint: str | Path,
    manifest: Manifest,
    data_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8192,
) -> dict[str, float]:
    """The checkpoint's valid-split AUC per task; collective when the process group has several ranks."""
    model, remap, _ = load_trained_model(checkpoint)
    columns = {name: i for i, name in enumerate(manifest.label_names)}
    loader = ParquetBatches(
        manifest.split_files(VALID, data_dir),
        manifest,
        LoaderConfig(batch_size=batch_size, shuffle=False, drop_last=False),
        rank=rank,
        world_size=world_size,
    )
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {task: [] for task in model.heads}
    with torch.no_grad():
        for batch in loader:
            if batch.labels.shape[0] == 0:  # a tail shorter than the world size leaves some ranks none
                continue
            logits = model(batch.dense_features, remap(batch.sparse_features))
            for task, part in parts.items():
                part.append(
                    (
                        batch.labels[:, columns[task]].double().numpy(),
                        torch.sigmoid(logits[task]).double().numpy(),
                    )
                )
    local = {task: _concat(part) for task, part in parts.items()}
    if world_size == 1:
        return _aucs(local)
    gathered: list[dict | None] = [None] * world_size if rank == 0 else None
    dist.gather_object(local, gathered, dst=0)
    result = [None]
    if rank == 0:
        merged = {task: _concat([g[task] for g in gathered]) for task in local}
        result = [_aucs(merged)]
    dist.broadcast_object_list(result, src=0)  # rank 0's numbers decide for everyone
    return result[0]


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _aucs(scored: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    return {task: auc(labels, predictions) for task, (labels, predictions) in scored.items()}


def record_validation(validation: Validation, step: int, aucs: dict[str, float]) -> bool:
    """Add one validation's AUCs (score: their mean over tasks) to the record; True when it is a
    new best. Ties keep the earlier checkpoint: fewer steps, same score."""
    score = sum(aucs.values()) / len(aucs)
    improved = validation.best_score is None or score > validation.best_score
    validation.rounds += 1
    validation.last_step = step
    if improved:
        validation.best_step, validation.best_score, validation.best_auc = step, score, dict(aucs)
        validation.since_best = 0
    else:
        validation.since_best += 1
    return improved
