"""End to end on real data: MovieLens-100K, time split, the shipped MovieLens config and the default.

The model must beat both baselines on both tasks, with either config: the default one (the
synthetic world's) included, since validation picks its stopping epoch on MovieLens too. Training
is deterministic for a fixed seed on the CPU, so this checks one reproducible run per config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpurec.data.movielens import convert_movielens_100k
from gpurec.preprocess.run import preprocess
from gpurec.train.config import DEFAULT_CONFIG, load_configs
from gpurec.train.evaluate import evaluate
from gpurec.train.recipe import train


@pytest.fixture(scope="module")
def movielens_features(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("movielens")
    convert_movielens_100k(root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    return root / "features"


@pytest.mark.parametrize("config", ["movielens.toml", "default.toml"])
def test_model_beats_popularity_and_logreg_on_movielens(movielens_features, tmp_path, config):
    model_config, train_config = load_configs(DEFAULT_CONFIG.parent / config)
    summary = train(movielens_features, tmp_path / "train", model_config, train_config, progress=False)
    report = evaluate(tmp_path / "train", movielens_features, split="test")
    assert report["oracle"] is None and report["rows"] > 5000
    assert report["checkpoint"] == summary["checkpoint"]  # the best validated one
    for task in ("like", "finish"):
        model = report["tasks"][task]["auc"]
        for baseline in ("popularity", "logreg"):
            assert model > report["baselines"][baseline][task]["auc"], (task, baseline, report)
    print(config, summary["validation"], {t: round(v["auc"], 4) for t, v in report["tasks"].items()})
