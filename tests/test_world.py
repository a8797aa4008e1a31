"""The synthetic world: determinism, calibration, dynamics, and the logs it writes."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from gpurec.cli import main
from gpurec.data import logs
from gpurec.data.generate import generate_synthetic, load_world_config
from gpurec.data.schema import LOGS
from gpurec.data.simulator import simulate_day
from gpurec.data.world import World, WorldConfig

CALIBRATION_WORLD = WorldConfig(users=2000, items=5000, days=4, seed=11)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    report = generate_synthetic(CALIBRATION_WORLD, out)
    return out, report


def test_default_world_lands_in_every_calibrated_range(generated):
    _, report = generated
    off = {k: s for k, s in report["stats"].items() if s["calibrated"] and not s["in_range"]}
    assert not off, f"outside the published ranges: {off}"


def test_logs_follow_the_schema_and_keys_are_unique(generated):
    out, _ = generated
    for log in ("impressions", "actions", "items", "users", "oracle"):
        for f in logs.day_files(out, log):
            assert pq.read_schema(f).remove_metadata().equals(LOGS[log].schema), f
    imps = logs.scan(out, "impressions").collect()
    acts = logs.scan(out, "actions").collect()
    assert imps.select(pl.struct("request_id", "item_id").is_unique().all()).item()
    assert len(acts) == len(imps)
    joined = imps.join(acts, on=["request_id", "item_id"], how="inner", suffix="_action")
    assert len(joined) == len(imps)
    assert (joined["ts_action"] >= joined["ts"]).all()
    assert joined["position"].is_between(0, CALIBRATION_WORLD.page_size - 1).all()


def test_items_are_never_shown_before_upload_and_ids_are_64_bit(generated):
    out, _ = generated
    imps = logs.scan(out, "impressions").collect()
    items = logs.scan(out, "items").collect()
    joined = imps.join(items, on="item_id", how="left")
    assert joined["upload_ts"].null_count() == 0
    assert (joined["upload_ts"] <= joined["ts"]).all()
    assert imps["user_id"].max() > 2**40  # production-like sparse ids, not 0..n-1


def test_same_seed_gives_identical_files(tmp_path):
    config = WorldConfig(users=300, items=600, days=2, seed=5)
    a, b = tmp_path / "a", tmp_path / "b"
    generate_synthetic(config, a)
    generate_synthetic(config, b)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.parquet"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = tmp_path / "c"
    generate_synthetic(WorldConfig(users=300, items=600, days=2, seed=6), other)
    assert logs.read(other, "impressions") != logs.read(a, "impressions")
    assert load_world_config(a) == config


def test_oracle_probabilities_are_calibrated(generated):
    """The oracle is the truth: binned mean p_like matches the observed like rate."""
    out, _ = generated
    df = (
        logs.scan(out, "oracle")
        .join(logs.scan(out, "actions"), on=["request_id", "item_id"])
        .select("p_like", "like")
        .collect()
    )
    df = df.with_columns(bin=(pl.col("p_like").rank("ordinal") * 5 // (pl.len() + 1)))
    by_bin = df.group_by("bin").agg(p=pl.col("p_like").mean(), rate=pl.col("like").mean(), n=pl.len())
    for row in by_bin.iter_rows(named=True):
        se = np.sqrt(row["p"] * (1 - row["p"]) / row["n"])
        assert abs(row["rate"] - row["p"]) < 4 * se + 1e-3, row


def test_interests_drift_and_replay_in_any_order():
    world = World(WorldConfig(users=200, items=400, days=5, seed=1))
    day0, day3 = world.interests(0).copy(), world.interests(3).copy()
    assert np.abs(day3 - day0).mean() > 0.005
    assert np.allclose(world.interests(0), day0)  # going back replays the same walk
    assert np.allclose(world.interests(3), day3)


def test_respond_is_driven_by_affinity_and_position():
    """Request-by-request use: the same user reacts better to their favourite topic, early in a session."""
    world = World(WorldConfig(users=50, items=3000, days=1, seed=2))
    rng = np.random.default_rng(0)
    user = 7
    fav = int(np.argmax(world.interests(0)[user]))
    worst = int(np.argmin(world.interests(0)[user]))
    fav_items = np.flatnonzero(world.item_topic == fav)
    worst_items = np.flatnonzero(world.item_topic == worst)
    n = 4000
    users = np.full(n, user)
    liked_fav = world.respond(users, rng.choice(fav_items, n), 0, np.zeros(n), rng)
    liked_worst = world.respond(users, rng.choice(worst_items, n), 0, np.zeros(n), rng)
    assert liked_fav.p_like.mean() > 1.5 * liked_worst.p_like.mean()
    assert liked_fav.watch_ms.mean() > liked_worst.watch_ms.mean()
    deep = world.respond(users, rng.choice(fav_items, n), 0, np.full(n, 60), rng)
    assert deep.p_like.mean() < liked_fav.p_like.mean()


def test_users_without_personalisation_consent_get_unpersonalised_feeds():
    world = World(WorldConfig(users=3000, items=3000, days=1, seed=3))
    day = simulate_day(world, 0, 1)
    fav = np.argmax(world.interests(0), axis=1)
    on_fav = world.item_topic[day.item_index] == fav[day.user_index]
    opted_out = ~world.consent_personalisation[day.user_index]
    assert opted_out.sum() > 1000
    # Personalised users see their favourite topic far more often than chance; opted-out ones don't.
    assert on_fav[~opted_out].mean() > 3 * on_fav[opted_out].mean()
    assert on_fav[opted_out].mean() < 3 / world.config.topics


def test_generate_cli_json_and_refuses_to_append(tmp_path, capsys):
    out = tmp_path / "raw"
    args = ["generate", "--out", str(out), "--users", "200", "--items", "400", "--days", "2", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["impressions"] == logs.read(out, "impressions").num_rows > 0
    assert set(report["stats"]) >= {"like_rate", "valid_play_rate", "top20_item_exposure_share"}
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["impressions"] == report["impressions"]
