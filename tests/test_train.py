"""Training: exact resume, 2-rank sharded training against 1 rank, checkpoints, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_CONFIG, train_small

from gpurec.model.checkpoint import checkpoint_root, latest_checkpoint, read_trainer_state
from gpurec.train.config import TrainConfig, load_configs


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down(small_features, tmp_path):
    summary = train_small(small_features, tmp_path / "run", epochs=2)
    losses = _losses(tmp_path / "run")
    assert summary["steps"] == len(losses) > 20
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_resume_continues_exactly(small_features, tmp_path):
    train_small(small_features, tmp_path / "whole", max_steps=16)
    train_small(small_features, tmp_path / "split", max_steps=8)
    resumed = train_small(small_features, tmp_path / "split", max_steps=16)
    assert resumed["steps"] == 16
    # Same data position, weights and both optimizers' state: identical losses, bit for bit.
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


def test_resume_across_an_epoch_boundary(small_features, tmp_path):
    whole = train_small(small_features, tmp_path / "whole", epochs=2)
    steps_per_epoch = whole["steps"] // 2
    train_small(small_features, tmp_path / "split", epochs=2, max_steps=steps_per_epoch + 3)
    train_small(small_features, tmp_path / "split", epochs=2)
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


def test_checkpoints_keep_the_newest_two(small_features, tmp_path):
    train_small(small_features, tmp_path / "run", max_steps=12, checkpoint_every=4)
    kept = sorted(p.name for p in checkpoint_root(tmp_path / "run").glob("step-*"))
    assert kept == ["step-00000008", "step-00000012"]
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-00000012"
    state = read_trainer_state(latest)
    assert state.step == 12 and state.samples == 12 * 256
    assert state.run.labels == ("like", "finish")


def _cli_train(features: Path, out: Path, nproc: int, batch_size: int, sharding: str) -> list[float]:
    args = ["train", "--data", str(features), "--out", str(out), "--max-steps", "10"]
    args += ["--batch-size", str(batch_size), "--sharding", sharding, "--config", str(SMALL_CONFIG), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "gpurec.cli", *args]
    else:
        # --standalone: a private rendezvous on a free localhost port.
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        command += ["-m", "gpurec.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == nproc and summary["steps"] == 10
    # The default collisionless tables were in the loop: ids were admitted, counted on their owner ranks.
    assert summary["id_tables"]["user_id"]["admitted"] > 0
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_two_ranks_follow_one_rank(small_features, tmp_path, sharding):
    """torchrun with 2 gloo ranks x batch 128 tracks 1 rank x batch 256 (same global batches).

    Tolerance 2e-3 per step: the ranks sum gradients in another order, and row-wise sharding
    reduces partial gradients across ranks; a wrong data split or broken sharding is off by 1e-2+.
    """
    one = _cli_train(small_features, tmp_path / "one", 1, 256, sharding)
    two = _cli_train(small_features, tmp_path / "two", 2, 128, sharding)
    assert len(one) == len(two) == 10
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 2e-3, (one, two)

    # Both checkpoints load unsharded (the 2-rank one with both ranks' id-map partitions merged)
    # and score the test rows alike, although their id -> row layouts differ.
    from gpurec.model.trained import load_trained_model
    from gpurec.preprocess.manifest import load_manifest
    from gpurec.train.evaluate import model_scores

    manifest = load_manifest(small_features)
    test_files = manifest.split_files("test", small_features)
    scores = [model_scores(*load_trained_model(tmp_path / run)[:2], manifest, test_files) for run in ("one", "two")]
    assert max(float(abs(scores[0][t] - scores[1][t]).max()) for t in scores[0]) < 1e-4  # seen: 1e-7


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\n[train]\nbatch_sise = 3\n")
    with pytest.raises(ValueError, match="unknown key 'batch_sise'"):
        load_configs(bad)
    with pytest.raises(ValueError, match="sharding"):
        TrainConfig(sharding="diagonal")


def test_shipped_configs_load_and_default_matches_the_dataclass():
    from gpurec.embedding.config import IdTableConfig
    from gpurec.model.config import ModelConfig
    from gpurec.train.config import DEFAULT_CONFIG

    # The shipped default adds one override to the dataclass defaults: item ids expire after 48 h.
    item_expiry = IdTableConfig(features={"item_id": {"expire_after_hours": 48}})
    assert load_configs(DEFAULT_CONFIG) == (ModelConfig(ids=item_expiry), TrainConfig())
    model, train_config = load_configs(DEFAULT_CONFIG.parent / "movielens.toml")
    assert model.embedding_dim == 16 and train_config.sparse_lr == 0.01
