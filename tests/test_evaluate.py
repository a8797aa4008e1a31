"""`gpurec evaluate`: the report's shape, its numbers against direct recomputation, the baselines and
the oracle, and the errors for missing inputs.

One small run (the session's 4-day world, a few dozen training steps) is evaluated once through the
CLI; the tests recompute what the report says from the checkpoint, the feature files and the raw
logs with sklearn, independently of the evaluation code paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_small
from sklearn.metrics import log_loss, roc_auc_score

from gpurec.cli import main
from gpurec.data import logs
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.run import preprocess
from gpurec.train.baselines import popularity_scores, sample_train
from gpurec.train.data import FeatureColumns
from gpurec.train.evaluate import evaluate

PREDICTORS_METRICS = {"auc", "ne", "calibration", "logloss"}


@pytest.fixture(scope="module")
def run_dir(small_features, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "run"
    train_small(small_features, out, max_steps=30)
    return out


def _cli_json(*args: str) -> dict:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", *args, "--json"]) == 0
    (line,) = printed.getvalue().strip().splitlines()  # exactly one JSON object
    return json.loads(line)


@pytest.fixture(scope="module")
def report(run_dir, small_features) -> dict:
    return _cli_json("--checkpoint", str(run_dir), "--data", str(small_features))


@pytest.fixture(scope="module")
def test_rows(small_features) -> pl.DataFrame:
    manifest = load_manifest(small_features)
    return pl.concat([pl.read_parquet(f) for f in manifest.split_files("test", small_features)])


def test_report_shape(report, small_features):
    assert set(report) == {"tasks", "baselines", "oracle", "split", "rows", "checkpoint", "data"}
    assert report["split"] == "test"
    assert report["rows"] == load_manifest(small_features).splits["test"].rows > 0
    assert report["data"] == str(small_features)
    assert Path(report["checkpoint"]).name == "step-00000030"
    assert set(report["baselines"]) == {"popularity", "logreg"}
    for metrics in [report["tasks"], report["oracle"], *report["baselines"].values()]:
        assert set(metrics) == {"like", "finish"}
        for values in metrics.values():
            assert set(values) == PREDICTORS_METRICS
            assert all(math.isfinite(v) for v in values.values())
            assert 0.0 < values["auc"] < 1.0


def test_model_metrics_match_a_direct_computation(report, run_dir, small_features, test_rows):
    """Score the whole split in one forward pass (not the evaluator's loader) and compare with sklearn."""
    manifest = load_manifest(small_features)
    model, remap, _ = load_trained_model(run_dir)
    table = pa.concat_tables(pq.read_table(f) for f in manifest.split_files("test", small_features))
    batch = FeatureColumns(manifest).to_batch(table)
    with torch.no_grad():
        logits = model(batch.dense_features, remap(batch.sparse_features))
    for task in ("like", "finish"):
        labels = test_rows[task].to_numpy()
        probabilities = torch.sigmoid(logits[task]).double().numpy()
        assert report["tasks"][task]["auc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-6)
        assert report["tasks"][task]["logloss"] == pytest.approx(log_loss(labels, probabilities), abs=1e-6)
        assert report["tasks"][task]["calibration"] == pytest.approx(probabilities.mean() / labels.mean(), rel=1e-6)


def test_popularity_on_a_hand_made_split():
    train_rows = pl.DataFrame(
        {
            "item_id": [1, 1, 1, 1, 2, 2, 3],
            "like": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            "finish": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0],
        }
    )
    eval_rows = pl.DataFrame({"item_id": [3, 9, 1, 2, 1]})  # item 9 never shown in train
    weight = 2.0
    scores = popularity_scores(train_rows.lazy(), eval_rows, ["like", "finish"], prior_weight=weight)
    for task in ("like", "finish"):
        rate = train_rows[task].mean()
        by_item = train_rows.group_by("item_id").agg(pos=pl.col(task).sum(), n=pl.len())
        smoothed = {r["item_id"]: (r["pos"] + weight * rate) / (r["n"] + weight) for r in by_item.iter_rows(named=True)}
        expected = [smoothed.get(i, rate) for i in eval_rows["item_id"]]
        np.testing.assert_allclose(scores[task], expected, rtol=1e-12)
    assert scores["like"][0] == pytest.approx((1 + 2 * 3 / 7) / 3)  # one like in one impression, pulled to 3/7


def test_oracle_matches_sklearn_on_the_joined_log(report, small_features, test_rows):
    raw = Path(load_manifest(small_features).source["input"])
    oracle = logs.scan(raw, "oracle").collect()
    joined = test_rows.join(oracle, on=["request_id", "item_id"], how="left", maintain_order="left")
    assert joined.height == test_rows.height and joined["p_like"].null_count() == 0
    for task, column in (("like", "p_like"), ("finish", "p_finish")):
        labels, truth = joined[task].to_numpy(), joined[column].to_numpy().astype(np.float64)
        assert report["oracle"][task]["auc"] == pytest.approx(roc_auc_score(labels, truth), abs=1e-12)
        assert report["oracle"][task]["logloss"] == pytest.approx(log_loss(labels, truth), abs=1e-9)
    # The simulator's true probabilities rank better than anything trained on a few dozen batches.
    assert report["oracle"]["like"]["auc"] > report["tasks"]["like"]["auc"]


def test_oracle_is_null_without_an_oracle_log(run_dir, small_features, tmp_path):
    raw = Path(load_manifest(small_features).source["input"])
    shutil.copytree(raw, tmp_path / "raw", ignore=lambda folder, names: ["oracle"] if Path(folder) == raw else [])
    preprocess(tmp_path / "raw", tmp_path / "features", engine="cpu")
    result = evaluate(run_dir, tmp_path / "features", split="valid")
    assert result["oracle"] is None and result["split"] == "valid"
    assert set(result["baselines"]) == {"popularity", "logreg"}


def test_sample_train_is_a_seeded_subset(small_features):
    manifest = load_manifest(small_features)
    sample = sample_train(manifest, small_features, max_rows=500)
    assert sample.height == 500
    assert sample.equals(sample_train(manifest, small_features, max_rows=500))
    whole = sample_train(manifest, small_features, max_rows=10**9)
    assert whole.height == manifest.splits["train"].rows
    assert sample.join(whole, on=["request_id", "item_id"], how="anti").height == 0


def test_missing_inputs_are_clear_errors(run_dir, small_features, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate(tmp_path / "nothing", small_features)
    with pytest.raises(ValueError, match="no split 'holdout'"):
        evaluate(run_dir, small_features, split="holdout")
    with pytest.raises(FileNotFoundError, match="no oracle log"):
        evaluate(run_dir, small_features, oracle_dir=tmp_path)
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", str(small_features)]) == 2
    assert capsys.readouterr().err.startswith("gpurec evaluate: --checkpoint")


def test_table_output_names_every_predictor(run_dir, small_features, capsys):
    assert main(["evaluate", "--checkpoint", str(run_dir), "--data", str(small_features)]) == 0
    out = capsys.readouterr().out
    for name in ("model", "popularity", "logreg", "oracle", "like", "finish", "AUC"):
        assert name in out
