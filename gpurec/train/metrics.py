"""Exact offline metrics for binary tasks: AUC, normalized entropy, calibration, log loss.

Ranking quality (AUC), probability quality (NE, log loss) and bias (calibration) disagree often
enough that a ranker is judged on all of them. NE follows He et al. 2014, "Practical lessons
from predicting clicks on ads at Facebook": log loss divided by the entropy of the base rate,
so 1.0 means "no better than predicting the average" regardless of how rare the label is.

All functions take 1-D numpy arrays, torch tensors or sequences with sklearn's argument order
``(labels, predictions)``; predictions are probabilities (apply ``sigmoid`` to logits first).
They are exact: AUC is the Mann-Whitney statistic over average ranks, so tied predictions count
one half, which is what ``sklearn.metrics.roc_auc_score`` computes.

Undefined cases raise ``ValueError`` rather than returning NaN: AUC and NE need both classes
(with one class there is no ranking to judge and the base-rate entropy is zero), calibration
needs a positive label mean. A NaN would flow silently into dashboards and model comparisons;
an error names the problem where it happens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy array, torch tensor or a sequence of numbers, 1-D

_EPS = float(np.finfo(np.float64).eps)


def _as_float64(values: ArrayLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def _validated(
    labels: ArrayLike, predictions: ArrayLike, binary_labels: bool
) -> tuple[np.ndarray, np.ndarray]:
    y = _as_float64(labels, "labels")
    p = _as_float64(predictions, "predictions")
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape[0]} != {p.shape[0]}")
    if y.size == 0:
        raise ValueError("metrics need at least one example")
    if binary_labels and not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    if not binary_labels and (y.min() < 0 or y.max() > 1):
        raise ValueError("labels must lie in [0, 1]")
    return y, p


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("AUC is undefined when labels contain only one class")
    _, group, group_sizes = np.unique(p, return_inverse=True, return_counts=True)
    group_last_rank = np.cumsum(group_sizes)
    average_rank = group_last_rank - (group_sizes - 1) / 2.0
    positive_rank_sum = float(average_rank[group.reshape(-1)][y == 1].sum())
    return (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def _normalized_entropy(y: np.ndarray, p: np.ndarray) -> float:
    base_rate = float(y.mean())
    if base_rate <= 0.0 or base_rate >= 1.0:
        raise ValueError("normalized entropy is undefined when labels contain only one class")
    base_rate_entropy = -(base_rate * math.log(base_rate) + (1.0 - base_rate) * math.log1p(-base_rate))
    return _logloss(y, p) / base_rate_entropy


def _calibration(y: np.ndarray, p: np.ndarray) -> float:
    label_mean = float(y.mean())
    if label_mean == 0.0:
        raise ValueError("calibration is undefined when every label is 0")
    return float(p.mean()) / label_mean


def auc(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Area under the ROC curve; ties between a positive and a negative count one half.

    Raises ValueError when the labels hold a single class. Predictions may be any scores.
    """
    return _auc(*_validated(labels, predictions, binary_labels=True))


def logloss(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Mean binary cross-entropy (natural log); predictions are clipped to [eps, 1 - eps].

    The clip matches ``sklearn.metrics.log_loss`` for float64 inputs and keeps a confident
    mistake finite. Labels may be soft (in [0, 1]).
    """
    return _logloss(*_validated(labels, predictions, binary_labels=False))


def normalized_entropy(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Log loss divided by the entropy of the label mean (He et al. 2014); lower is better.

    Raises ValueError when the label mean is 0 or 1 (that entropy is zero).
    """
    return _normalized_entropy(*_validated(labels, predictions, binary_labels=False))


def calibration(labels: ArrayLike, predictions: ArrayLike) -> float:
    """Mean prediction over mean label: 1.0 is unbiased, above 1.0 over-predicts.

    Raises ValueError when the label mean is zero.
    """
    return _calibration(*_validated(labels, predictions, binary_labels=False))


def binary_metrics(labels: ArrayLike, predictions: ArrayLike) -> dict[str, float]:
    """All four metrics plus the example count (validated once), as a dict ready for logging."""
    y, p = _validated(labels, predictions, binary_labels=True)
    return {
        "auc": _auc(y, p),
        "normalized_entropy": _normalized_entropy(y, p),
        "calibration": _calibration(y, p),
        "logloss": _logloss(y, p),
        "num_examples": float(y.size),
    }


class BinaryMetricsAccumulator:
    """Collects (labels, predictions) batch by batch and computes exact metrics at the end.

    AUC cannot be computed exactly from per-batch summaries, so the accumulator keeps every
    example (16 bytes each: 10M examples take 160 MB). Under data-parallel evaluation each
    rank accumulates its own examples; gather the accumulators (e.g. with
    ``torch.distributed.all_gather_object``) and `merge` them before `compute`.
    """

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._predictions: list[np.ndarray] = []

    @property
    def num_examples(self) -> int:
        return sum(batch.size for batch in self._labels)

    def update(self, labels: ArrayLike, predictions: ArrayLike) -> None:
        """Add one batch; checked here so a bad batch is reported where it arrives."""
        y, p = _validated(labels, predictions, binary_labels=True)
        self._labels.append(y)
        self._predictions.append(p)

    def merge(self, other: BinaryMetricsAccumulator) -> None:
        """Add every example collected by ``other`` (another rank, another worker)."""
        self._labels.extend(other._labels)
        self._predictions.extend(other._predictions)

    def reset(self) -> None:
        self._labels.clear()
        self._predictions.clear()

    def compute(self) -> dict[str, float]:
        """`binary_metrics` over everything collected; raises ValueError if nothing was."""
        if not self._labels:
            raise ValueError("no examples accumulated")
        return binary_metrics(np.concatenate(self._labels), np.concatenate(self._predictions))
