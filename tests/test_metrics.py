"""Offline metrics are exact: they agree with scikit-learn, ties and all, and refuse undefined cases."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from gpurec.train.metrics import (
    BinaryMetricsAccumulator,
    auc,
    binary_metrics,
    calibration,
    logloss,
    normalized_entropy,
)


def reference_ne(labels: np.ndarray, predictions: np.ndarray) -> float:
    p = labels.mean()
    return log_loss(labels, predictions, labels=[0, 1]) / -(p * math.log(p) + (1 - p) * math.log(1 - p))


@st.composite
def labelled_predictions(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """Both classes present; predictions on a coarse grid so that ties are common."""
    n = draw(st.integers(min_value=2, max_value=200))
    labels = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=n, max_size=n))
    labels[0], labels[1] = 0.0, 1.0
    levels = draw(st.sampled_from([2, 5, 10, 1000]))
    grid = draw(st.lists(st.integers(min_value=0, max_value=levels), min_size=n, max_size=n))
    predictions = np.array(grid, dtype=np.float64) / levels
    return np.array(labels), predictions


def test_fixed_example_with_ties_matches_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    predictions = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.9, 0.05])
    assert auc(labels, predictions) == pytest.approx(roc_auc_score(labels, predictions), abs=1e-12)
    assert logloss(labels, predictions) == pytest.approx(log_loss(labels, predictions), abs=1e-12)
    assert normalized_entropy(labels, predictions) == pytest.approx(
        reference_ne(labels, predictions), abs=1e-12
    )
    assert calibration(labels, predictions) == pytest.approx(predictions.mean() / labels.mean())


def test_auc_known_values():
    labels = [0, 0, 1, 1]
    assert auc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_predicting_the_base_rate_has_ne_one_and_calibration_one():
    labels = np.array([1, 0, 0, 0, 1, 0, 0, 0])
    base_rate = np.full(labels.shape, labels.mean())
    assert normalized_entropy(labels, base_rate) == pytest.approx(1.0)
    assert calibration(labels, base_rate) == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(labelled_predictions())
def test_random_inputs_match_sklearn(data):
    labels, predictions = data
    assert auc(labels, predictions) == pytest.approx(roc_auc_score(labels, predictions), abs=1e-12)
    assert logloss(labels, predictions) == pytest.approx(
        log_loss(labels, predictions, labels=[0, 1]), rel=1e-9
    )
    assert normalized_entropy(labels, predictions) == pytest.approx(
        reference_ne(labels, predictions), rel=1e-9
    )
    assert calibration(labels, predictions) == pytest.approx(predictions.mean() / labels.mean(), rel=1e-12)


def test_torch_and_numpy_inputs_agree():
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (500,)).float()
    predictions = torch.rand(500)
    from_torch = binary_metrics(labels, predictions)
    from_numpy = binary_metrics(labels.numpy(), predictions.numpy())
    assert from_torch == from_numpy
    assert from_torch["num_examples"] == 500


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_one_class_labels_raise_for_auc_and_ne(label):
    labels = np.full(10, label)
    predictions = np.linspace(0.1, 0.9, 10)
    with pytest.raises(ValueError, match="only one class"):
        auc(labels, predictions)
    with pytest.raises(ValueError, match="only one class"):
        normalized_entropy(labels, predictions)
    # Log loss is still defined and matches sklearn given both labels explicitly.
    assert logloss(labels, predictions) == pytest.approx(log_loss(labels, predictions, labels=[0, 1]))


def test_calibration_undefined_without_positives():
    with pytest.raises(ValueError, match="every label is 0"):
        calibration([0, 0, 0], [0.1, 0.2, 0.3])


def test_logloss_clips_confident_mistakes():
    labels = np.array([1.0, 0.0])
    predictions = np.array([0.0, 1.0])
    assert math.isfinite(logloss(labels, predictions))
    assert logloss(labels, predictions) == pytest.approx(log_loss(labels, predictions))


@pytest.mark.parametrize(
    ("labels", "predictions", "message"),
    [
        ([0, 1], [0.5], "differ in length"),
        ([[0, 1]], [[0.5, 0.5]], "1-D"),
        ([], [], "at least one"),
        ([0, 1], [0.5, float("nan")], "NaN"),
        ([0, 2], [0.5, 0.5], "0 or 1"),
    ],
)
def test_invalid_inputs_raise(labels, predictions, message):
    with pytest.raises(ValueError, match=message):
        auc(labels, predictions)


def test_accumulator_equals_one_shot_computation():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 1000).astype(np.float32)
    predictions = np.round(rng.random(1000), 2).astype(np.float32)
    accumulator = BinaryMetricsAccumulator()
    for start in range(0, 1000, 128):
        accumulator.update(torch.from_numpy(labels[start : start + 128]), predictions[start : start + 128])
    assert accumulator.num_examples == 1000
    assert accumulator.compute() == binary_metrics(labels, predictions)


def test_accumulator_merge_and_reset():
    first, second = BinaryMetricsAccumulator(), BinaryMetricsAccumulator()
    first.update([0, 1], [0.2, 0.7])
    second.update([1, 0], [0.6, 0.4])
    first.merge(second)
    assert first.compute() == binary_metrics([0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4])
    first.reset()
    assert first.num_examples == 0
    with pytest.raises(ValueError, match="no examples"):
        first.compute()
