"""`gpurec experiment collisionless`: the report's shape and its claims, on a tiny synthetic world.

One run through the CLI (300 users, 4 days, 20 steps per table kind); the tests check equal memory,
that hashing collides and collisionless tables do not, and recompute a hashed collision rate from
the feature files directly. The collision-rate function is checked on hand-made examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gpurec.cli import main
from gpurec.embedding.config import aligned_rows
from gpurec.embedding.lookup import IdLookup
from gpurec.experiments.collisionless import collision_rate, shared_row_count
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import load_manifest
from gpurec.train.config import load_configs
from gpurec.train.recipe import sparse_specs

RESULT_KEYS = {"dataset", "table", "rows", "auc_like", "auc_finish", "collision_rate", "default_rate", "rows_per_id", "per_feature"}


def test_collision_rate_by_hand():
    assert collision_rate([0, 4, 1], 4) == pytest.approx(2 / 3)  # 0 and 4 share row 0
    assert collision_rate([0, 1, 2, 3], 4) == 0.0
    assert collision_rate([0, 0, 1], 4) == 0.0  # an id repeated is one distinct id
    assert collision_rate([-1, 3, 7], 4) == 1.0  # negative hashes wrap: -1 mod 4 = 3
    assert collision_rate([], 4) == 0.0
    assert shared_row_count(np.array([-1, -1, 2, 5, 2])) == 2  # ids without a row (-1) never collide


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("experiment") / "collisionless"
    args = ["--datasets", "synthetic", "--users", "300", "--items", "600", "--days", "4", "--seed", "3"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["experiment", "collisionless", *args, "--epochs", "1", "--max-steps", "20", "--out", str(out), "--json"])
    assert code == 0
    (line,) = printed.getvalue().strip().splitlines()  # exactly one JSON line
    return json.loads(line), out


def test_report_shape(experiment):
    report, out = experiment
    assert set(report) == {"results", "seconds"} and report["seconds"] > 0
    assert json.loads((out / "results.json").read_text())["results"] == report["results"]
    assert [(r["dataset"], r["table"]) for r in report["results"]] == [("synthetic", "collisionless"), ("synthetic", "hashed")]
    for result in report["results"]:
        assert set(result) >= RESULT_KEYS
        assert result["rows_per_id"] == 1 and result["steps"] == 20
        for task in ("auc_like", "auc_finish"):
            assert 0.0 < result[task] < 1.0
        assert result["rows"] == sum(f["rows"] for f in result["per_feature"].values())
        for feature in result["per_feature"].values():
            assert 0.0 <= feature["collision_rate"] <= 1.0 and 0.0 <= feature["default_rate"] <= 1.0
            assert feature["distinct_ids"] > 0


def test_equal_memory_and_collisions(experiment):
    report, out = experiment
    collisionless, hashed = report["results"]
    assert collisionless["rows"] == hashed["rows"]
    assert {f: v["rows"] for f, v in collisionless["per_feature"].items()} == {f: v["rows"] for f, v in hashed["per_feature"].items()}
    specs = [load_trained_model(out / "synthetic" / "rows-per-id-1" / kind).run.sparse_specs for kind in ("collisionless", "hashed")]
    assert specs[0] == specs[1]
    assert hashed["collision_rate"] > 0 and hashed["default_rate"] == 0
    assert collisionless["collision_rate"] == 0
    # Collisionless tables report their occupancy and counters; hashed ones have none.
    assert all("occupancy" in f and "evicted" in f for f in collisionless["per_feature"].values())
    assert all("occupancy" not in f for f in hashed["per_feature"].values())


def test_rates_recomputed_from_the_features(experiment):
    report, out = experiment
    collisionless, hashed = report["results"]
    features = out / "synthetic" / "features"
    train = pl.concat([pl.read_parquet(f) for f in load_manifest(features).split_files("train", features)])
    users = np.unique(train["sparse_user_id"].to_numpy())
    rows = hashed["per_feature"]["user_id"]["rows"]
    _, counts = np.unique(np.mod(users, rows), return_counts=True)
    assert hashed["per_feature"]["user_id"]["distinct_ids"] == users.size
    assert hashed["per_feature"]["user_id"]["collision_rate"] == pytest.approx(counts[counts > 1].sum() / users.size)
    # Every train user either has its own row in the trained map, or is counted as reading the default row.
    _, lookup, _ = load_trained_model(out / "synthetic" / "rows-per-id-1" / "collisionless")
    assert isinstance(lookup, IdLookup)
    stored = set(lookup.stored_ids("user_id").tolist())
    no_row = sum(1 for u in users.tolist() if u not in stored)
    assert collisionless["per_feature"]["user_id"]["default_rate"] == pytest.approx(no_row / users.size)


def test_fractional_rows_per_id_sizes_tables_like_the_trainer(experiment):
    _, out = experiment
    features = out / "synthetic" / "features"
    manifest = load_manifest(features)
    model_config, train_config = load_configs(rows_per_id=0.5)
    specs = {s.name: s.num_embeddings for s in sparse_specs(manifest, model_config, train_config)}
    for feature in manifest.sparse_features:
        want = aligned_rows(max(train_config.min_rows, math.ceil(0.5 * feature.cardinality_estimate)))
        assert specs[feature.name] == want
    # An integral setting sizes the same way.
    model_config, two = load_configs(rows_per_id=2)
    specs = {s.name: s.num_embeddings for s in sparse_specs(manifest, model_config, two)}
    for feature in manifest.sparse_features:
        want = aligned_rows(min(model_config.default_num_embeddings, max(two.min_rows, 2 * feature.cardinality_estimate)))
        assert specs[feature.name] == want


def test_unknown_dataset_is_an_error(capsys):
    assert main(["experiment", "collisionless", "--datasets", "imagenet", "--json"]) == 2
    assert "unknown datasets" in capsys.readouterr().err
