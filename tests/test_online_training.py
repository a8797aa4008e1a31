"""Online training (`gpurec train --online`): examples from the event log, exactly once across kill -9.

The examples are the small world's preprocessed rows written as the joiner would write them (the
served inputs are the feature row, the labels its labels), so the online trainer sees exactly the
inputs a batch run reads from Parquet.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import fill_examples

from gpurec.model.checkpoint import find_checkpoint, latest_checkpoint, read_trainer_state
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import load_manifest
from gpurec.stream.log import open_event_log
from gpurec.sync.examples import EXAMPLES_TOPIC, ExampleFeed
from gpurec.sync.online import OnlineSettings, examples_digest, train_online
from gpurec.sync.progressive import load_progressive, online_vs_frozen

ROOT = Path(__file__).resolve().parents[1]


def test_feed_merges_partitions_in_event_time_and_rebuilds_from_positions(tmp_path, valid_examples):
    url = f"sqlite:///{tmp_path}/log.db"
    fill_examples(url, valid_examples, partitions=3)
    with open_event_log(url) as log:
        feed = ExampleFeed.from_start(log)
        first = feed.take_until(feed.plan(500))
        second = feed.take_until(feed.plan(500))
        times = [t.example.served.ts_ms for t in first + second]
        assert len(first) == len(second) == 500
        assert times == sorted(times)  # each partition is in time order, so the merge is too
        # Another rank given only the positions builds the same batches.
        other = ExampleFeed.from_start(log)
        again = other.take_until(feed_positions := _positions_after(log, first))
        assert [t.raw for t in again] == [t.raw for t in first]
        assert other.positions == feed_positions


def _positions_after(log, taken) -> dict[int, int]:
    positions = dict(log.start_offsets(EXAMPLES_TOPIC))
    for record in taken:
        positions[record.partition] = max(positions[record.partition], record.offset + 1)
    return positions


def test_drain_trains_every_example_once_and_scores_before_training(tmp_path, batch_run, valid_examples):
    url = f"sqlite:///{tmp_path}/log.db"
    fill_examples(url, valid_examples)
    with open_event_log(url) as log:
        report = train_online(log, tmp_path / "online", OnlineSettings(batch_size=256), init=batch_run, drain=True, progress=False)
        ends = log.end_offsets(EXAMPLES_TOPIC)
        committed = log.committed("trainer", EXAMPLES_TOPIC)
    assert report["examples"] == len(valid_examples)
    assert report["digest"] == examples_digest(valid_examples)
    assert report["offsets"] == {f"{EXAMPLES_TOPIC}/{p}": o for p, o in ends.items()}
    assert committed == ends  # the group's offsets follow the checkpoint (lag monitoring)
    assert 0.5 < report["auc_like"] < 1.0  # progressive validation of a model that learnt something
    state = read_trainer_state(latest_checkpoint(tmp_path / "online"))
    assert state.samples == len(valid_examples) and state.run.resumed_from == str(find_checkpoint(batch_run))
    with open_event_log(url) as log:
        compared = online_vs_frozen(log, tmp_path / "online", batch_run)
    assert compared["examples_scored"] == len(valid_examples)
    assert compared["auc_online_like"] == report["auc_like"] and 0.5 < compared["auc_frozen_like"] < 1.0
    # The model changed from the batch run's, and only through training.
    before, after = load_trained_model(batch_run).model, load_trained_model(tmp_path / "online").model
    changed = [k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])]
    assert any("embedding" in k for k in changed) and any("mlp" in k for k in changed)


def _trainer(url: str, out: Path, init: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "gpurec.cli", "train", "--online", "--from", url, "--out", str(out), "--init", str(init),
        "--batch-size", "64", "--checkpoint-every-s", "0.3", "--drain", "--json",
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_kill9_at_random_points_trains_every_example_exactly_once(tmp_path, batch_run, valid_examples):
    """SIGKILL the trainer while it trains (and checkpoints), restart it, repeat: the final model has
    trained every example exactly once (count and digest) and equals an uninterrupted run's."""
    url = f"sqlite:///{tmp_path}/log.db"
    fill_examples(url, valid_examples)
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        process = _trainer(url, tmp_path / "killed", batch_run)
        seen = latest_checkpoint(tmp_path / "killed")
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:  # wait for a new checkpoint
            current = latest_checkpoint(tmp_path / "killed")
            if current is not None and current != seen:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
    finished = _trainer(url, tmp_path / "killed", batch_run)
    report = json.loads(finished.communicate(timeout=300)[0].strip().splitlines()[-1])
    assert finished.returncode == 0 and kills >= 1
    state = read_trainer_state(latest_checkpoint(tmp_path / "killed"))
    assert state.samples == len(valid_examples)
    assert state.digest == examples_digest(valid_examples) == report["digest"]
    scored = load_progressive(tmp_path / "killed")["where"]  # each example's pre-update score once too
    assert len(scored) == len({tuple(w) for w in scored.tolist()}) == len(valid_examples)

    whole = _trainer(url, tmp_path / "whole", batch_run)
    whole.communicate(timeout=300)
    killed_model = load_trained_model(tmp_path / "killed").model.state_dict()
    whole_model = load_trained_model(tmp_path / "whole").model.state_dict()
    assert all(torch.equal(killed_model[k], whole_model[k]) for k in whole_model)


def test_bad_input_is_one_line(tmp_path, batch_run):
    url = f"sqlite:///{tmp_path}/log.db"
    with open_event_log(url) as log:
        log.create_topic("served", 1)
    cases = [
        (["--from", url, "--out", str(tmp_path / "a")], "no checkpoint to resume: give --init"),
        (["--from", url, "--out", str(tmp_path / "b"), "--init", str(batch_run)], "no 'examples' topic"),
        (["--from", url, "--out", str(tmp_path / "c"), "--init", str(tmp_path / "nothing")], "no checkpoint in"),
        (["--from", url, "--out", str(tmp_path / "d"), "--init", str(batch_run), "--batch-size", "0"], "--batch-size"),
    ]
    for extra, expected in cases:
        result = subprocess.run(
            [sys.executable, "-m", "gpurec.cli", "train", "--online", *extra], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpurec train: ") and expected in lines[0], result.stderr


def _online(url: str, out: Path, init: Path, nproc: int, *extra: str) -> dict:
    args = ["train", "--online", "--from", url, "--out", str(out), "--init", str(init), "--batch-size", "256", "--drain", "--json", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    result = subprocess.run([*prefix, "-m", "gpurec.cli", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_two_ranks_online_match_one_rank(small_features, tmp_path, valid_examples):
    """torchrun with 2 ranks splits every planned batch of 256 (128 each, rebuilt from rank 0's
    positions) and ends where 1 rank ends: same examples, same digest, scores within 1e-4.
    Hashed tables here, so one batch checkpoint can start both (a collisionless map is partitioned
    by the world size that wrote it)."""
    init = tmp_path / "init"
    command = [sys.executable, "-m", "gpurec.cli", "train", "--data", str(small_features), "--out", str(init)]
    command += ["--config", str(ROOT / "tests" / "configs" / "small.toml"), "--max-steps", "10", "--id-tables", "hashed", "--json"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=600)
    url = f"sqlite:///{tmp_path}/log.db"
    fill_examples(url, valid_examples)
    one = _online(url, tmp_path / "one", init, 1)
    two = _online(url, tmp_path / "two", init, 2, "--sync-dir", str(tmp_path / "deltas"), "--sync-every-s", "0.5")
    assert one["examples"] == two["examples"] == len(valid_examples) and two["world_size"] == 2
    assert one["digest"] == two["digest"] and one["offsets"] == two["offsets"]
    from gpurec.train.evaluate import model_scores

    manifest = load_manifest(small_features)
    test_files = manifest.split_files("test", small_features)
    scores = [model_scores(*load_trained_model(tmp_path / run)[:2], manifest, test_files) for run in ("one", "two")]
    assert max(float(abs(scores[0][t] - scores[1][t]).max()) for t in scores[0]) < 1e-4
    # The two ranks published one sequence of whole deltas: applied to the served starting model,
    # they give exactly the 2-rank checkpoint's model.
    from gpurec.serve.artifact import build_serving_ranker
    from gpurec.serve.export import contract_for
    from gpurec.sync.deltafile import DeltaApplier

    def served(run_dir):
        model, lookup, run = load_trained_model(run_dir)
        return build_serving_ranker(model, lookup, contract_for(model, run, 64))

    module, final = served(init), served(tmp_path / "two")
    applier = DeltaApplier(module, tmp_path / "deltas")
    applier.poll()
    assert applier.version == two["sync_seq"] and two["deltas"]["rows"] >= 1
    final_state = final.state_dict()
    for name, value in module.state_dict().items():
        assert torch.equal(value, final_state[name]), name


def test_a_small_step_weighs_its_loss_by_its_share_of_a_batch(batch_run, valid_examples):
    """Resumed from batch training (Adagrad state and all), a step on 8 examples weighted 8/512 moves
    the dense weights far less than the same step as a plain mean: what keeps tiny online
    micro-batches from taking batch-sized steps."""
    from gpurec.sync.examples import to_batch
    from gpurec.sync.replay import load_trainer

    def dense_change(loss_scale: float) -> float:
        trainer, _ = load_trainer(batch_run)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "mlp" in k}
        trainer.step(to_batch(valid_examples[:8], trainer.run), loss_scale=loss_scale)
        after = trainer.model.state_dict()
        return sum(float((after[k] - v).norm()) for k, v in before.items())

    plain, weighted = dense_change(1.0), dense_change(8 / 512)
    assert plain > 0 and weighted < plain / 10
