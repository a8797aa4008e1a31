"""The typed record of a trained run: what train writes and evaluate, export and sync read."""

from __future__ import annotations

import json

import pytest

from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.model.checkpoint import TRAINER_FILE, TrainedRun, TrainerState, read_trained_run
from gpurec.model.config import ModelConfig


def _run() -> TrainedRun:
    config = ModelConfig(embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(8,))
    specs = config.sparse_specs(["user_id", "hashtags"], multi_valued=["hashtags"])
    return TrainedRun(
        model_config=config, sparse_specs=specs, num_dense=3, labels=["like", "finish"], data_dir="/data",
        world_size=2, train_config={"batch_size": 64},
    )  # fmt: skip


def test_round_trips_through_trainer_json(tmp_path):
    state = TrainerState(step=7, epoch=1, batch=3, samples=448, run=_run())
    (tmp_path / TRAINER_FILE).write_text(json.dumps(state.to_json()))
    run = read_trained_run(tmp_path)
    assert run == state.run
    assert isinstance(run.model_config, ModelConfig) and run.model_config.embedding_dim == 8
    assert run.sparse_specs[1] == SparseFeatureSpec("hashtags", 100_000, 8, multi_valued=True, pooling="mean")
    assert run.labels == ("like", "finish") and run.world_size == 2
    with pytest.raises(TypeError):  # read-only: readers cannot change what training wrote
        run.train_config["batch_size"] = 1


def test_rejects_unknown_keys_and_missing_checkpoints(tmp_path):
    record = _run().to_json() | {"num_dnese": 3}
    with pytest.raises(InvalidInput, match="num_dnese"):
        TrainedRun.from_json(record)
    with pytest.raises(InputNotFound, match="no checkpoint"):
        read_trained_run(tmp_path)
