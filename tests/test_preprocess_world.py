"""Preprocessing on small random worlds: counters against brute force, the streaming pipeline against
the all-at-once pandas reference, and shards against a single run.

The worlds are built to hit the awkward cases on purpose: several items per request (equal
timestamps), requests near midnight whose actions land on the next day, sessions crossing midnight
left in the previous day's partition, non-consenting and unknown users, unknown items, items shown
before their upload time, and (optionally) rows that fail validation and duplicated action rows.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from gpurec.data import logs
from gpurec.data.schema import LOGS, MS_PER_DAY, day_of, day_start_ms
from gpurec.data.validate import MAX_WATCH_MS
from gpurec.preprocess.features import PRIOR_FINISH_RATE, PRIOR_LIKE_RATE, PRIOR_WEIGHT
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.reference_pandas import reference_features
from gpurec.preprocess.run import preprocess
from gpurec.preprocess.splits import Shard

DAY0 = "2026-03-02"
START = day_start_ms(DAY0)
NOW = START + 30 * MS_PER_DAY  # validation's "now": every fixture timestamp is in its past
SECOND = 1000


def user(uid: int, consent: bool = True, region: str = "us", device: str = "ios", language: str = "en") -> dict:
    return {
        "user_id": uid,
        "region": region,
        "device": device,
        "language": language,
        "signup_ts": START - 40 * MS_PER_DAY,
        "consent_personalisation": consent,
        "consent_training": consent,
    }


def item(iid: int, duration_ms: int = 20_000, upload_ms: int = START - 2 * MS_PER_DAY, tags: tuple[str, ...] = ("cats",), language: str = "en") -> dict:
    return {
        "item_id": iid,
        "author_id": iid % 7 + 100,
        "duration_ms": duration_ms,
        "upload_ts": upload_ms,
        "hashtags": list(tags),
        "language": language,
        "region": "us",
    }


def impression(request_id: int, ts: int, user_id: int, item_id: int, position: int = 0, partition: str | None = None) -> dict:
    row = {"request_id": request_id, "ts": ts, "user_id": user_id, "item_id": item_id, "position": position}
    return {**row, "surface": "for_you", "model_version": "test", "_partition": partition or day_of(ts)}


def action(request_id: int, item_id: int, ts: int, watch_ms: int, like: bool) -> dict:
    flags = dict.fromkeys(("share", "comment", "follow", "skip"), False)
    return {"request_id": request_id, "item_id": item_id, "ts": ts, "watch_ms": watch_ms, "like": like, **flags}


def write_world(root: Path, users: list[dict], items: list[dict], impressions: list[dict], actions: list[dict]) -> Path:
    """Write the four logs like a producer would: dimensions by their own day, impressions by the
    partition each row names (a session crossing midnight stays in its start day), actions by ts."""
    for log, rows in (("users", users), ("items", items), ("actions", actions)):
        logs.write_by_day(pa.Table.from_pylist(rows, schema=LOGS[log].schema), root, log)
    for part in sorted({r["_partition"] for r in impressions}):
        rows = [{k: v for k, v in r.items() if k != "_partition"} for r in impressions if r["_partition"] == part]
        logs.write_day(pa.Table.from_pylist(rows, schema=LOGS["impressions"].schema), root, "impressions", part)
    return root


def random_world(root: Path, seed: int, days: int = 3, requests_per_day: int = 30, bad_rows: bool = False) -> dict:
    """Write a random little world under `root`; return its rows (for brute-force checks)."""
    rng = random.Random(seed)
    user_ids = [rng.randrange(1, 2**62) for _ in range(10)]
    users = [user(u, consent=i not in (1, 2), region=rng.choice("ab"), device=rng.choice("xyz")) for i, u in enumerate(user_ids)]
    item_ids = [rng.randrange(1, 2**62) for _ in range(12)]
    items = [
        item(i, duration_ms=rng.randrange(3_000, 60_000), upload_ms=START + rng.randrange(-3, days) * MS_PER_DAY, tags=tuple(rng.sample("pqrs", rng.randrange(0, 3))))
        for i in item_ids
    ]
    unknown_user, unknown_item = 7, 8  # impressions may reference them; the dimension tables do not
    impressions, actions = [], []
    request_id = 1
    for d in range(days):
        day_start = START + d * MS_PER_DAY
        for _ in range(requests_per_day):
            where = rng.random()
            if where < 0.15:  # just before midnight: actions land on the next day
                ts = day_start + MS_PER_DAY - rng.randrange(1, 60) * SECOND
            elif where < 0.3:  # just after midnight: the session may have started the day before
                ts = day_start + rng.randrange(0, 60) * SECOND
            else:
                ts = day_start + rng.randrange(MS_PER_DAY)
            if impressions and rng.random() < 0.2:  # another request at exactly the same ms
                ts = max(impressions[-1]["ts"], day_start)
            u = rng.choice([*user_ids, *user_ids, unknown_user])
            partition = day_of(ts - 60 * SECOND) if d > 0 and rng.random() < 0.5 else None  # session crossing midnight
            shown = rng.sample([*item_ids, unknown_item], rng.randrange(1, 4))
            for position, it in enumerate(shown):
                impressions.append(impression(request_id, ts, u, it, position, partition))
                if rng.random() < 0.85:
                    delay = rng.randrange(0, 90) * SECOND
                    actions.append(action(request_id, it, ts + delay, rng.randrange(0, 70_000), rng.random() < 0.3))
            request_id += 1
    if bad_rows:
        impressions.append(impression(request_id, START + 5 * SECOND, user_ids[0], item_ids[0], position=-1))
        impressions.append(impression(request_id + 1, START + 2 * MS_PER_DAY + 5, user_ids[0], item_ids[0], partition=DAY0))
        actions.append(action(1, impressions[0]["item_id"], impressions[0]["ts"] + 1, MAX_WATCH_MS + 1, True))
        dup = actions[3]
        actions.append({**dup, "like": not dup["like"], "watch_ms": dup["watch_ms"] + 1})  # same key again: last wins
    write_world(root, users, items, impressions, actions)
    return {"users": users, "items": items, "impressions": impressions, "actions": actions}


def read_outputs(out: Path) -> pl.DataFrame:
    """Every split's rows, in a canonical order."""
    manifest = load_manifest(out)
    files = [f for split in ("train", "valid", "test") for f in manifest.split_files(split, out)]
    return pl.concat([pl.read_parquet(f) for f in files]).sort("ts", "request_id", "item_id", maintain_order=True)


def brute_force_counts(world: dict) -> dict[tuple[int, int], dict[str, float]]:
    """Per kept impression: the six counters, from first principles with Python loops."""
    consenting = {u["user_id"] for u in world["users"] if u["consent_training"]}
    duration = {i["item_id"]: i["duration_ms"] for i in world["items"]}
    kept = [r for r in world["impressions"] if r["user_id"] in consenting and r["item_id"] in duration]
    action_of = {(a["request_id"], a["item_id"]): a for a in world["actions"]}
    events = []  # (user, item, impression ts, event ts, like, finish)
    for r in kept:
        a = action_of.get((r["request_id"], r["item_id"]))
        like = bool(a and a["like"])
        finish = bool(a and a["watch_ms"] * 10 >= duration[r["item_id"]] * 9)
        events.append((r["user_id"], r["item_id"], r["ts"], max(a["ts"], r["ts"]) if a else r["ts"], like, finish))
    expected = {}
    for r in kept:
        c = {}
        for side, k in (("user", 0), ("item", 1)):
            key = r[f"{side}_id"]
            mine = [e for e in events if e[k] == key]
            c[f"{side}_n"] = sum(1 for e in mine if e[2] < r["ts"])
            c[f"{side}_likes"] = sum(1 for e in mine if e[4] and e[3] < r["ts"])
            c[f"{side}_finishes"] = sum(1 for e in mine if e[5] and e[3] < r["ts"])
        expected[(r["request_id"], r["item_id"])] = c
    return expected


def test_counters_equal_brute_force(tmp_path: Path) -> None:
    world = random_world(tmp_path / "logs", seed=3, days=3, requests_per_day=40)
    preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", now_ms=NOW)
    got = read_outputs(tmp_path / "out")
    expected = brute_force_counts(world)
    assert got.height == len(expected) > 100
    for row in got.iter_rows(named=True):
        c = expected[(row["request_id"], row["item_id"])]
        for side in ("user", "item"):
            n = c[f"{side}_n"]
            assert row[f"dense_{side}_impressions"] == pytest.approx(np.log1p(n), rel=1e-6)
            like_rate = (c[f"{side}_likes"] + PRIOR_WEIGHT * PRIOR_LIKE_RATE) / (n + PRIOR_WEIGHT)
            finish_rate = (c[f"{side}_finishes"] + PRIOR_WEIGHT * PRIOR_FINISH_RATE) / (n + PRIOR_WEIGHT)
            assert row[f"dense_{side}_like_rate"] == pytest.approx(like_rate, rel=1e-6)
            assert row[f"dense_{side}_finish_rate"] == pytest.approx(finish_rate, rel=1e-6)


def assert_frames_match_reference(got: pl.DataFrame, ref: pl.DataFrame) -> None:
    assert got.columns == ref.columns and got.height == ref.height
    for column in got.columns:
        a, b = got[column], ref[column].cast(got[column].dtype)
        if a.dtype == pl.Float32:
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, err_msg=column)
        else:
            assert a.equals(b, check_names=False), column


def test_streaming_pipeline_equals_all_at_once_reference(tmp_path: Path) -> None:
    random_world(tmp_path / "logs", seed=11, days=4, requests_per_day=35, bad_rows=True)
    summary = preprocess(tmp_path / "logs", tmp_path / "out", engine="cpu", now_ms=NOW)
    ref = reference_features(tmp_path / "logs", now_ms=NOW)
    assert_frames_match_reference(read_outputs(tmp_path / "out"), pl.from_pandas(ref.features))
    assert summary.excluded_no_consent == ref.excluded_no_consent > 0
    assert load_manifest(tmp_path / "out").counts["excluded_unknown_item"] == ref.excluded_unknown_item > 0
    assert summary.rejected["impressions"] == 2 and summary.rejected["actions"] == 1
    rows_out = sum(summary.rows_out.values())
    assert summary.rows_in == rows_out + 2 + ref.excluded_no_consent + ref.excluded_unknown_item


@pytest.mark.parametrize("count", [2, 3])
def test_shards_together_equal_a_single_run(tmp_path: Path, count: int) -> None:
    random_world(tmp_path / "logs", seed=5, days=5, requests_per_day=25, bad_rows=True)
    single = preprocess(tmp_path / "logs", tmp_path / "single", engine="cpu", now_ms=NOW)
    for index in range(count):
        preprocess(tmp_path / "logs", tmp_path / "sharded", engine="cpu", shard=Shard(index, count), now_ms=NOW)
    assert read_outputs(tmp_path / "sharded").equals(read_outputs(tmp_path / "single"))
    whole, merged = load_manifest(tmp_path / "single"), load_manifest(tmp_path / "sharded")
    assert merged.counts == whole.counts
    assert {k: (v.rows, v.days, v.ts_min, v.ts_max, v.files) for k, v in merged.splits.items()} == {
        k: (v.rows, v.days, v.ts_min, v.ts_max, v.files) for k, v in whole.splits.items()
    }
    assert sum(single.rejected.values()) == 3
