"""Collisionless tables in training: row resets in the sharded model, checkpoints, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMALL_CONFIG, train_small

from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.cuckoo import EMPTY_KEY
from gpurec.embedding.lookup import IdLookup
from gpurec.embedding.partition import Admitted
from gpurec.embedding.rows import RowReinitializer, initial_rows
from gpurec.model.checkpoint import latest_checkpoint, load_checkpoint
from gpurec.model.config import ModelConfig
from gpurec.model.sharded import combined_optimizer, shard_model
from gpurec.model.trained import build_ranker, load_trained_model
from gpurec.preprocess.manifest import load_manifest
from gpurec.train.config import load_configs
from gpurec.train.data import LoaderConfig, ParquetBatches
from gpurec.train.distributed import init_distributed
from gpurec.train.recipe import sparse_specs


def _replayed_id_map(features, steps: int) -> CollisionlessIds:
    """The id map that training's first `steps` batches build, computed outside training."""
    model_config, train_config = load_configs(SMALL_CONFIG)
    manifest = load_manifest(features)
    specs = sparse_specs(manifest, model_config, train_config)
    ids = CollisionlessIds(specs, model_config.ids)
    loader = ParquetBatches(manifest.split_files("train", features), manifest, LoaderConfig(batch_size=train_config.batch_size))
    for step, batch in enumerate(loader):
        if step == steps:
            break
        ids.assign(batch.sparse_features, batch.event_time_ms)
    return ids


def test_checkpoint_keeps_the_id_maps_exactly(small_features, tmp_path):
    summary = train_small(small_features, tmp_path / "run", max_steps=12)
    replayed = _replayed_id_map(small_features, 12)
    model_config, train_config = load_configs(SMALL_CONFIG)
    specs = sparse_specs(load_manifest(small_features), model_config, train_config)
    restored = CollisionlessIds(specs, model_config.ids)
    model = build_ranker(model_config, specs, ([0.0] * 8, [1.0] * 8), seed=0)
    load_checkpoint(latest_checkpoint(tmp_path / "run"), model, ids=restored)
    for key, tensor in replayed.state_dict().items():
        assert torch.equal(restored.state_dict()[key], tensor), key
    part = replayed.partition
    user = part.feature_index("user_id")
    assert summary["id_tables"]["user_id"]["rows_used"] == part.size(user) > 0

    # Evaluation/export read the same map, read-only.
    _, lookup, _ = load_trained_model(tmp_path / "run")
    assert isinstance(lookup, IdLookup)
    users = part.tables[user].keys
    users = users[users != EMPTY_KEY]  # the ids that hold a row
    feature = torch.full_like(users, user)
    assert torch.equal(lookup.rows_of(feature, users), part.lookup(feature, users) + part.first_row[user])


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise", "data_parallel"])
def test_admitted_rows_restart_from_their_initial_value_and_zero_optimizer_state(sharding):
    ctx = init_distributed("cpu")
    model_config = ModelConfig(embedding_dim=8, bottom_mlp=(8,), top_mlp=(8,), num_embeddings={"user_id": 64, "item_id": 32})
    specs = model_config.sparse_specs(["user_id", "item_id"])
    model = build_ranker(model_config, specs, ([0.0], [1.0]), seed=0, device="meta")
    sharded = shard_model(model, ctx.device, sparse_lr=0.5, sharding_types=[sharding])
    sharded.load_state_dict(build_ranker(model_config, specs, ([0.0], [1.0]), seed=0).state_dict())
    optimizer = combined_optimizer(sharded)

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    sparse = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.tensor([5, 6, 1, 2]), torch.ones(4, dtype=torch.int32))
    logits = sharded(torch.randn(2, 1), sparse)
    torch.stack([v.sum() for v in logits.values()]).sum().backward()  # fused: updates rows 5, 6 now
    optimizer.step()

    reinit = RowReinitializer(sharded, optimizer, specs)

    def local(tensor):  # sharded tables hand out ShardedTensors, replicated ones plain tensors
        return tensor.local_shards()[0].tensor if hasattr(tensor, "local_shards") else tensor

    def row_state(state: dict) -> torch.Tensor:  # the optimizer state kept per row (not a step count)
        return next(local(v) for v in state.values() if local(v).dim() >= 1 and local(v).shape[0] == 64)

    key = "embedding_bag_collection.embedding_bags.t_user_id.weight"
    # Read back through fresh state dicts: the reset must reach the tables' and optimizer's storage.
    weight = local(sharded.state_dict()[key])
    momentum = row_state(optimizer.state_dict()["state"][key])
    assert float(momentum[5].sum()) > 0 and float(momentum[6].sum()) > 0
    untouched = weight[6].clone()

    new_id = torch.tensor([123456789])
    reinit.apply({"user_id": Admitted(rows=torch.tensor([5]), ids=new_id)})
    weight = local(sharded.state_dict()[key])
    momentum = row_state(optimizer.state_dict()["state"][key])
    assert torch.equal(weight[5], initial_rows(new_id, "user_id", 8, 64)[0])
    assert float(momentum[5].abs().sum()) == 0.0
    assert torch.equal(weight[6], untouched) and float(momentum[6].sum()) > 0


def test_id_tables_switch_back_to_plain_hashing(small_features, tmp_path, capsys):
    from gpurec.cli import main
    from gpurec.embedding.modulo import ModuloRemap

    args = ["train", "--data", str(small_features), "--out", str(tmp_path / "run"), "--config", str(SMALL_CONFIG)]
    assert main([*args, "--max-steps", "3", "--id-tables", "hashed", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["id_tables"] == "hashed"
    _, remap, state = load_trained_model(tmp_path / "run")
    assert isinstance(remap, ModuloRemap) and state.model_config.ids.kind == "hashed"
