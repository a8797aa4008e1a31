"""Reading input log days through validation, once each, with dead letters written exactly once.

Every day of every input log goes through `gpurec.data.validate.validate`. A day can be read by
more than one shard (shard i replays the days before its block to rebuild counters, and reads the
day after its block for late actions), but only the day's owner (see `splits.owner_of`) writes its
rejected rows to the dead letter and counts them, so merged shard manifests count each row once.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpurec.data import logs
from gpurec.data.schema import LOGS, MS_PER_DAY, TIMESTAMP, day_start_ms
from gpurec.data.validate import DEAD_LETTER_SCHEMA, validate, write_dead_letter
from gpurec.errors import InputNotFound, InvalidInput

# Columns the pipeline uses from each day-keyed log; everything else is dropped right after validation.
IMPRESSION_COLUMNS = ("request_id", "ts", "user_id", "item_id", "position")
ACTION_COLUMNS = ("request_id", "item_id", "ts", "watch_ms", "like")
# The logs preprocessing reads (the oracle is the simulator's ground truth, read only by evaluation).
INPUT_LOGS = ("impressions", "actions", "users", "items")
# Without these no impression can become a feature row; no actions at all is possible (no engagement).
REQUIRED_LOGS = ("impressions", "users", "items")


def check_inputs(root: Path) -> None:
    """Fail before any work when the input directory cannot give features.

    Impressions, users and items must have day partitions, and every part file of every input log
    must be readable Parquet with every column of its log's contract: validation would reject each
    row of a file missing a column, so a run would "succeed" with nothing in it. Reads footers only.
    """
    for log in INPUT_LOGS:
        files = logs.day_files(root, log)
        if not files and log in REQUIRED_LOGS:
            raise InputNotFound(
                f"no {log} log under {root} (expected {root / log}/day=YYYY-MM-DD/*.parquet, as `gpurec generate` writes)"
            )
        required = LOGS[log].schema.names
        for file in files:
            try:
                present = set(pq.read_schema(file).names)
            except (OSError, pa.ArrowException) as err:
                raise InvalidInput(f"{log} log: {file} is not a readable Parquet file ({err})") from None
            missing = [name for name in required if name not in present]
            if missing:
                raise InvalidInput(
                    f"{log} log: {file} has no column {missing[0]!r}"
                    + (f" (nor {missing[1:]})" if len(missing) > 1 else "")
                    + f"; every {log} file needs {required}"
                )


@dataclass
class ValidatedReader:
    """Validated day tables of one input directory, with per-log rejected and raw row counts.

    `owns(log, day)` decides whether this process writes and counts that day's rejected rows.
    """

    root: Path
    out: Path
    owns: Callable[[str, str], bool]
    now_ms: int
    rows_read: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    first_reason: dict[str, str] = field(default_factory=dict)  # per log: why its first rejected row was
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def read_day(self, log: str, day: str, accept: tuple[list[str], str] | None = None) -> pa.Table:
        """The valid rows of `log`'s partition `day` (the whole log's schema; empty if absent).

        `accept` = (days, why): rows whose partition timestamp is on none of `days` are rejected
        too, with `why` in the reason.
        """
        return self._validated(log, [day], accept)

    def read_log(self, log: str) -> pa.Table:
        """All days of a (small, dimension) log, validated in one call (validation is row by row,
        so this equals validating day by day, without a per-file overhead on many tiny days)."""
        return self._validated(log, logs.list_days(self.root, log), None)

    def _validated(self, log: str, days: list[str], accept: tuple[list[str], str] | None) -> pa.Table:
        raw = _read_raw(logs.day_files(self.root, log, days), log)
        checked = validate(raw, log, now_ms=self.now_ms)
        valid, rejected = checked.valid, checked.rejected
        if accept is not None:
            valid, outside = _split_outside(valid, log, *accept)
            rejected = pa.concat_tables([rejected, outside]) if outside.num_rows else rejected
        fresh = [day for day in days if (log, day) not in self._seen and self.owns(log, day)]
        if fresh and len(fresh) == len(days):
            self._seen.update((log, day) for day in days)
            self.rows_read[log] = self.rows_read.get(log, 0) + raw.num_rows
            self.rejected[log] = self.rejected.get(log, 0) + rejected.num_rows
            if rejected.num_rows and log not in self.first_reason:
                self.first_reason[log] = rejected["reason"][0].as_py()
            write_dead_letter(rejected, self.out, log)
        return valid

    def impressions(self, day: str, next_day: str | None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Impressions of partition `day`: (rows whose ts is in `day`, rows whose ts is in `next_day`).

        A writer that partitions by session (a session crossing midnight stays in its start day's
        partition) puts a few impressions of the next day in this one; they are carried to the next
        day so counters stay point-in-time. Rows earlier than the partition day, or later than the
        next partition day, cannot be placed in time order any more: they go to the dead letter.
        """
        days = [day] if next_day is None else [day, next_day]
        why = f"partition day={day}" + (f" and the next partition day={next_day}" if next_day else " (the last day)")
        table = self.read_day("impressions", day, (days, why)).select(list(IMPRESSION_COLUMNS))
        frame = pl.from_arrow(table)
        in_day = pl.col("ts").dt.epoch("ms") < day_start_ms(day) + MS_PER_DAY
        return frame.filter(in_day), frame.filter(~in_day)

    def actions(self, day: str) -> pl.DataFrame:
        return pl.from_arrow(self.read_day("actions", day).select(list(ACTION_COLUMNS)))

    def check_not_all_rejected(self, log: str) -> None:
        """InvalidInput when this process read rows of `log` and rejected every one of them: the
        input is systematically wrong (a run made of nothing must not look like a success)."""
        read = self.rows_read.get(log, 0)
        if read and self.rejected.get(log, 0) == read:
            raise InvalidInput(
                f"every one of the {read:,} rows of the {log} log under {self.root} was rejected "
                f"(first reason: {self.first_reason.get(log, 'unknown')}); the rows are in {self.out / 'dead_letter' / log}"
            )

    def validate_only(self, log: str, day: str) -> None:
        """Validate a day nobody else reads, so its bad rows still reach the dead letter."""
        if (log, day) not in self._seen and self.owns(log, day):
            self.read_day(log, day)


def _read_raw(files: list[Path], log: str) -> pa.Table:
    """The part files as one Arrow table, as written (validation coerces types afterwards).

    Polars' multi-file reader is about twice as fast as pyarrow's here; parts whose schemas differ
    (a producer writing loose types) are read one by one and concatenated with type promotion.
    """
    if not files:
        return LOGS[log].schema.empty_table()
    try:
        return pl.read_parquet([str(f) for f in files], hive_partitioning=False).to_arrow()
    except (pl.exceptions.PolarsError, pa.ArrowException):
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


def _split_outside(valid: pa.Table, log: str, days: list[str], why: str) -> tuple[pa.Table, pa.Table]:
    """(rows with the partition timestamp on one of `days`, dead-letter rows for the others)."""
    column = LOGS[log].partition_ts
    ms = pc.cast(valid[column], pa.int64())
    inside = [pc.and_(pc.greater_equal(ms, lo), pc.less(ms, lo + MS_PER_DAY)) for lo in map(day_start_ms, days)]
    outside = pc.invert(functools.reduce(pc.or_, inside))
    if not pc.any(outside).as_py():
        return valid, DEAD_LETTER_SCHEMA.empty_table()
    rows = valid.filter(outside).to_pylist()
    reasons = [f"{column} {row[column].isoformat(timespec='milliseconds')} outside {why}" for row in rows]
    now = dt.datetime.fromtimestamp(time.time(), tz=dt.UTC)
    rejected = pa.table(
        {
            "log": pa.array([log] * len(rows), pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "row": pa.array([json.dumps(r, default=str) for r in rows], pa.string()),
            "rejected_at": pa.array([now] * len(rows), TIMESTAMP),
        },
        schema=DEAD_LETTER_SCHEMA,
    )
    return valid.filter(pc.invert(outside)), rejected


__all__ = ["ACTION_COLUMNS", "IMPRESSION_COLUMNS", "INPUT_LOGS", "ValidatedReader", "check_inputs"]
