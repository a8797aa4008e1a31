"""End to end on real data: MovieLens-100K, time split, the shipped MovieLens config.

The model must beat both baselines on both tasks. Training is deterministic for a fixed seed on
the CPU, so this checks one reproducible run (README lists three seeds).
"""

from __future__ import annotations

from gpurec.data.movielens import convert_movielens_100k
from gpurec.preprocess.run import preprocess
from gpurec.train.config import DEFAULT_CONFIG, load_configs
from gpurec.train.evaluate import evaluate
from gpurec.train.recipe import train


def test_model_beats_popularity_and_logreg_on_movielens(tmp_path):
    convert_movielens_100k(tmp_path / "raw")
    preprocess(tmp_path / "raw", tmp_path / "features", engine="cpu")
    model_config, train_config = load_configs(DEFAULT_CONFIG.parent / "movielens.toml")
    train(tmp_path / "features", tmp_path / "train", model_config, train_config, progress=False)
    report = evaluate(tmp_path / "train", tmp_path / "features", split="test")
    assert report["oracle"] is None and report["rows"] > 5000
    for task in ("like", "finish"):
        model = report["tasks"][task]["auc"]
        for baseline in ("popularity", "logreg"):
            assert model > report["baselines"][baseline][task]["auc"], (task, baseline, report)
    print({t: round(v["auc"], 4) for t, v in report["tasks"].items()})
