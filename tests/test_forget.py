"""Forgetting a user, part by part: the online store, the joiner, the event log, the Parquet files.

Each test uses a real store / log / Parquet dataset and a 63-bit id where the bytes of a file are
searched (a pseudonymous id: small raw ids would match unrelated bytes).
"""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from test_consent import T0, users_table
from test_joiner import action, joiner, served

from gpurec.data.hashing_core import hash_id
from gpurec.features import open_feature_store
from gpurec.features.redis_server import RedisServer
from gpurec.privacy.erase import erase_parquet
from gpurec.privacy.forget import purge_event_log
from gpurec.serve.items import Item, items_table
from gpurec.stream.join import DEAD_LETTER
from gpurec.stream.joiner_state import CONSENT_PREFIX, pack_user
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Action, DeadLetter, Example, encode

ALICE = 0x5A5A_1234_5678_9ABC  # forgotten
BOB = 0x1B2C_3D4E_5F60_7182  # kept


def _bytes_of(user_id: int) -> list[bytes]:
    return [user_id.to_bytes(8, order, signed=True) for order in ("little", "big")] + [str(user_id).encode()]


def _files_hold(paths, user_id: int) -> bool:
    data = b"".join(p.read_bytes() for p in paths if p.exists())
    return any(needle in data for needle in _bytes_of(user_id))


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_store_forgets_a_user_and_refuses_their_profile_afterwards(backend, tmp_path):
    def check(url: str) -> None:
        with open_feature_store(url) as store:
            store.put_users(users_table([(ALICE, "de", "ios", "de", True, True), (BOB, "de", "android", "de", True, True)]))
            store.put_items(items_table([Item(10, 50, 20_000, T0 - 3_600_000, ("t",), "de", "de")]))
            impressions = {"request_id": [1, 2], "item_id": [10, 10], "user_id": [ALICE, BOB], "ts_ms": [T0, T0]}
            store.record_impressions(impressions)
            assert store.stats()["impressions"] == 2
            assert store.forget_user(ALICE) == {"profiles": 1, "impressions": 1}
            rows = store.read(ALICE, [10], T0 + 1)
            assert rows.forgotten and not rows.user_known and not rows.consent_training
            kept = store.read(BOB, [10], T0 + 1)
            assert kept.user_known and not kept.forgotten
            assert store.stats()["impressions"] == 1
            again = store.put_users(users_table([(ALICE, "de", "ios", "de", True, True)]))
            assert again["forgotten"] == 1 and again["applied"] == 0
            assert not store.read(ALICE, [10], T0 + 2).user_known
            assert store.forget_user(ALICE) == {"profiles": 0, "impressions": 0}  # idempotent
            assert not store.read(777, [10], T0).forgotten  # unknown is not forgotten

    if backend == "sqlite":
        path = tmp_path / "features.db"
        check(f"sqlite:///{path}")
        files = [path, path.with_name("features.db-wal")]
        assert not _files_hold(files, ALICE), "the forgotten user's bytes are still in the SQLite files"
        assert _files_hold(files, BOB)
    else:
        with RedisServer(tmp_path / "redis") as server:
            check(server.url())


def test_the_joiner_drops_a_forgotten_user_and_deletes_their_consent_entry():
    j = joiner()
    j.on_consent(7, False, T0 - 10)  # a revoke earlier: stored as a consent entry
    j.drain_changes()
    j.on_served(served(request=1, user=7, ts=T0))
    j.on_served(served(request=2, user=8, ts=T0))
    assert j.on_consent(7, False, T0 + 5, forget=True) == []
    upserts, deletes = j.drain_changes()
    assert CONSENT_PREFIX + pack_user(7) in deletes
    assert all(not key.startswith(CONSENT_PREFIX) for key in upserts)
    assert CONSENT_PREFIX + pack_user(7) not in j.snapshot()
    j.on_served(served(request=3, user=7, ts=T0 + 10))  # served after the forget: excluded
    j.on_action(action(request=1, user=7, like=True))
    out = j.on_watermark(T0 + 10_000_000)
    assert [e.served.user_id for e in out if isinstance(e, Example)] == [8]


def test_the_event_log_erases_a_users_records_dead_letters_and_state(tmp_path):
    path = tmp_path / "log.db"
    with open_event_log(f"sqlite:///{path}") as log:
        for topic in ("served", "actions", "examples", DEAD_LETTER):
            log.create_topic(topic, 2)
        mine, theirs = Action(1, 5, 9, ALICE, T0, 100, True, False, False, False, False), Action(2, 6, 9, BOB, T0, 1, False, False, False, False, False)
        log.append("actions", [Record(ALICE, encode(mine), T0), Record(BOB, encode(theirs), T0)])
        log.append("served", [Record(ALICE, b"row of alice", T0)] * 3)
        # A dead letter is keyed by something else: only its payload names the user.
        letters = [DeadLetter("action", "no served row", encode(a)) for a in (mine, theirs)]
        log.append(DEAD_LETTER, [Record(0, encode(letter), T0) for letter in letters])
        state_key = CONSENT_PREFIX + pack_user(ALICE)
        log.commit("joiner", offsets={("served", 0): 1}, state_changes={("served", 0): {state_key: b"x", b"other": b"y"}})
        deleted = purge_event_log(log, ALICE)
        assert deleted == {"actions": 1, "served": 3, DEAD_LETTER: 1, "state": 1}
        assert sum(len(log.read("actions", p, 0)) for p in range(2)) == 1
        remaining = [r for p in range(2) for r in log.read(DEAD_LETTER, p, 0)]
        assert len(remaining) == 1
        state = {}
        for p in range(2):
            state.update(log.load_state("joiner", "served", p))
        assert state == {b"other": b"y"}
        assert purge_event_log(log, ALICE) == {}  # idempotent
    assert not _files_hold([path, path.with_name("log.db-wal")], ALICE)


def test_parquet_erasure_removes_the_users_rows_and_their_requests_actions(small_features, tmp_path):
    raw, features = tmp_path / "raw", tmp_path / "features"
    shutil.copytree(small_features.parent / "raw", raw)
    shutil.copytree(small_features, features)
    impressions = pl.read_parquet(raw / "impressions" / "**" / "*.parquet", hive_partitioning=False)
    user = impressions["user_id"].value_counts(sort=True)["user_id"][0]
    requests = impressions.filter(pl.col("user_id") == user)["request_id"].unique()
    actions = pl.read_parquet(raw / "actions" / "**" / "*.parquet", hive_partitioning=False)
    theirs = actions.filter(pl.col("request_id").is_in(requests.implode())).height
    assert theirs > 0

    deleted = erase_parquet(raw, user, hash_id(user, "user_id"))
    assert deleted["impressions"] == len(impressions.filter(pl.col("user_id") == user))
    assert deleted["actions"] == theirs and deleted["users"] == 1
    after = pl.read_parquet(raw / "impressions" / "**" / "*.parquet", hive_partitioning=False)
    assert user not in after["user_id"] and after.height == impressions.height - deleted["impressions"]
    after_actions = pl.read_parquet(raw / "actions" / "**" / "*.parquet", hive_partitioning=False)
    assert after_actions.height == actions.height - theirs

    rows = pl.read_parquet(features / "train" / "**" / "*.parquet", hive_partitioning=False)
    deleted = erase_parquet(features, user, hash_id(user, "user_id"))
    assert deleted.get("train", 0) == rows.filter(pl.col("user_id") == user).height > 0
    for split in ("train", "valid", "test"):
        left = pl.read_parquet(features / split / "**" / "*.parquet", hive_partitioning=False)
        assert user not in left["user_id"] and hash_id(user, "user_id") not in left["sparse_user_id"]
    assert erase_parquet(features, user, hash_id(user, "user_id")) == {}  # idempotent
