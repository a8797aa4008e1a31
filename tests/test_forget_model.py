"""Forgetting a user in the model: the id map's deny-list, the trainer's reset, the served score.

A forgotten id loses its row (released, embedding and optimizer state zeroed, shipped to servers
by the next delta), is never admitted again, and leaves no copy of itself (raw or hashed) in the
id map's state: after it the served score of the user equals that of a user never seen.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from collections import Counter

import pytest
import torch
from test_sync import scores, served_inputs, served_module
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.config import IdTableConfig
from gpurec.embedding.cuckoo import owner_of
from gpurec.embedding.idmap import HashedIds, id_map_for, serving_lookup
from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import (
    TrainerState,
    find_checkpoint,
    read_trained_run,
    save_checkpoint,
    verify_checkpoint,
)
from gpurec.model.trained import load_trained_model
from gpurec.privacy.checkpoint_forget import _read_all, _walk, forget_in_checkpoint, user_table_keys
from gpurec.sync.deltafile import DeltaApplier
from gpurec.sync.examples import to_batch
from gpurec.sync.publish import DeltaPublisher, table_name
from gpurec.train.config import TrainConfig
from gpurec.train.distributed import init_distributed
from gpurec.train.recipe import Trainer, build_trainer

NEVER_SEEN = 0x3B1D_55E0_9A7C_4F21  # a table key no training data holds
SPECS = [SparseFeatureSpec("user_id", 64, 4), SparseFeatureSpec("item_id", 64, 4)]


def _kjt(users: list[int], items: list[int]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        ["user_id", "item_id"], torch.tensor(users + items), torch.ones(len(users) + len(items), dtype=torch.int32)
    )


def _assign(ids: CollisionlessIds, users: list[int], t: int = 0) -> list[int]:
    rows, _ = ids.assign(_kjt(users, [7] * len(users)), torch.full((len(users),), t))
    return rows.to_dict()["user_id"].values().tolist()


def _state_bytes(ids) -> bytes:
    buffer = io.BytesIO()
    torch.save(ids.state_dict(), buffer)
    return buffer.getvalue()


def _key_bytes(key: int) -> list[bytes]:
    return [key.to_bytes(8, order, signed=True) for order in ("little", "big")]


def test_a_forgotten_id_reads_the_default_row_and_is_never_admitted_again():
    alice, bob, carol = 0x5A5A_1234_5678_9ABC, 0x1B2C_3D4E_5F60_7182, 0x2C3D_4E5F_6071_8293
    ids = CollisionlessIds(SPECS, IdTableConfig(admit_after=2))
    rows = _assign(ids, [alice, alice, bob, bob])
    alice_row, bob_row = rows[0], rows[2]
    assert alice_row > 0 and bob_row > 0 and alice_row != bob_row
    assert any(k in _state_bytes(ids) for k in _key_bytes(alice))

    released = ids.forget({"user_id": torch.tensor([alice])})
    assert released["user_id"].tolist() == [alice_row]
    assert _assign(ids, [alice, bob]) == [0, bob_row]  # the default row for alice only
    # However often alice occurs again, she earns no row; a new id still does.
    for t in range(1, 6):
        assert _assign(ids, [alice, alice, carol, carol], t)[:2] == [0, 0]
    stats = ids.stats()["user_id"]
    assert stats["forgotten"] == 1 and stats["refused_forgotten"] >= 5
    assert serving_lookup([ids]).feature_rows("user_id", torch.tensor([alice, carol])).tolist()[0] == -1
    # Neither the key nor its row's sketch count stays in the state; the deny-list survives a checkpoint.
    assert not any(k in _state_bytes(ids) for k in _key_bytes(alice))
    restored = CollisionlessIds(SPECS, IdTableConfig(admit_after=2))
    restored.load_state_dict(ids.state_dict())
    assert _assign(restored, [alice, alice, alice], 9) == [0, 0, 0]
    assert ids.forget({"user_id": [alice]}) == {}  # idempotent: nothing left to release
    assert ids.stats()["user_id"]["forgotten"] == 1


def test_only_the_owner_partition_releases_and_every_partition_reports_it():
    config = IdTableConfig(admit_after=1)
    parts = [CollisionlessIds(SPECS, config, rank=r, world_size=2) for r in range(2)]
    users = torch.arange(1000, 1016, dtype=torch.int64)
    owners = owner_of(users, 2)
    for rank, part in enumerate(parts):  # what a 2-rank step would admit: each owner its own ids
        mine = users[owners == rank]
        feature = torch.zeros_like(mine)
        part.partition.assign(feature, mine, torch.zeros_like(mine), 0)
    lookup = serving_lookup(parts)
    target = users[:6]
    expected = sorted(lookup.feature_rows("user_id", target).tolist())
    assert min(expected) >= 0
    released = [sorted(part.forget({"user_id": target})["user_id"].tolist()) for part in parts]
    assert sorted(released[0] + released[1]) == expected  # no process group: each reports its own
    assert bool((serving_lookup(parts).feature_rows("user_id", users)[:6] == -1).all())
    assert bool((serving_lookup(parts).feature_rows("user_id", users)[6:] >= 0).all())


def test_hashed_tables_cannot_forget_and_say_so():
    hashed = id_map_for(IdTableConfig(kind="hashed"), SPECS)
    assert isinstance(hashed, HashedIds) and not hashed.supports_forget
    assert hashed.forget({"user_id": torch.tensor([5])}) == {}
    collisionless = id_map_for(IdTableConfig(), SPECS)
    assert collisionless.supports_forget
    with pytest.raises(InvalidInput, match="no such id table"):
        collisionless.forget({"user_region": [1]})
    with pytest.raises(ValueError, match="forget_filter_bits"):
        IdTableConfig(forget_filter_bits=12)


# --- a trained model ---------------------------------------------------------------------------


def trainer_from(run_dir) -> Trainer:
    """A trainer resumed from a run's checkpoint, built the way online training builds it."""
    source = find_checkpoint(run_dir)
    run = read_trained_run(source)
    train_config = TrainConfig.from_dict(dict(run.train_config))
    ctx = init_distributed(train_config.device)
    run = dataclasses.replace(run, world_size=ctx.world_size)
    trainer = build_trainer(run, train_config, ctx, ([0.0] * run.num_dense, [1.0] * run.num_dense))
    trainer.resume(source)
    return trainer


def _user_key(example) -> int:
    return example.served.model_inputs().sparse["user_id"][0]


def test_the_served_score_of_a_forgotten_user_equals_a_never_seen_users(batch_run, valid_examples, tmp_path):
    trainer = trainer_from(batch_run)
    publisher = DeltaPublisher(trainer, tmp_path / "deltas", rows_every_s=1e9, dense_every_s=1e9, snapshot_every=1000)
    module, contract = served_module(batch_run)
    applier = DeltaApplier(module, tmp_path / "deltas")
    applier.poll()
    lookup = serving_lookup([trainer.ids])
    examples = valid_examples[:600]
    keys = torch.tensor([_user_key(e) for e in examples])
    has_row = lookup.feature_rows("user_id", keys) >= 0
    user = Counter(k for k, kept in zip(keys.tolist(), has_row.tolist(), strict=True) if kept).most_common(1)[0][0]
    theirs = [e for e in examples if _user_key(e) == user]
    others = [e for e in examples if _user_key(e) != user][:100]
    row = int(lookup.feature_rows("user_id", torch.tensor([user])))
    column = contract.sparse_features.index("user_id")
    inputs = served_inputs(theirs, contract)
    as_never_seen = (inputs[0], inputs[1].clone().index_fill_(1, torch.tensor([column]), NEVER_SEEN), inputs[2])
    other_inputs = served_inputs(others, contract)
    before, others_before = scores(module, inputs), scores(module, other_inputs)
    assert not torch.allclose(before, scores(module, as_never_seen))  # the user's row mattered
    checkpoint_before = save_checkpoint(tmp_path / "before", trainer.model, trainer.optimizer, TrainerState(), ids=trainer.ids)
    assert _holds_key(checkpoint_before, user)

    released = trainer.forget({"user_id": torch.tensor([user])})
    assert released["user_id"].tolist() == [row]
    for shard in trainer.reinit.shards["user_id"]:  # embedding and RowWiseAdagrad state: zero
        local = row - shard.row_start
        if 0 <= local < shard.weight.shape[0]:
            assert not shard.weight[local].any() and shard.states and all(not s[local].any() for s in shard.states)
    publisher.after_forget(trainer, TrainerState())
    assert applier.poll() >= 1 and applier.version == publisher.seq  # the forced delta, now
    assert not module.state_dict()[table_name("user_id")][row].any()
    after = scores(module, inputs)
    assert torch.equal(after, scores(module, as_never_seen))  # served like a user never seen
    assert torch.equal(scores(module, other_inputs), others_before)  # nobody else moved

    # Training on the user's examples again admits no row for them, and no checkpoint holds them.
    batch = to_batch(theirs * 4, trainer.run)
    for _ in range(3):
        trainer.step(batch)
    assert int(serving_lookup([trainer.ids]).feature_rows("user_id", torch.tensor([user]))) == -1
    assert trainer.ids.stats()["user_id"]["refused_forgotten"] >= 1
    checkpoint_after = save_checkpoint(tmp_path / "after", trainer.model, trainer.optimizer, TrainerState(), ids=trainer.ids)
    assert not _holds_key(checkpoint_after, user)


def _holds_key(checkpoint, key: int) -> bool:
    data = b"".join(p.read_bytes() for p in checkpoint.rglob("*") if p.is_file())
    return any(k in data for k in _key_bytes(key))


# --- a checkpoint, offline ----------------------------------------------------------------------


def test_forget_in_checkpoint_rewrites_it_in_place_and_the_user_is_served_like_a_never_seen_one(
    batch_run, valid_examples, tmp_path
):
    run = tmp_path / "run"
    shutil.copytree(batch_run, run)
    checkpoint = find_checkpoint(run)
    module, contract = served_module(run)
    lookup = load_trained_model(run).lookup
    examples = valid_examples[:600]
    keys = torch.tensor([_user_key(e) for e in examples])
    has_row = (lookup.feature_rows("user_id", keys) >= 0).tolist()
    example = next(e for e, kept in zip(examples, has_row, strict=True) if kept)
    (key,) = user_table_keys(example.served.user_id)
    assert key == _user_key(example)  # what preprocessing put in the data is what the map stores
    theirs = [e for e in examples if _user_key(e) == key]
    others = [e for e in examples if _user_key(e) != key][:100]
    column = contract.sparse_features.index("user_id")
    inputs = served_inputs(theirs, contract)
    as_never_seen = (inputs[0], inputs[1].clone().index_fill_(1, torch.tensor([column]), NEVER_SEEN), inputs[2])
    others_before = scores(module, served_inputs(others, contract))
    assert not torch.allclose(scores(module, inputs), scores(module, as_never_seen))
    assert _holds_key(checkpoint, key)
    original = dict(_walk(_read_all(checkpoint)))
    (checkpoint.parent / f".{checkpoint.name}.forget-new").mkdir()  # what a crashed rewrite left

    result = forget_in_checkpoint(checkpoint, {"user_id": [key]})
    assert result and result.released == {"user_id": 1}
    assert verify_checkpoint(checkpoint) is None and not _holds_key(checkpoint, key)
    assert sorted(p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")) == []
    row = int(lookup.feature_rows("user_id", torch.tensor([key])))
    rewritten = dict(_walk(_read_all(checkpoint)))
    changed = sorted(name for name, t in original.items() if not torch.equal(t, rewritten[name]))
    user_table = "embedding_bags.t_user_id.weight"
    assert all(name.startswith("ids.") or user_table in name for name in changed)
    assert any(name.startswith("model.") for name in changed) and any(name.startswith("optimizer.") for name in changed)
    for name in changed:
        if user_table in name:
            assert not rewritten[name][row].any()
            rest = torch.ones(rewritten[name].shape[0], dtype=torch.bool).index_fill_(0, torch.tensor([row]), False)
            assert torch.equal(rewritten[name][rest], original[name][rest])

    served, _ = served_module(run)  # what an export of the rewritten checkpoint serves
    assert torch.equal(scores(served, inputs), scores(served, as_never_seen))
    assert torch.equal(scores(served, served_inputs(others, contract)), others_before)
    # Resumed training never admits the user again; a second erasure finds nothing to do.
    trainer = trainer_from(run)
    trainer.step(to_batch(theirs * 4, trainer.run))
    assert int(serving_lookup([trainer.ids]).feature_rows("user_id", torch.tensor([key]))) == -1
    inode = (checkpoint / ".metadata").stat().st_ino
    assert not forget_in_checkpoint(checkpoint, {"user_id": [key]})
    assert (checkpoint / ".metadata").stat().st_ino == inode
