"""The event contract every stage imports: four logs as Arrow schemas.

A short-video feed produces four logs. Requests serve items (impressions), items carry
metadata, users carry a profile with consent flags, and users act on what they were shown.
Impressions and actions join on (request_id, item_id); ids are 64-bit signed integers
everywhere (TorchRec's KeyedJaggedTensor values are int64). Timestamps are UTC milliseconds.

Logs are written as Parquet partitioned by UTC day (`<log>/day=YYYY-MM-DD/part-*.parquet`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pyarrow as pa

TIMESTAMP = pa.timestamp("ms", tz="UTC")

IMPRESSIONS = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("surface", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("author_id", pa.int64(), nullable=False),
        pa.field("duration_ms", pa.int32(), nullable=False),
        pa.field("upload_ts", TIMESTAMP, nullable=False),
        pa.field("hashtags", pa.list_(pa.string()), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
    ]
)

USERS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("language", pa.string(), nullable=False),
        pa.field("signup_ts", TIMESTAMP, nullable=False),
        pa.field("consent_personalisation", pa.bool_(), nullable=False),
        pa.field("consent_training", pa.bool_(), nullable=False),
    ]
)

ACTIONS = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("ts", TIMESTAMP, nullable=False),
        pa.field("watch_ms", pa.int32(), nullable=False),
        pa.field("like", pa.bool_(), nullable=False),
        pa.field("share", pa.bool_(), nullable=False),
        pa.field("comment", pa.bool_(), nullable=False),
        pa.field("follow", pa.bool_(), nullable=False),
        pa.field("skip", pa.bool_(), nullable=False),
    ]
)

# The simulator's ground truth for every impression. Never a feature: it lets experiments
# report how close a model gets to the best achievable AUC.
ORACLE = pa.schema(
    [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("p_like", pa.float32(), nullable=False),
        pa.field("p_finish", pa.float32(), nullable=False),
    ]
)


@dataclass(frozen=True)
class LogSpec:
    """One log: its schema, its key columns and the timestamp that partitions it by day."""

    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    partition_ts: str


LOGS: dict[str, LogSpec] = {
    "impressions": LogSpec("impressions", IMPRESSIONS, ("request_id", "item_id"), "ts"),
    "items": LogSpec("items", ITEMS, ("item_id",), "upload_ts"),
    "users": LogSpec("users", USERS, ("user_id",), "signup_ts"),
    "actions": LogSpec("actions", ACTIONS, ("request_id", "item_id"), "ts"),
    "oracle": LogSpec("oracle", ORACLE, ("request_id", "item_id"), ""),
}

DAY_FORMAT = "%Y-%m-%d"


def day_of(ts_ms: int) -> str:
    """UTC day partition name (YYYY-MM-DD) of a millisecond timestamp."""
    return dt.datetime.fromtimestamp(ts_ms / 1000, tz=dt.UTC).strftime(DAY_FORMAT)


def day_start_ms(day: str) -> int:
    """Millisecond timestamp of 00:00 UTC on `day` (YYYY-MM-DD)."""
    parsed = dt.datetime.strptime(day, DAY_FORMAT).replace(tzinfo=dt.UTC)
    return int(parsed.timestamp() * 1000)


MS_PER_DAY = 86_400_000
