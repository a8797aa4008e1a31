"""Bad input gets a clear reason and loses nothing: every row ends valid or in the dead letter."""

from __future__ import annotations

import datetime as dt
import json
import math
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpurec.data.schema import ACTIONS, IMPRESSIONS, LOGS, TIMESTAMP
from gpurec.data.validate import (
    DEAD_LETTER_SCHEMA,
    MAX_WATCH_MS,
    read_dead_letter,
    validate,
    validate_rows,
    write_dead_letter,
)

NOW = 1_717_200_000_000  # 2024-06-01T00:00:00Z
HOUR = 3_600_000

GOOD = {
    "impressions": {
        "request_id": 7,
        "ts": NOW - HOUR,
        "user_id": 11,
        "item_id": 22,
        "position": 3,
        "surface": "feed",
        "model_version": "v1",
    },
    "items": {
        "item_id": 22,
        "author_id": 5,
        "duration_ms": 15_000,
        "upload_ts": NOW - 24 * HOUR,
        "hashtags": ["cats", "fail"],
        "language": "en",
        "region": "GB",
    },
    "users": {
        "user_id": 11,
        "region": "GB",
        "device": "ios",
        "language": "en",
        "signup_ts": NOW - 99 * HOUR,
        "consent_personalisation": True,
        "consent_training": False,
    },
    "actions": {
        "request_id": 7,
        "item_id": 22,
        "ts": NOW - HOUR + 500,
        "watch_ms": 12_000,
        "like": True,
        "share": False,
        "comment": False,
        "follow": False,
        "skip": False,
    },
}


def good_rows(log: str, n: int = 3) -> list[dict]:
    """`n` valid rows of `log`, distinct in every integer column so a mix-up would show."""
    rows = []
    for i in range(n):
        row = dict(GOOD[log])
        for field in LOGS[log].schema:
            if pa.types.is_integer(field.type):
                row[field.name] += i
        rows.append(row)
    return rows


def typed(rows: list[dict], log: str) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=LOGS[log].schema)


def validate_both(rows: list[dict], log: str):
    """Run the dict path, and the table path too when Arrow can build a table from the rows."""
    results = [validate_rows(rows, log, now_ms=NOW)]
    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return results
    return [*results, validate(table, log, now_ms=NOW)]


FUTURE = NOW + 10 * 60_000
FUTURE_ISO = "2024-06-01T00:10:00.000+00:00"

BAD_CASES = [
    ("impressions", "user_id", "abc", "wrong type for 'user_id': expected int64, got 'abc'"),
    ("impressions", "user_id", 1.5, "wrong type for 'user_id': expected int64, got 1.5"),
    ("impressions", "user_id", True, "wrong type for 'user_id': expected int64, got True"),
    ("impressions", "item_id", None, "missing value for 'item_id'"),
    ("impressions", "position", -1, "negative position: -1"),
    ("impressions", "position", 2**31, "out of int32 range for 'position': 2147483648"),
    ("impressions", "surface", 3, "wrong type for 'surface': expected string, got 3"),
    ("actions", "watch_ms", float("nan"), "NaN in 'watch_ms'"),
    ("actions", "watch_ms", float("inf"), "inf in 'watch_ms'"),
    ("actions", "watch_ms", -5, "negative watch_ms: -5"),
    ("actions", "watch_ms", 99_999_999, f"watch_ms 99999999 beyond bound {MAX_WATCH_MS}"),
    ("actions", "like", 2, "wrong type for 'like': expected bool, got 2"),
    ("actions", "share", "true", "wrong type for 'share': expected bool, got 'true'"),
    ("actions", "comment", 1.0, "wrong type for 'comment': expected bool, got 1.0"),
    ("items", "duration_ms", -5, "negative duration_ms: -5"),
    (
        "items",
        "hashtags",
        "cats,fail",
        "wrong type for 'hashtags': expected list<item: string>, got 'cats,fail'",
    ),
    ("users", "consent_training", None, "missing value for 'consent_training'"),
    (
        "users",
        "signup_ts",
        "yesterday",
        "wrong type for 'signup_ts': expected timestamp[ms, tz=UTC], got 'yesterday'",
    ),
] + [
    (log, col, FUTURE, f"{col} in the future: {FUTURE_ISO} > now + 5 min (now 2024-06-01T00:00:00.000+00:00)")
    for log, col in [("impressions", "ts"), ("actions", "ts"), ("items", "upload_ts"), ("users", "signup_ts")]
]


@pytest.mark.parametrize(("log", "column", "value", "reason"), BAD_CASES)
def test_bad_row_is_rejected_with_its_reason_and_good_rows_kept(log, column, value, reason):
    rows = good_rows(log, 4)
    bad = dict(rows.pop(2), **{column: value})
    batch = [*rows[:2], bad, *rows[2:]]
    for result in validate_both(batch, log):
        assert result.rejected.column("reason").to_pylist() == [reason]
        assert result.rejected.column("log").to_pylist() == [log]
        assert result.valid.equals(typed(rows, log))


def test_timestamp_exactly_at_the_tolerance_is_accepted():
    row = dict(GOOD["actions"], ts=NOW + 300_000)
    assert validate_rows([row], "actions", now_ms=NOW).num_valid == 1
    assert validate_rows([row], "actions", now_ms=NOW, future_tolerance_ms=0).num_rejected == 1


def test_every_problem_of_a_row_is_named_in_schema_order():
    row = dict(GOOD["impressions"], request_id="x", ts=FUTURE, user_id=None, position=-2)
    del row["surface"]
    result = validate_rows([row, GOOD["impressions"]], "impressions", now_ms=NOW)
    assert result.rejected.column("reason").to_pylist() == [
        "wrong type for 'request_id': expected int64, got 'x'; "
        f"ts in the future: {FUTURE_ISO} > now + 5 min (now 2024-06-01T00:00:00.000+00:00); "
        "missing value for 'user_id'; negative position: -2; missing value for 'surface'"
    ]
    assert result.valid.equals(typed([GOOD["impressions"]], "impressions"))


def test_missing_column_rejects_every_row():
    table = typed(good_rows("impressions"), "impressions").drop_columns(["user_id"])
    result = validate(table, "impressions", now_ms=NOW)
    assert result.num_valid == 0
    assert result.valid.schema.equals(IMPRESSIONS)
    assert result.rejected.column("reason").to_pylist() == ["missing column 'user_id'"] * 3


def test_valid_batch_passes_through_equal_for_every_log():
    for log in GOOD:
        table = typed(good_rows(log, 5), log)
        result = validate(table, log, now_ms=NOW)
        assert result.valid.equals(table)
        assert result.num_rejected == 0
        assert result.rejected.schema.equals(DEAD_LETTER_SCHEMA)
    empty = validate(IMPRESSIONS.empty_table(), "impressions")
    assert (empty.num_valid, empty.num_rejected) == (0, 0)


def test_loose_column_types_are_coerced_without_changing_values():
    rows = good_rows("actions", 3)
    expected = typed(rows, "actions")
    ts_ms = [r["ts"] for r in rows]
    loose = pa.table(
        {
            "request_id": pa.array([str(r["request_id"]) for r in rows]),  # CSV-ish numeric strings
            "item_id": pa.array([float(r["item_id"]) for r in rows]),
            "ts": pa.array([t * 1000 for t in ts_ms], pa.timestamp("us")),  # naive means UTC
            "watch_ms": pa.array([r["watch_ms"] for r in rows], pa.int64()),
            "like": pa.array([int(r["like"]) for r in rows], pa.int8()),
            "share": pa.array([r["share"] for r in rows]),
            "comment": pa.array([0, 0, 0]),
            "follow": pa.array([0.0, 0.0, 0.0]).cast(pa.int16()),
            "skip": pa.array([False] * 3),
            "extra": pa.array(["ignored"] * 3),
        }
    )
    assert validate(loose, "actions", now_ms=NOW).valid.equals(expected)
    as_int_ms = loose.set_column(2, "ts", pa.array(ts_ms, pa.int64()))
    assert validate(as_int_ms, "actions", now_ms=NOW).valid.equals(expected)
    iso = [dt.datetime.fromtimestamp(t / 1000, dt.UTC).isoformat() for t in ts_ms]
    as_iso = loose.set_column(2, "ts", pa.array(iso))
    assert validate(as_iso, "actions", now_ms=NOW).valid.equals(expected)
    paris = (
        pa.array(ts_ms, pa.int64()).cast(pa.timestamp("ms", "UTC")).cast(pa.timestamp("ns", "Europe/Paris"))
    )
    assert validate(loose.set_column(2, "ts", paris), "actions", now_ms=NOW).valid.equals(expected)

    items = good_rows("items", 2)
    dictionary = pa.table(
        {
            **{f.name: pa.array([r[f.name] for r in items], f.type) for f in LOGS["items"].schema},
            "hashtags": pa.array([r["hashtags"] for r in items], pa.large_list(pa.large_string())),
            "region": pa.array([r["region"] for r in items]).dictionary_encode(),
        }
    )
    assert validate(dictionary, "items", now_ms=NOW).valid.equals(typed(items, "items"))


def test_list_of_dicts_with_mixed_types():
    base = good_rows("impressions", 8)
    ids = [1, "2", "abc", 3.0, True, None, np.int64(4), "0x1F"]
    rows = [dict(r, user_id=v) for r, v in zip(base, ids, strict=True)]
    rows.insert(3, "not a dict")
    rows[0]["ts"] = dt.datetime(2024, 5, 31, 12, 0, tzinfo=dt.UTC)  # datetimes among ints
    result = validate_rows(rows, "impressions", now_ms=NOW)
    assert result.valid.column("user_id").to_pylist() == [1, 2, 3, 4]
    assert result.valid.column("ts")[0].as_py() == rows[0]["ts"]
    assert result.rejected.column("reason").to_pylist() == [
        "wrong type for 'user_id': expected int64, got 'abc'",
        "not a record: expected dict, got str",
        "wrong type for 'user_id': expected int64, got True",
        "missing value for 'user_id'",
        "wrong type for 'user_id': expected int64, got '0x1F'",
    ]
    assert result.num_valid + result.num_rejected == len(rows)


def test_dead_letter_round_trip_keeps_original_values(tmp_path):
    when = dt.datetime(2024, 5, 31, 8, 30, 15, 123456, tzinfo=dt.UTC)
    rows = [
        dict(GOOD["actions"], watch_ms=float("nan"), source={"app": "ios", "build": 42}),
        dict(GOOD["actions"], request_id="abc", ts=when),
        dict(GOOD["actions"]),
    ]
    first = validate_rows(rows, "actions", now_ms=NOW)
    table = pa.table({"item_id": [1, 2], "upload_ts": [NOW, NOW], "duration_ms": [-1.5, -3.0]})
    second = validate(table, "items", now_ms=NOW)
    assert write_dead_letter(first.rejected, tmp_path, "actions").name == "part-00000.parquet"
    assert write_dead_letter(first.rejected, tmp_path, "actions").name == "part-00001.parquet"
    assert write_dead_letter(second.rejected, tmp_path, "items") is not None
    assert (
        write_dead_letter(validate_rows(rows[2:], "actions", now_ms=NOW).rejected, tmp_path, "actions")
        is None
    )

    back = read_dead_letter(tmp_path, "actions")
    assert back.schema.equals(DEAD_LETTER_SCHEMA)
    assert back.num_rows == 4
    parsed = [json.loads(r) for r in back.column("row").to_pylist()]
    assert parsed[0] == dict(GOOD["actions"], watch_ms="NaN", source={"app": "ios", "build": 42})
    assert parsed[1] == dict(GOOD["actions"], request_id="abc", ts=str(when))
    assert parsed[2:] == parsed[:2]
    items_back = [json.loads(r) for r in read_dead_letter(tmp_path, "items").column("row").to_pylist()]
    assert items_back[0]["duration_ms"] == -1.5
    assert items_back[0]["upload_ts"] == NOW
    assert read_dead_letter(tmp_path).num_rows == 4 + 2
    assert read_dead_letter(tmp_path / "nowhere", "users").equals(DEAD_LETTER_SCHEMA.empty_table())


def test_unknown_log_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown log 'clicks'"):
        validate_rows([], "clicks")


def test_timestamps_python_cannot_hold_are_rejected_not_crashing():
    rows = good_rows("impressions", 3)
    table = typed(rows, "impressions")
    far = pa.array([rows[0]["ts"], 10**17, -(2**62)], pa.int64()).cast(TIMESTAMP)  # year 25115 and beyond
    result = validate(table.set_column(1, "ts", far), "impressions", now_ms=NOW)
    # -2**62 ms is far in the past, which no rule forbids
    assert result.valid.column("ts").cast(pa.int64()).to_pylist() == [rows[0]["ts"], -(2**62)]
    assert result.valid.column("user_id").to_pylist() == [rows[0]["user_id"], rows[2]["user_id"]]
    assert result.rejected.column("reason").to_pylist() == [
        "ts in the future: 100000000000000000 ms after epoch > now + 5 min (now 2024-06-01T00:00:00.000+00:00)"
    ]
    assert json.loads(result.rejected.column("row")[0].as_py())["ts"] == "100000000000000000 ms after epoch"


def test_iso_strings_with_z_or_no_zone_mean_utc():
    ts = ["2024-05-31T00:00:00Z", "2024-05-31 00:00:00", "2024-05-31T02:00:00+02:00"]
    result = validate_rows([dict(GOOD["actions"], ts=t) for t in ts], "actions", now_ms=NOW)
    expected = dt.datetime(2024, 5, 31, tzinfo=dt.UTC)
    assert result.valid.column("ts").to_pylist() == [expected] * 3


def test_duplicate_column_rejects_the_batch_and_keeps_both_copies():
    table = typed(good_rows("users", 2), "users")
    twice = table.append_column("region", pa.array(["FR", "DE"]))
    result = validate(twice, "users", now_ms=NOW)
    assert result.rejected.column("reason").to_pylist() == ["ambiguous column 'region' (2 copies)"] * 2
    first = json.loads(result.rejected.column("row")[0].as_py())
    assert (first["region"], first["region#7"]) == ("GB", "FR")


def _million_impressions() -> pa.Table:
    n = 1_000_000
    rng = np.random.default_rng(0)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.array(NOW - rng.integers(0, 86_400_000, n)).cast(TIMESTAMP),
            pa.array(rng.integers(0, 10**9, n)),
            pa.array(rng.integers(0, 10**9, n)),
            pa.array(rng.integers(0, 50, n).astype(np.int32)),
            pa.array(np.full(n, "feed", dtype=object)),
            pa.array(np.full(n, "v1", dtype=object)),
        ],
        schema=IMPRESSIONS,
    )


def test_million_valid_rows_and_float_column_with_nans_stay_vectorised():
    table = _million_impressions()
    start = time.perf_counter()
    result = validate(table, "impressions", now_ms=NOW)
    assert time.perf_counter() - start < 1.0
    assert result.valid.equals(table)

    position = table.column("position").to_numpy().astype(np.float64)
    position[[10, 500_000]] = [np.nan, 2.5]
    loose = table.set_column(4, "position", pa.array(position))
    start = time.perf_counter()
    result = validate(loose, "impressions", now_ms=NOW)
    assert time.perf_counter() - start < 1.0
    assert result.rejected.column("reason").to_pylist() == [
        "NaN in 'position'",
        "wrong type for 'position': expected int32, got 2.5",
    ]
    assert result.num_valid == table.num_rows - 2


# Property: random batches with random corruptions. Each corruption makes its row invalid, whatever
# the other values are; clean rows stay valid and come through unchanged and in order.
CORRUPTIONS = [
    ("request_id", 1.5),
    ("item_id", None),
    ("ts", NOW + HOUR),
    ("watch_ms", float("nan")),
    ("watch_ms", float("-inf")),
    ("watch_ms", -1),
    ("watch_ms", MAX_WATCH_MS + 1),
    ("watch_ms", 2**40),
    ("skip", None),
]
DELETE = object()
TYPE_CORRUPTIONS = [("request_id", "abc"), ("ts", "soon"), ("like", 2), ("share", "yes"), ("follow", DELETE)]


def clean_actions(id_bits: int) -> st.SearchStrategy[dict]:
    """Valid actions rows; a table built from rows mixing ints with 1.5 needs ids exact in a double."""
    return st.fixed_dictionaries(
        {
            "request_id": st.integers(-(2**id_bits), 2**id_bits - 1),
            "item_id": st.integers(0, 2**id_bits - 1),
            "ts": st.integers(NOW - 400 * 24 * HOUR, NOW + 300_000),
            "watch_ms": st.integers(0, MAX_WATCH_MS),
            **{name: st.booleans() for name in ("like", "share", "comment", "follow", "skip")},
        }
    )


def _check_property(batch, path):
    rows, expected_bad = [], []
    for i, (row, corruption) in enumerate(batch):
        row = dict(row, row_no=i)
        if corruption is not None:
            column, value = corruption
            if value is DELETE:
                del row[column]
            else:
                row[column] = value
            expected_bad.append(i)
        rows.append(row)
    result = (
        validate_rows(rows, "actions", now_ms=NOW)
        if path == "rows"
        else validate(pa.Table.from_pylist(rows), "actions", now_ms=NOW)
    )
    assert result.num_valid + result.num_rejected == len(rows)
    assert [json.loads(r)["row_no"] for r in result.rejected.column("row").to_pylist()] == expected_bad
    clean = [{k: v for k, v in row.items() if k != "row_no"} for row, c in batch if c is None]
    assert result.valid.equals(pa.Table.from_pylist(clean, schema=ACTIONS))
    assert all(math.isfinite(w) for w in result.valid.column("watch_ms").to_pylist())


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(clean_actions(63), st.none() | st.sampled_from(CORRUPTIONS + TYPE_CORRUPTIONS)), max_size=25
    )
)
def test_property_rows_every_corrupted_row_rejected_no_clean_row(batch):
    _check_property(batch, "rows")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(clean_actions(53), st.none() | st.sampled_from(CORRUPTIONS)), min_size=1, max_size=25)
)
def test_property_table_every_corrupted_row_rejected_no_clean_row(batch):
    _check_property(batch, "table")
