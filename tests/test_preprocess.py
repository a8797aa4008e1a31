"""`gpurec preprocess` on hand-built worlds whose right answer is known row by row.

Each test writes a few users, items, impressions and actions with `logs.write_day`, runs the real
pipeline (through the CLI where the CLI is the point) and checks single values.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from test_preprocess_world import (
    DAY0,
    MS_PER_DAY,
    NOW,
    SECOND,
    START,
    action,
    impression,
    item,
    read_outputs,
    user,
    write_world,
)

from gpurec.cli import main
from gpurec.data.hashing import hash_id, hash_string
from gpurec.data.validate import read_dead_letter
from gpurec.preprocess.engine import resolve_engine
from gpurec.preprocess.features import PRIOR_LIKE_RATE, PRIOR_WEIGHT
from gpurec.preprocess.manifest import Manifest, load_manifest
from gpurec.preprocess.run import preprocess
from gpurec.preprocess.splits import Shard, split_days

MINUTE = 60 * SECOND
U1, U2, U3, STRANGER = 11, 12, 13, 99  # U3 refused training consent; STRANGER is in no users table
X, Y, Z = 21, 22, 23


def like_rate(likes: int, n: int) -> float:
    return (likes + PRIOR_WEIGHT * PRIOR_LIKE_RATE) / (n + PRIOR_WEIGHT)


def rows_by_request(out: Path) -> dict[int, dict]:
    return {r["request_id"]: r for r in read_outputs(out).iter_rows(named=True)}


def run(tmp_path: Path, **kwargs) -> Path:
    preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", now_ms=NOW, **kwargs)
    return tmp_path / "out"


def test_a_like_counts_at_its_action_time_not_at_its_impression(tmp_path: Path) -> None:
    """Impression 1 (10:00) is liked and finished at 10:05. Impression 2 at 10:02 must not see that
    like (counting it at the impression's ts would leak the future); impression 3 at 10:06 must."""
    t = START + 10 * 60 * MINUTE
    impressions = [
        impression(1, t, U1, X),
        impression(2, t + 2 * MINUTE, U1, Y),
        impression(4, t + 3 * MINUTE, U2, X),  # item side: X's like is also still in the future
        impression(3, t + 6 * MINUTE, U1, Z),
        impression(5, t + 7 * MINUTE, U2, X),
    ]
    actions = [action(1, X, t + 5 * MINUTE, watch_ms=20_000, like=True), action(2, Y, t + 2 * MINUTE + 500, 100, False)]
    write_world(tmp_path / "logs", [user(U1), user(U2)], [item(X), item(Y), item(Z)], impressions, actions)
    rows = rows_by_request(run(tmp_path))
    assert rows[1]["like"] == 1.0 and rows[1]["finish"] == 1.0 and rows[2]["like"] == 0.0
    assert rows[2]["dense_user_like_rate"] == pytest.approx(like_rate(0, 1))  # leak would give like_rate(1, 1)
    assert rows[3]["dense_user_like_rate"] == pytest.approx(like_rate(1, 2))
    assert rows[2]["dense_user_finish_rate"] == pytest.approx((0 + 10 * 0.3) / (1 + 10))
    assert rows[4]["dense_item_like_rate"] == pytest.approx(like_rate(0, 1))
    assert rows[5]["dense_item_like_rate"] == pytest.approx(like_rate(1, 2))


def test_next_day_action_labels_the_impression_and_counts_on_its_own_day(tmp_path: Path) -> None:
    """Shown at 23:59:50, liked at 00:00:05 the next day (another partition of the actions log)."""
    midnight = START + MS_PER_DAY
    impressions = [
        impression(1, midnight - 10 * SECOND, U1, X),
        impression(2, midnight + 1 * SECOND, U1, Y),  # before the like
        impression(3, midnight + 10 * SECOND, U1, Z),  # after it
    ]
    actions = [action(1, X, midnight + 5 * SECOND, watch_ms=15_000, like=True)]
    write_world(tmp_path / "logs", [user(U1)], [item(X), item(Y), item(Z)], impressions, actions)
    rows = rows_by_request(run(tmp_path, valid_fraction=0.0, test_fraction=0.0))
    assert rows[1]["like"] == 1.0
    assert rows[2]["dense_user_like_rate"] == pytest.approx(like_rate(0, 1))
    assert rows[3]["dense_user_like_rate"] == pytest.approx(like_rate(1, 2))
    assert load_manifest(tmp_path / "out").splits["train"].days == [DAY0, "2026-03-03"]


def test_same_request_impressions_do_not_count_each_other(tmp_path: Path) -> None:
    impressions = [impression(1, START + MINUTE, U1, it, position=p) for p, it in enumerate((X, Y, Z))]
    impressions.append(impression(2, START + 2 * MINUTE, U1, X))
    write_world(tmp_path / "logs", [user(U1)], [item(X), item(Y), item(Z)], impressions, [])
    frame = read_outputs(run(tmp_path))
    assert frame["dense_user_impressions"].to_list() == pytest.approx([0.0, 0.0, 0.0, pl.Series([3.0]).log1p()[0]])


def test_users_without_training_consent_or_unknown_are_absent_everywhere(tmp_path: Path) -> None:
    users = [user(U1), user(U2), user(U3, consent=False)]
    impressions = [impression(d * 10 + i, START + d * MS_PER_DAY + i * MINUTE, u, X) for d in range(3) for i, u in enumerate((U1, U2, U3, STRANGER))]
    write_world(tmp_path / "logs", users, [item(X)], impressions, [])
    summary = preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", now_ms=NOW)
    manifest = load_manifest(tmp_path / "out")
    seen = set()
    for split in ("train", "valid", "test"):
        assert manifest.splits[split].rows > 0
        for path in manifest.split_files(split, tmp_path / "out"):
            seen |= set(pq.read_table(path, columns=["user_id"])["user_id"].to_pylist())
    assert seen == {U1, U2}
    assert summary.excluded_no_consent == 6 and summary.rows_out == {"train": 2, "valid": 2, "test": 2}


def test_rejected_rows_go_to_the_dead_letter_and_the_rest_of_the_day_is_processed(tmp_path: Path) -> None:
    impressions = [
        impression(1, START + MINUTE, U1, X),
        impression(2, START + 2 * MINUTE, U1, Y, position=-3),  # invalid
        impression(3, START + 3 * MINUTE, U1, Z),
    ]
    actions = [action(1, X, START + MINUTE + 5, watch_ms=-1, like=True), action(3, Z, START + 3 * MINUTE + 5, 100, True)]
    write_world(tmp_path / "logs", [user(U1)], [item(X), item(Y), item(Z)], impressions, actions)
    summary = preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", now_ms=NOW)
    assert summary.rejected == {"impressions": 1, "actions": 1, "users": 0, "items": 0}
    dead = read_dead_letter(tmp_path / "out").to_pylist()
    assert sorted(r["reason"] for r in dead) == ["negative position: -3", "negative watch_ms: -1"]
    assert json.loads(next(r["row"] for r in dead if r["log"] == "impressions"))["request_id"] == 2
    rows = rows_by_request(tmp_path / "out")
    assert sorted(rows) == [1, 3]
    assert rows[1]["like"] == 0.0 and rows[3]["like"] == 1.0  # 1's action was rejected: no engagement


def test_sparse_ids_match_the_shared_hashing(tmp_path: Path) -> None:
    users = [user(U1, region="br", device="android", language="pt")]
    items = [item(X, tags=("cats", "fail"), language="pt"), item(Y, tags=())]
    write_world(tmp_path / "logs", users, items, [impression(1, START + 13 * 60 * MINUTE, U1, X), impression(2, START + 14 * 60 * MINUTE, U1, Y)], [])
    rows = rows_by_request(run(tmp_path))
    row = rows[1]
    assert row["sparse_user_id"] == hash_id(U1, "user_id") and row["sparse_item_id"] == hash_id(X, "item_id")
    assert row["sparse_author_id"] == hash_id(X % 7 + 100, "author_id") and row["sparse_hour"] == hash_id(13, "hour")
    assert row["sparse_user_region"] == hash_string("br", "user_region") and row["sparse_device"] == hash_string("android", "device")
    assert row["sparse_user_language"] == hash_string("pt", "user_language")
    assert row["sparse_item_language"] == hash_string("pt", "item_language")
    assert row["sparse_hashtags"] == [hash_string("cats", "hashtags"), hash_string("fail", "hashtags")]
    assert rows[2]["sparse_hashtags"] == []


def test_engine_auto_picks_cpu_without_a_gpu() -> None:
    choice = resolve_engine("auto")
    assert choice.name == "cpu" and choice.reason.startswith("auto:")


def test_engine_gpu_without_cudf_polars_fails_with_install_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_world(tmp_path / "logs", [user(U1)], [item(X)], [impression(1, START, U1, X)], [])
    code = main(["preprocess", "--input", str(tmp_path / "logs"), "--out", str(tmp_path / "out"), "--engine", "gpu"])
    assert code == 2
    assert "pip install cudf-polars-cu13" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_json_prints_one_object_and_writes_the_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    impressions = [impression(d, START + d * MS_PER_DAY + MINUTE, U1, X) for d in range(4)]
    write_world(tmp_path / "logs", [user(U1)], [item(X)], impressions, [])
    code = main(["preprocess", "--input", str(tmp_path / "logs"), "--out", str(tmp_path / "out"), "--engine", "cpu", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"engine", "rows_in", "rows_out", "rejected", "excluded_no_consent", "seconds", "out"}
    assert summary["engine"] == "cpu" and summary["rows_out"] == {"train": 2, "valid": 1, "test": 1}
    assert (tmp_path / "out" / "test" / "day=2026-03-05" / "part-00000.parquet").exists()


def test_manifest_round_trip_and_typed_accessors(tmp_path: Path) -> None:
    impressions = [impression(d, START + d * MS_PER_DAY + MINUTE, U1, X) for d in range(3)]
    write_world(tmp_path / "logs", [user(U1)], [item(X)], impressions, [])
    manifest = load_manifest(run(tmp_path))
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert [f.column for f in manifest.dense_features] == manifest.dense_order
    assert all(f.cardinality_estimate for f in manifest.sparse_features)
    assert next(f for f in manifest.sparse_features if f.name == "hashtags").multi_valued
    assert manifest.label_names == ["like", "finish"]
    files = manifest.split_files("train", tmp_path / "out")
    assert files == [tmp_path / "out" / "train" / f"day={DAY0}" / "part-00000.parquet"]
    schema = pq.read_schema(files[0])
    assert [*manifest.meta_columns, *manifest.label_names, *(f.column for f in manifest.features)] == schema.names


def test_shard_manifests_merge_only_when_all_are_there(tmp_path: Path) -> None:
    impressions = [impression(d, START + d * MS_PER_DAY + MINUTE, U1, X) for d in range(4)]
    write_world(tmp_path / "logs", [user(U1)], [item(X)], impressions, [])
    preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", shard=Shard(1, 2), now_ms=NOW)
    with pytest.raises(FileNotFoundError, match=r"manifest\.shard-0-of-2\.json"):
        load_manifest(tmp_path / "out")
    preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", shard=Shard(0, 2), now_ms=NOW)
    merged = load_manifest(tmp_path / "out")
    assert merged.shard is None and merged.counts["rows_in"] == 4
    assert {k: v.days for k, v in merged.splits.items()} == {"train": [DAY0, "2026-03-03"], "valid": ["2026-03-04"], "test": ["2026-03-05"]}


def test_split_days_and_shard_parsing() -> None:
    days = [f"2026-01-{d:02d}" for d in range(1, 11)]
    assert {k: len(v) for k, v in split_days(days, 0.1, 0.1).items()} == {"train": 8, "valid": 1, "test": 1}
    assert {k: len(v) for k, v in split_days(days[:3], 0.1, 0.1).items()} == {"train": 1, "valid": 1, "test": 1}
    assert {k: len(v) for k, v in split_days(days[:2], 0.1, 0.1).items()} == {"train": 2, "valid": 0, "test": 0}
    assert Shard.parse("2/3") == Shard(2, 3) and Shard(2, 3).block(days) == days[6:]
    with pytest.raises(ValueError, match="i/N"):
        Shard.parse("3")


def test_duplicate_action_rows_the_last_one_wins(tmp_path: Path) -> None:
    impressions = [impression(1, START + MINUTE, U1, X), impression(2, START + 2 * MINUTE, U1, Y)]
    actions = [
        action(1, X, START + MINUTE + 5, watch_ms=100, like=False),
        action(2, Y, START + 2 * MINUTE + 5, watch_ms=100, like=False),
        action(1, X, START + MINUTE + 9, watch_ms=100, like=True),  # redelivered with the like
    ]
    write_world(tmp_path / "logs", [user(U1)], [item(X), item(Y)], impressions, actions)
    frame = read_outputs(run(tmp_path))
    assert frame["request_id"].to_list() == [1, 2] and frame["like"].to_list() == [1.0, 0.0]


def test_a_late_like_on_a_day_without_impressions_still_counts(tmp_path: Path) -> None:
    """Impressions on day 0 and day 2 only; day 0's last impression is liked just after midnight,
    on day 1: the like must be in day 2's counters (it happened before day 2 started)."""
    day1 = START + MS_PER_DAY
    impressions = [impression(1, day1 - 5 * SECOND, U1, X), impression(2, day1 + MS_PER_DAY + MINUTE, U1, Y)]
    actions = [action(1, X, day1 + 5 * SECOND, watch_ms=100, like=True)]
    write_world(tmp_path / "logs", [user(U1)], [item(X), item(Y)], impressions, actions)
    rows = rows_by_request(run(tmp_path))
    assert rows[1]["like"] == 1.0
    assert rows[2]["dense_user_like_rate"] == pytest.approx(like_rate(1, 1))
