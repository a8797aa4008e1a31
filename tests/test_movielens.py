"""MovieLens-100K conversion, checked against the copy inside the installed recbole wheel.

The source is read here with the csv module, independently of the converter's Polars reader, so
a parsing mistake in the converter cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from gpurec.data import movielens
from gpurec.data.logs import day_files, read
from gpurec.data.schema import LOGS

LOGS_WRITTEN = ("impressions", "actions", "items", "users")


def _source_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None:
        pytest.skip("recbole (the `data` extra) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"


@pytest.fixture(scope="module")
def source() -> list[tuple[int, int, float, int]]:
    """(user_id, item_id, rating, unix_seconds) for every line of ml-100k.inter."""
    with open(_source_dir() / "ml-100k.inter", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        assert header == ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
        return [(int(u), int(i), float(r), int(float(t))) for u, i, r, t in rows]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ml100k")
    return out, movielens.convert_movielens_100k(out)


@pytest.fixture(scope="module")
def tables(converted: tuple[Path, dict]) -> dict[str, pl.DataFrame]:
    out, _ = converted
    return {log: pl.from_arrow(read(out, log)) for log in LOGS_WRITTEN}


def test_counts(converted, tables, source) -> None:
    _, summary = converted
    assert len(source) == 100_000
    assert tables["impressions"].height == tables["actions"].height == 100_000
    assert tables["users"].height == 943 and tables["items"].height == 1_682
    assert (summary["ratings"], summary["impressions"], summary["actions"]) == (100_000, 100_000, 100_000)
    assert (summary["users"], summary["items"]) == (943, 1_682)
    assert not (converted[0] / "oracle").exists()


def test_files_match_schema(converted) -> None:
    out, _ = converted
    for log in LOGS_WRITTEN:
        files = day_files(out, log)
        assert files
        for f in files:
            assert pq.read_schema(f).remove_metadata().equals(LOGS[log].schema), (log, f)


def test_keys_unique_and_actions_join_one_impression(tables) -> None:
    impressions, actions = tables["impressions"], tables["actions"]
    key = ["request_id", "item_id"]
    assert impressions.select(pl.struct(key).is_unique().all()).item()
    assert actions.select(pl.struct(key).is_unique().all()).item()
    joined = actions.join(impressions, on=key, how="inner", suffix="_imp")
    assert joined.height == actions.height
    assert (joined["ts"] > joined["ts_imp"]).all()
    assert (joined["ts"].dt.truncate("1d") == joined["ts_imp"].dt.truncate("1d")).all()
    assert tables["users"]["user_id"].is_unique().all() and tables["items"]["item_id"].is_unique().all()
    assert impressions["user_id"].is_in(tables["users"]["user_id"].implode()).all()
    assert impressions["item_id"].is_in(tables["items"]["item_id"].implode()).all()


def test_positions_are_dense_per_request(tables) -> None:
    per_request = (
        tables["impressions"]
        .group_by("request_id")
        .agg(
            n=pl.len(),
            max_pos=pl.col("position").max(),
            users=pl.col("user_id").n_unique(),
            seconds=pl.col("ts").n_unique(),
        )
    )
    assert (per_request["max_pos"] == per_request["n"] - 1).all()
    assert (per_request["users"] == 1).all() and (per_request["seconds"] == 1).all()


def test_every_rating_is_recoverable(tables, source) -> None:
    """(user, item, rating, second) of each source line comes back from impression + action."""
    joined = tables["actions"].join(tables["impressions"], on=["request_id", "item_id"], suffix="_imp")
    back = joined.select(
        "user_id",
        "item_id",
        rating=(pl.col("watch_ms") * 5 / movielens.DURATION_MS).round(6),
        ts_s=pl.col("ts_imp").dt.epoch("s"),
    )
    assert sorted(back.iter_rows()) == sorted(source)


def test_labels_follow_ratings(converted, tables, source) -> None:
    _, summary = converted
    actions = tables["actions"]
    likes = sum(r >= 4 for _, _, r, _ in source)
    fives = sum(r >= 5 for _, _, r, _ in source)
    low = sum(r <= 2 for _, _, r, _ in source)
    assert actions["like"].sum() == likes
    assert (actions["watch_ms"] >= 0.9 * movielens.DURATION_MS).sum() == fives
    assert actions["skip"].sum() == low
    assert not (actions["share"].any() or actions["comment"].any() or actions["follow"].any())
    assert summary["like_rate"] == round(likes / len(source), 4)
    assert summary["finish_rate"] == round(fives / len(source), 4)


def test_time_range_matches_source(converted, tables, source) -> None:
    _, summary = converted
    seconds = [t for *_, t in source]
    ts = tables["impressions"]["ts"].dt.epoch("s")
    assert (ts.min(), ts.max()) == (min(seconds), max(seconds))
    assert summary["first_ts"].startswith("1997-09-20") and summary["last_ts"].startswith("1998-04-22")
    days = {t // 86_400 for t in seconds}
    assert summary["days"] == len(days)


def test_items_and_users_precede_their_events(tables) -> None:
    impressions = tables["impressions"]
    first_item = impressions.group_by("item_id").agg(first=pl.col("ts").min())
    items = tables["items"].join(first_item, on="item_id")
    assert (items["upload_ts"] <= items["first"]).all()
    first_user = impressions.group_by("user_id").agg(first=pl.col("ts").min())
    users = tables["users"].join(first_user, on="user_id")
    assert (users["signup_ts"] == users["first"]).all()
    assert users["consent_personalisation"].all() and users["consent_training"].all()
    assert set(users["region"]) <= {f"us-{d}" for d in range(10)} | {"ca", "unknown"}
    toy_story = tables["items"].filter(pl.col("item_id") == 1).row(0, named=True)
    assert toy_story["hashtags"] == ["Animation", "Children's", "Comedy"]
    assert toy_story["author_id"] == 1995


def test_deterministic_bytes(converted, tmp_path: Path) -> None:
    first, _ = converted
    movielens.convert_movielens_100k(tmp_path)
    for log in LOGS_WRITTEN:
        a, b = day_files(first, log), day_files(tmp_path, log)
        assert [p.relative_to(first) for p in a] == [p.relative_to(tmp_path) for p in b]
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True)), log


def test_refuses_to_append(converted) -> None:
    with pytest.raises(FileExistsError):
        movielens.convert_movielens_100k(converted[0])


def test_missing_source_dir(tmp_path: Path) -> None:
    with pytest.raises(movielens.DatasetNotFound, match="make setup"):
        movielens.convert_movielens_100k(tmp_path / "out", source_dir=tmp_path)
    assert not (tmp_path / "out").exists()


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(movielens.DatasetNotFound) as err:
        movielens.find_movielens_100k()
    assert isinstance(err.value, RuntimeError)
    assert "pip install --no-deps recbole==1.2.1" in str(err.value) and "make setup" in str(err.value)


def test_read_users_keeps_demographics() -> None:
    users = movielens.read_users()
    assert users.height == 943
    assert set(users["gender"]) == {"M", "F"} and users["age"].min() > 0


def test_preprocessed_movielens_keeps_every_label(tmp_path):
    """Every converted row passes validation and reaches the features with its label."""
    from gpurec.preprocess.manifest import load_manifest
    from gpurec.preprocess.run import preprocess

    movielens.convert_movielens_100k(tmp_path / "raw")
    summary = preprocess(tmp_path / "raw", tmp_path / "features", engine="cpu")
    assert sum(summary.rejected.values()) == 0
    manifest = load_manifest(tmp_path / "features")
    assert sum(info.rows for info in manifest.splits.values()) == 100_000
    features = pl.concat(
        [pl.read_parquet(f) for split in manifest.splits for f in manifest.split_files(split, tmp_path / "features")]
    )
    assert features["like"].mean() == pytest.approx(0.5537, abs=1e-4)
