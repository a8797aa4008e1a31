"""Reading and writing the four logs as day-partitioned Parquet.

Layout: `<root>/<log>/day=YYYY-MM-DD/part-<n>.parquet`. One writer call writes one part file of
one day, so a generator, a converter or (later) a stream sink can append parts without rewriting
what is there. Readers list days from directory names, so picking a day range or a shard never
opens a file it does not need.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpurec.data.schema import LOGS, day_of

_DAY_DIR = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")


def log_dir(root: str | Path, log: str) -> Path:
    if log not in LOGS:
        raise ValueError(f"unknown log {log!r}; expected one of {sorted(LOGS)}")
    return Path(root) / log


def write_day(table: pa.Table, root: str | Path, log: str, day: str) -> Path:
    """Append `table` (already in the log's schema) as a new part file of `day`."""
    schema = LOGS[log].schema
    if not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    day_dir = log_dir(root, log) / f"day={day}"
    day_dir.mkdir(parents=True, exist_ok=True)
    part = day_dir / f"part-{len(list(day_dir.glob('part-*.parquet'))):05d}.parquet"
    pq.write_table(table, part, compression="zstd")
    return part


def write_by_day(table: pa.Table, root: str | Path, log: str) -> list[Path]:
    """Split `table` by the UTC day of the log's partition timestamp and write each day."""
    ts_col = LOGS[log].partition_ts
    if table.num_rows == 0:
        return []
    days = pc.strftime(table[ts_col], format="%Y-%m-%d") if ts_col else None
    if days is None:
        raise ValueError(f"log {log!r} has no partition timestamp; use write_day")
    paths = []
    for day in pc.unique(days).to_pylist():
        paths.append(write_day(table.filter(pc.equal(days, day)), root, log, day))
    return paths


def list_days(root: str | Path, log: str) -> list[str]:
    """Sorted day partitions present for `log` (empty if the log has none)."""
    path = log_dir(root, log)
    if not path.is_dir():
        return []
    days = [m.group(1) for p in path.iterdir() if (m := _DAY_DIR.match(p.name)) and any(p.glob("*.parquet"))]
    return sorted(days)


def day_files(root: str | Path, log: str, days: list[str] | None = None) -> list[Path]:
    """Parquet part files of `log` for `days` (all days if None), in day order."""
    chosen = list_days(root, log) if days is None else days
    files: list[Path] = []
    for day in chosen:
        files.extend(sorted((log_dir(root, log) / f"day={day}").glob("*.parquet")))
    return files


def scan(root: str | Path, log: str, days: list[str] | None = None) -> pl.LazyFrame:
    """Lazy scan of `log` over `days` (all if None) with the contract's schema.

    An empty selection gives an empty frame of the right schema, so pipelines need no special case
    for a day with no rows of some log.
    """
    files = day_files(root, log, days)
    schema = pl.Schema(pl.from_arrow(LOGS[log].schema.empty_table()).schema)
    if not files:
        return pl.LazyFrame(schema=schema)
    return pl.scan_parquet([str(f) for f in files], schema=schema, hive_partitioning=False)


def read(root: str | Path, log: str, days: list[str] | None = None) -> pa.Table:
    """The whole of `log` (over `days`) as one Arrow table; for small logs and tests."""
    files = day_files(root, log, days)
    if not files:
        return LOGS[log].schema.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=LOGS[log].schema) for f in files)


__all__ = ["day_files", "day_of", "list_days", "log_dir", "read", "scan", "write_by_day", "write_day"]
