"""Day-partitioned log I/O."""

import pyarrow as pa
import pytest

from gpurec.data import logs
from gpurec.data.schema import IMPRESSIONS, MS_PER_DAY, TIMESTAMP, day_of, day_start_ms


def _impressions(ts_ms: list[int]) -> pa.Table:
    n = len(ts_ms)
    return pa.table(
        {
            "request_id": list(range(n)),
            "ts": pa.array(ts_ms, pa.int64()).cast(TIMESTAMP),
            "user_id": [1] * n,
            "item_id": list(range(100, 100 + n)),
            "position": pa.array([0] * n, pa.int32()),
            "surface": ["for_you"] * n,
            "model_version": ["v0"] * n,
        },
        schema=IMPRESSIONS,
    )


def test_write_by_day_splits_on_utc_midnight_and_appends_parts(tmp_path):
    start = day_start_ms("2026-01-05")
    table = _impressions([start + MS_PER_DAY - 1, start + MS_PER_DAY, start + 5])
    logs.write_by_day(table, tmp_path, "impressions")
    assert logs.list_days(tmp_path, "impressions") == ["2026-01-05", "2026-01-06"]
    assert logs.read(tmp_path, "impressions", ["2026-01-05"]).num_rows == 2
    logs.write_by_day(table, tmp_path, "impressions")  # a second writer appends a new part
    assert len(logs.day_files(tmp_path, "impressions", ["2026-01-06"])) == 2
    assert logs.scan(tmp_path, "impressions").collect().height == 6
    assert day_of(start + MS_PER_DAY) == "2026-01-06"


def test_scan_of_missing_log_is_empty_with_schema(tmp_path):
    frame = logs.scan(tmp_path, "actions").collect()
    assert frame.height == 0 and "watch_ms" in frame.columns


def test_unknown_log_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown log 'clicks'"):
        logs.scan(tmp_path, "clicks")
