"""The online feature store, both backends (SQLite file, real redis-server): online == batch.

The consistency test replays a generated world's raw logs through the store in event-time order
and, at sampled impressions, reads the features before that timestamp's events are applied: they
must equal the row `gpurec preprocess` wrote for that impression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import redis

from gpurec.data.generate import generate_synthetic
from gpurec.data.hashing_core import PAD_ID, hash_raw_values
from gpurec.data.world import WorldConfig
from gpurec.errors import GpurecError, InvalidInput
from gpurec.features import FeatureRows, OnlineFeatureStore, open_feature_store
from gpurec.features.redis_server import RedisServer, free_port
from gpurec.preprocess.features import DENSE_FEATURES, PRIOR_FINISH_RATE, PRIOR_LIKE_RATE, SPARSE_FEATURES
from gpurec.preprocess.run import preprocess

WORLD = WorldConfig(users=150, items=300, days=2, seed=5)
DAY = 86_400_000
T0 = 1_767_571_200_000  # 2026-01-05 00:00 UTC
DENSE = [f.name for f in DENSE_FEATURES]


def _logs(root: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(root / name / "**" / "*.parquet")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, pl.DataFrame]:
    root = tmp_path_factory.mktemp("feature_store_world")
    generate_synthetic(WORLD, root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    logs = {name: _logs(root / "raw", name) for name in ("users", "items", "impressions", "actions")}
    return {
        **logs,
        "features": pl.read_parquet(root / "features" / "*" / "**" / "*.parquet").sort(
            "ts", maintain_order=True
        ),
    }


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    pid = server.process.pid
    try:
        yield server
    finally:
        server.stop()
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0, (
        "redis-server still running"
    )


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path) -> OnlineFeatureStore:
    if request.param == "sqlite":
        opened = open_feature_store(f"sqlite:///{tmp_path / 'features.db'}")
    else:
        url = request.getfixturevalue("redis_server").url(db=1)
        redis.Redis.from_url(url).flushdb()  # each test starts from an empty database
        opened = open_feature_store(url)
    yield opened
    opened.close()


def _dense(rows: FeatureRows, name: str) -> np.ndarray:
    return rows.dense[:, DENSE.index(name)]


def _checkpoints(features: pl.DataFrame) -> pl.DataFrame:
    """~400 rows over both days, a quarter of them users or items with no history."""
    fresh = features.filter((pl.col("dense_user_impressions") == 0) | (pl.col("dense_item_impressions") == 0))
    picked = pl.concat([fresh.sample(min(100, fresh.height), seed=1), features.sample(300, seed=2)]).unique(
        maintain_order=True
    )
    return picked.sort("ts").with_columns(pl.col("ts").dt.epoch("ms").alias("ts_ms"))


def test_replay_matches_preprocessing(store, world):
    features, impressions, actions = world["features"], world["impressions"], world["actions"]
    checks = _checkpoints(features)
    assert checks["ts"].dt.date().n_unique() == 2 and (checks["dense_user_impressions"] == 0).sum() > 10
    assert (checks["dense_item_impressions"] == 0).sum() > 10
    non_consenting = world["users"].filter(~pl.col("consent_training"))["user_id"]
    assert impressions["user_id"].is_in(non_consenting.implode()).sum() > 0, (
        "the world should exercise the consent filter"
    )

    store.put_users(world["users"])
    store.put_items(world["items"])
    impressions = impressions.sort("ts", maintain_order=True)
    actions = actions.sort("ts", maintain_order=True)
    imp_ts, act_ts = impressions["ts"].dt.epoch("ms").to_numpy(), actions["ts"].dt.epoch("ms").to_numpy()
    item_pool = world["items"]["item_id"].to_numpy()
    rng = np.random.default_rng(3)
    done_imp = done_act = 0
    for row in checks.iter_rows(named=True):
        ts = row["ts_ms"]
        # Every event strictly before ts, none at ts (batch counts strictly before the impression).
        # The store's state then depends only on which events were applied, not on their order
        # within the call (test_action_before_its_impression_waits), so each gap is two calls.
        end_imp, end_act = np.searchsorted(imp_ts, ts), np.searchsorted(act_ts, ts)
        if end_imp > done_imp:
            store.record_impressions(impressions[done_imp:end_imp])
        if end_act > done_act:
            store.record_actions(actions[done_act:end_act])
        done_imp, done_act = max(done_imp, end_imp), max(done_act, end_act)
        # A batched read: the impression's item at a random position among other candidates.
        candidates = rng.choice(item_pool, 5)
        at = int(rng.integers(0, 6))
        candidates = np.insert(candidates, at, row["item_id"])
        got = store.read(row["user_id"], candidates, ts)
        want = np.array([row[f.column] for f in DENSE_FEATURES], np.float32)
        np.testing.assert_allclose(
            got.dense[at], want, rtol=1e-6, atol=0, err_msg=f"dense at {row['ts']} for {row['request_id']}"
        )
        for f in SPARSE_FEATURES:
            value = got.multi_valued[f.name][at].tolist() if f.multi_valued else int(got.sparse[f.name][at])
            assert value == row[f.column], f"{f.name} at {row['ts']}"
        assert got.consent_training and got.user_known and got.missing == 0
    assert done_imp > 0.8 * len(imp_ts)


def _small_world(store: OnlineFeatureStore) -> None:
    users = [
        {
            "user_id": 1,
            "region": "eu",
            "device": "ios",
            "language": "en",
            "signup_ts": T0 - DAY,
            "consent_personalisation": True,
            "consent_training": True,
        },
        {
            "user_id": 2,
            "region": "us",
            "device": "web",
            "language": "es",
            "signup_ts": T0 - DAY,
            "consent_personalisation": True,
            "consent_training": False,
        },
        {
            "user_id": 3,
            "region": "us",
            "device": "web",
            "language": "es",
            "signup_ts": T0 - DAY,
            "consent_personalisation": False,
            "consent_training": False,
        },
    ]
    items = [
        {"item_id": i, "author_id": 100 + i, "duration_ms": 10_000 * i, "upload_ts": T0 - i * 3_600_000, "hashtags": [f"t{i}", "all"],
         "language": "en", "region": "eu"}
        for i in range(1, 6)
    ]  # fmt: skip
    store.put_users(users)
    store.put_items(items)


def _impressions(*rows: tuple[int, int, int, int]) -> dict[str, list[int]]:
    return {name: [r[i] for r in rows] for i, name in enumerate(("request_id", "item_id", "user_id", "ts"))}


def _actions(*rows: tuple[int, int, int, int, bool]) -> dict[str, list]:
    return {
        name: [r[i] for r in rows]
        for i, name in enumerate(("request_id", "item_id", "ts", "watch_ms", "like"))
    }


def test_unknown_user_and_items_get_the_priors_and_are_counted(store):
    _small_world(store)
    rows = store.read(999, [1, 12345, 2], T0)
    assert not rows.user_known and rows.missing_items == 1 and rows.missing == 2
    assert rows.item_known.tolist() == [True, False, True]
    np.testing.assert_allclose(_dense(rows, "user_like_rate"), PRIOR_LIKE_RATE, rtol=1e-6)
    np.testing.assert_allclose(_dense(rows, "item_finish_rate"), PRIOR_FINISH_RATE, rtol=1e-6)
    assert _dense(rows, "user_impressions").tolist() == [0, 0, 0]
    assert _dense(rows, "duration_s")[1] == 0 and _dense(rows, "duration_s")[0] > 0
    assert rows.sparse["user_id"].tolist() == hash_raw_values([999] * 3, "user_id", "int").tolist()
    assert rows.sparse["item_id"][1] == hash_raw_values([12345], "item_id", "int")[0]
    assert rows.sparse["device"].tolist() == [PAD_ID] * 3 and rows.multi_valued["hashtags"][1].size == 0
    assert not rows.consent_training and not rows.consent_personalisation
    inputs = rows.model_inputs()
    assert (
        inputs["dense"].shape == (3, len(DENSE))
        and inputs["hashtags"].shape == (3, 2)
        and inputs["hashtags"][1].tolist() == [PAD_ID] * 2
    )


def test_batched_read_keeps_candidate_order_and_returns_consent(store):
    _small_world(store)
    order = [4, 1, 5, 1, 3]
    rows = store.read(2, order, T0 + 3_600_000)
    assert rows.item_ids.tolist() == order
    np.testing.assert_allclose(_dense(rows, "duration_s"), np.log1p(np.array(order) * 10.0), rtol=1e-6)
    assert rows.sparse["item_id"].tolist() == hash_raw_values(order, "item_id", "int").tolist()
    assert [ids.tolist() for ids in rows.multi_valued["hashtags"]] == [
        hash_raw_values([f"t{i}", "all"], "hashtags", "string").tolist() for i in order
    ]
    assert rows.sparse["hour"].tolist() == [hash_raw_values([1], "hour", "hour")[0]] * 5
    assert (rows.consent_personalisation, rows.consent_training) == (True, False)
    assert (store.read(3, [1], T0).consent_personalisation, store.read(1, [1], T0).consent_training) == (
        False,
        True,
    )
    assert store.read(1, [], T0).dense.shape == (0, len(DENSE))


def test_counts_follow_preprocessing_and_redelivery_does_not_double_count(store):
    _small_world(store)
    batch = _impressions(
        (10, 1, 1, T0 + 1000), (10, 2, 1, T0 + 1000), (11, 3, 2, T0 + 2000), (12, 99, 1, T0 + 2000)
    )
    first = store.record_impressions(batch)
    assert (first["applied"], first["excluded_user"], first["excluded_item"]) == (
        2,
        1,
        1,
    )  # user 2: no training consent
    again = store.record_impressions({k: v + v for k, v in batch.items()})  # redelivered, twice in one batch
    assert again["applied"] == 0 and again["duplicate"] == 4
    # Item 1 is 10 s long: 9 s is a finish (>= 90%); item 2 is 20 s: 17.999 s is not.
    liked = _actions((10, 1, T0 + 9000, 9000, True), (10, 2, T0 + 9500, 17_999, False))
    assert store.record_actions(liked)["applied"] == 2
    assert store.record_actions(liked)["applied"] == 2  # the same actions again replace themselves
    rows = store.read(1, [1, 2], T0 + 10_000)
    np.testing.assert_allclose(_dense(rows, "user_impressions"), np.log1p(2), rtol=1e-6)
    np.testing.assert_allclose(_dense(rows, "user_like_rate"), (1 + 10 * PRIOR_LIKE_RATE) / 12, rtol=1e-6)
    np.testing.assert_allclose(_dense(rows, "user_finish_rate"), (1 + 10 * PRIOR_FINISH_RATE) / 12, rtol=1e-6)
    np.testing.assert_allclose(_dense(rows, "item_like_rate"), [(1 + 0.2) / 11, 0.2 / 11], rtol=1e-6)
    # A later action for the same impression replaces the first (the last wins); an older one is stale.
    assert store.record_actions(_actions((10, 1, T0 + 9900, 1000, False)))["applied"] == 1
    assert store.record_actions(_actions((10, 1, T0 + 9000, 9000, True)))["stale"] == 1
    rows = store.read(1, [1], T0 + 20_000)
    np.testing.assert_allclose(_dense(rows, "user_like_rate"), 10 * PRIOR_LIKE_RATE / 12, rtol=1e-6)
    item_age = (T0 + 20_000 - (T0 - 3_600_000)) / 3_600_000
    np.testing.assert_allclose(_dense(rows, "item_age_hours"), np.log1p(item_age), rtol=1e-6)


def test_action_before_its_impression_waits_and_late_actions_are_ignored(store):
    _small_world(store)
    early = store.record_actions(_actions((20, 1, T0 + 500, 9500, True)))
    assert early["pending"] == 1
    assert store.read(1, [1], T0 + 600).dense[0, DENSE.index("user_like_rate")] == np.float32(PRIOR_LIKE_RATE)
    assert store.record_impressions(_impressions((20, 1, 1, T0 + 1000)))["pending_applied"] == 1
    rows = store.read(1, [1], T0 + 2000)
    np.testing.assert_allclose(_dense(rows, "user_like_rate"), (1 + 0.2) / 11, rtol=1e-6)
    np.testing.assert_allclose(_dense(rows, "user_finish_rate"), (1 + 3) / 11, rtol=1e-6)
    assert store.stats()["pending"] == 0
    # Batch joins an impression with actions of its day and the next only.
    store.record_impressions(_impressions((21, 2, 1, T0 + 3000)))
    assert store.record_actions(_actions((21, 2, T0 + 2 * DAY + 10, 20_000, True)))["pending"] == 1
    store.record_impressions(_impressions((22, 3, 1, T0 + DAY + 5)))
    assert store.record_actions(_actions((22, 3, T0 + 10, 20_000, True)))["outside_window"] == 1
    np.testing.assert_allclose(
        _dense(store.read(1, [2, 3], T0 + 2 * DAY + 20), "item_like_rate"), 0.2 / 11, rtol=1e-6
    )


def test_old_impression_records_are_dropped_as_event_time_advances(store):
    _small_world(store)
    store.record_impressions(_impressions((30, 1, 1, T0 + 1000), (31, 2, 1, T0 + DAY + 1000)))
    store.record_actions(_actions((99, 5, T0 + 1000, 1, True)))  # never gets its impression
    assert store.stats()["impressions"] == 2 and store.stats()["pending"] == 1
    store.record_impressions(_impressions((32, 3, 1, T0 + 2 * DAY + 1000)))
    assert store.stats()["impressions"] == 3  # day 0 can still be joined by a late action
    store.record_impressions(_impressions((33, 4, 1, T0 + 3 * DAY)))
    assert store.stats()["impressions"] == 3 and store.stats()["pending"] == 0  # day 0 dropped
    assert store.read(1, [1], T0 + 3 * DAY).dense[0, DENSE.index("user_impressions")] == np.float32(
        np.log1p(4)
    )


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda s: s.record_impressions({"request_id": [1], "item_id": [1], "ts": [T0]}),
            "missing column 'user_id'",
        ),
        (lambda s: s.record_impressions(_impressions((1, 1, 1, -5))), "negative"),
        (
            lambda s: s.record_impressions({**_impressions((1, 1, 1, T0)), "user_id": ["x"]}),
            "column 'user_id'",
        ),
        (
            lambda s: s.record_actions({**_actions((1, 1, T0, 5, True)), "watch_ms": [None]}),
            "missing value in column 'watch_ms'",
        ),
        (lambda s: s.record_actions(_actions((1, 1, T0, 7_200_000, True))), "watch_ms"),
        (lambda s: s.record_actions({**_actions((1, 1, T0, 5, True)), "like": ["yes"]}), "column 'like'"),
        (lambda s: s.put_items([{"item_id": 1, "author_id": 2}]), "missing column"),
        (lambda s: s.put_users("users.parquet"), "expected an Arrow table"),
        (lambda s: s.read("7", [1], T0), "user_id"),
        (lambda s: s.read(1, [[1, 2]], T0), "item_ids"),
        (lambda s: s.read(1, [1.5], T0), "item_ids"),
        (lambda s: s.read(1, [1], None), "ts_ms"),
    ],
)
def test_bad_input_raises_invalid_input(store, call, message):
    _small_world(store)
    with pytest.raises(InvalidInput, match=message):
        call(store)


def test_urls_and_a_store_of_another_feature_list(tmp_path):
    for url in ("postgres://x/y", "sqlite://relative.db"):
        with pytest.raises(InvalidInput, match="expected sqlite"):
            open_feature_store(url)
    with pytest.raises(InvalidInput, match="no path"):
        open_feature_store("sqlite:///")
    with pytest.raises(GpurecError, match="cannot reach redis"):
        open_feature_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    with pytest.raises(InvalidInput, match="directory"):
        open_feature_store(tmp_path)
    path = tmp_path / "old.db"
    open_feature_store(path).close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 'other' WHERE key = 'layout'")
    with pytest.raises(InvalidInput, match="another feature list"):
        open_feature_store(f"sqlite:///{path}")


READER = """
import json, sys
from gpurec.features import open_feature_store
rows = open_feature_store(sys.argv[1]).read(1, [1, 2], int(sys.argv[2]))
print(json.dumps({"user_impressions": rows.dense[:, 0].tolist(), "missing": rows.missing}))
"""


def test_sqlite_is_shared_by_a_writer_and_a_reader_process(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with open_feature_store(url) as writer:
        _small_world(writer)
        writer.record_impressions(_impressions((40, 1, 1, T0), (41, 1, 1, T0 + 1), (41, 2, 1, T0 + 1)))
        out = subprocess.run(
            [sys.executable, "-c", READER, url, str(T0 + 10)], capture_output=True, text=True, check=True
        ).stdout
    got = json.loads(out)
    np.testing.assert_allclose(got["user_impressions"], [np.log1p(3)] * 2, rtol=1e-6)
    assert got["missing"] == 0
