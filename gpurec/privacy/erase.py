"""Erasing one user from the files of a workspace: Parquet datasets, delta files, exports.

Each function rewrites what holds the user and leaves everything else byte-for-byte alone. A
rewrite goes to a temporary file beside the original, is fsynced and renamed over it, so a crash
leaves either the old file or the new one, never half of one (the erasure is then run again: every
step is idempotent).
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

# Columns that hold a user's (pseudonymous) id, and the hashed form the features keep beside it.
USER_COLUMNS = ("user_id",)
HASHED_USER_COLUMNS = ("sparse_user_id",)
# Raw tables keyed by request: they name no user, but their requests are the user's impressions.
REQUEST_TABLES = ("actions", "oracle")


def _replace(path: Path, frame: pl.DataFrame) -> None:
    tmp = path.with_name(f".{path.name}.erase-tmp")
    frame.write_parquet(tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if not p.name.startswith("."))


def erase_parquet(root: Path, user_id: int, table_key: int) -> dict[str, int]:
    """Delete the user's rows from every Parquet file under `root` (raw logs or preprocessed
    features): rows whose user column is `user_id` (or whose hashed user column is `table_key`), and
    in the raw request-keyed tables (actions, oracle) the rows of the user's requests. Returns the
    rows deleted per top-level table."""
    if not root.is_dir():
        return {}
    deleted: dict[str, int] = {}
    requests: set[int] = set()
    files = _parquet_files(root)
    # Users' tables first, collecting their request ids, then the request-keyed tables.
    ordered = sorted(files, key=lambda p: p.relative_to(root).parts[0] in REQUEST_TABLES)
    for path in ordered:
        table = path.relative_to(root).parts[0]
        names = pq.read_schema(path).names
        frame = pl.read_parquet(path, hive_partitioning=False)
        keep = pl.lit(True)
        for column in USER_COLUMNS:
            if column in names:
                keep = keep & (pl.col(column) != user_id)
        for column in HASHED_USER_COLUMNS:
            if column in names:
                keep = keep & (pl.col(column) != table_key)
        if table in REQUEST_TABLES and "request_id" in names and requests:
            keep = keep & ~pl.col("request_id").is_in(list(requests))
        gone = frame.filter(~keep)
        if gone.height == 0:
            continue
        if "request_id" in names and table not in REQUEST_TABLES:
            requests.update(gone["request_id"].to_list())
        _replace(path, frame.filter(keep))
        deleted[table] = deleted.get(table, 0) + gone.height
    return deleted


def erase_exports(privacy_dir: Path, user_id: int) -> int:
    """Delete the access exports written for the user (`gpurec export-user` files)."""
    if not privacy_dir.is_dir():
        return 0
    doomed = [p for p in privacy_dir.glob(f"export-{user_id}*.json")]
    for path in doomed:
        path.unlink()
    return len(doomed)
