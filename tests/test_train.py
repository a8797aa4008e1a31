"""Training: exact resume, 2-rank sharded training against 1 rank, checkpoints, validation and
early stopping, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_CONFIG, train_small

from gpurec.model.checkpoint import (
    checkpoint_root,
    find_checkpoint,
    latest_checkpoint,
    read_trained_run,
    read_trainer_state,
)
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


def _validations(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]


def _cli_run(features: Path, out: Path, nproc: int, *extra: str) -> dict:
    args = ["train", "--data", str(features), "--out", str(out), "--config", str(SMALL_CONFIG), "--json", *extra]
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
    assert summary["world_size"] == nproc
    return summary


def _cli_train(features: Path, out: Path, nproc: int, batch_size: int, sharding: str) -> list[float]:
    # Validation at steps 4, 8 and 10 (the end) on every rank; patience 0: no early stop, 10 steps.
    extra = ["--max-steps", "10", "--batch-size", str(batch_size), "--sharding", sharding]
    summary = _cli_run(features, out, nproc, *extra, "--validate-every", "4", "--patience", "0")
    assert summary["steps"] == 10 and summary["validation"]["rounds"] == 3
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
    # Validation on 2 ranks (each scores its slice, rank 0 computes the AUC) gives 1 rank's numbers.
    one_valid, two_valid = _validations(tmp_path / "one"), _validations(tmp_path / "two")
    assert [r["step"] for r in one_valid] == [r["step"] for r in two_valid] == [4, 8, 10]
    assert max(abs(a["valid_auc"] - b["valid_auc"]) for a, b in zip(one_valid, two_valid, strict=True)) < 1e-4


def test_two_ranks_stop_early_together(small_features, tmp_path):
    """Both ranks take rank 0's stopping decision: the run ends (no rank left waiting in a
    collective) at the validation where patience ran out, with one best checkpoint."""
    extra = ("--max-steps", "200", "--validate-every", "3", "--patience", "1", "--sharding", "row_wise")
    summary = _cli_run(small_features, tmp_path / "two", 2, "--batch-size", "128", *extra)
    rounds = _validations(tmp_path / "two")
    assert summary["validation"]["stopped_early"] and summary["steps"] < 200
    assert rounds[-1]["step"] == summary["steps"] and rounds[-1]["since_best"] == 1
    assert find_checkpoint(tmp_path / "two").name == f"step-{summary['validation']['best_step']:08d}"


def test_early_stopping_keeps_the_best_checkpoint_and_stops(small_features, tmp_path):
    run = tmp_path / "run"
    # Up to 20 epochs of 123 steps; validated every 10 steps, training must stop long before.
    summary = train_small(small_features, run, epochs=20, validate_every=10, patience=3)
    rounds = _validations(run)
    scores = [r["valid_auc"] for r in rounds]
    best = scores.index(max(scores))  # the first of equal scores: fewer steps
    best_step = rounds[best]["step"]
    assert summary["validation"]["stopped_early"] and summary["steps"] < 20 * 123
    # It stopped at the third validation in a row that did not beat the best, not before or after.
    assert len(rounds) == best + 1 + 3 and rounds[-1]["step"] == summary["steps"]
    assert summary["validation"]["best_step"] == best_step

    # Readers (evaluate, export, online --init) get the best checkpoint; a rerun resumes from latest.
    best_dir, latest = find_checkpoint(run), latest_checkpoint(run)
    assert best_dir.name == f"step-{best_step:08d}" and latest.name == f"step-{summary['steps']:08d}"
    assert summary["checkpoint"] == str(best_dir) and read_trained_run(run).train_config["patience"] == 3
    # Pruning keeps the newest two and the best, although it is older than both.
    kept = sorted(p.name for p in checkpoint_root(run).glob("step-*"))
    assert kept == [best_dir.name, f"step-{rounds[-2]['step']:08d}", latest.name]
    # The score that picked it is what `gpurec evaluate --split valid` reports for it.
    from gpurec.train.evaluate import evaluate

    report = evaluate(run, small_features, split="valid")
    assert report["checkpoint"] == str(best_dir)
    assert all(abs(report["tasks"][t]["auc"] - rounds[best][f"valid_auc_{t}"]) < 1e-9 for t in ("like", "finish"))

    # Rerunning the finished command is a no-op: it stays stopped.
    again = train_small(small_features, run, epochs=20, validate_every=10, patience=3)
    assert again["steps"] == summary["steps"] and len(_validations(run)) == len(rounds)
    # With more patience it resumes from the latest checkpoint (not the best) and goes on.
    more = train_small(small_features, run, epochs=20, validate_every=10, patience=0, max_steps=summary["steps"] + 5)
    assert more["steps"] == summary["steps"] + 5
    state = read_trainer_state(latest_checkpoint(run))
    assert state.run.resumed_from == str(latest) and state.validation.rounds == len(rounds) + 1
    assert find_checkpoint(run).name == f"step-{state.validation.best_step:08d}"


def test_without_validation_readers_get_the_latest_checkpoint(small_features, tmp_path):
    run = tmp_path / "run"
    train_small(small_features, run, max_steps=10, validate_every=5)
    assert (checkpoint_root(run) / "best").is_file()
    # A checkpoint nobody validated (here: validation off; also online training) supersedes `best`.
    summary = train_small(small_features, run, max_steps=15, validate=False)
    assert summary["validation"] is None and not (checkpoint_root(run) / "best").exists()
    assert find_checkpoint(run) == latest_checkpoint(run) and find_checkpoint(run).name == "step-00000015"


def test_a_valid_split_of_one_class_is_refused_before_training(small_features, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpurec.errors import InvalidInput
    from gpurec.preprocess.manifest import load_manifest

    features = tmp_path / "features"
    shutil.copytree(small_features, features)
    for path in load_manifest(features).split_files("valid", features):
        table = pq.read_table(path)
        index = table.schema.get_field_index("finish")
        pq.write_table(table.set_column(index, "finish", pa.array([False] * table.num_rows)), path)
    with pytest.raises(InvalidInput, match="only negative 'finish' labels"):
        train_small(features, tmp_path / "run", max_steps=5)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\n[train]\nbatch_sise = 3\n")
    with pytest.raises(ValueError, match="unknown key 'batch_sise'"):
        load_configs(bad)
    with pytest.raises(ValueError, match="sharding"):
        TrainConfig(sharding="diagonal")
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=-1)
    with pytest.raises(ValueError, match="validate must be bool"):
        TrainConfig(validate="yes")


def test_shipped_configs_load_and_default_matches_the_dataclass():
    from gpurec.embedding.config import IdTableConfig
    from gpurec.model.config import ModelConfig
    from gpurec.train.config import DEFAULT_CONFIG

    # The shipped default adds one override to the dataclass defaults: item ids expire after 48 h.
    item_expiry = IdTableConfig(features={"item_id": {"expire_after_hours": 48}})
    assert load_configs(DEFAULT_CONFIG) == (ModelConfig(ids=item_expiry), TrainConfig())
    model, train_config = load_configs(DEFAULT_CONFIG.parent / "movielens.toml")
    assert model.embedding_dim == 16 and train_config.sparse_lr == 0.01
