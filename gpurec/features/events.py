"""The write side's rules, once for every backend: input batches in, counter changes out.

Counting follows `gpurec.preprocess.counters` and `pipeline.py` exactly:

- An impression counts (user_n and item_n + 1) only if its user is known and consents to training
  and its item is known; other impressions are not counted (batch excludes them).
- A like or a finish comes from the impression's action (joined on (request_id, item_id)) and
  counts once the action has happened and the impression exists: at max(action ts, impression
  ts), which is when the store applies it if events are recorded in event-time order (a stream
  delivered late counts from when it arrives). finish = watch_ms * 10 >= duration_ms * 9 with the
  item's duration.
- Preprocessing joins an impression only with actions of its UTC day or the next one; so does the
  store. An action on the day before its impression's is `outside_window`; one more than a day
  after it does not see the impression at all: it stays `pending` until dropped, never counted.
- Several actions for one impression: the last wins (batch: the last in log order; here the one
  with the latest ts, ties to the later delivered, which is the same for logs written in time
  order). Its like/finish replace the earlier ones: the counters move by the difference.

Deduplication: an impression is keyed by (request_id, item_id), the logs' key, and is counted
once however often it is delivered (batch would count a duplicated row twice; a redelivery is not a
new impression). An action redelivered changes nothing (the same action again replaces itself),
and an older action delivered after a newer one is ignored. So a stream may redeliver freely.

An action that arrives before its impression waits (`pending`) and is applied when the impression
arrives, within the same day window. The backends keep impression records and pending actions
only as long as an action can still join them (see `retention_cutoff_day`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from gpurec.data.schema import ACTIONS, IMPRESSIONS, MS_PER_DAY
from gpurec.data.validate import MAX_WATCH_MS
from gpurec.errors import InvalidInput
from gpurec.preprocess.features import FINISH_DENOMINATOR, FINISH_NUMERATOR

Batch = pa.Table | pa.RecordBatch | pl.DataFrame | Mapping[str, Any] | Sequence[Mapping[str, Any]]
"""What a write takes: an Arrow table, a Polars frame, columns by name, or a list of row dicts."""
Key = tuple[int, int]  # (request_id, item_id)
# Impression records and pending actions are kept for this many UTC days before the newest event's
# day: an action joins impressions of its own day or the day before, and one more day absorbs
# actions delivered up to a day late.
RETENTION_DAYS = 2


def retention_cutoff_day(newest_day: int) -> int:
    """Records of days before this one can no longer be joined by an action: they may be dropped."""
    return newest_day - RETENTION_DAYS


def as_table(data: Batch, what: str) -> pa.Table:
    """Any accepted batch form as an Arrow table (InvalidInput for anything else)."""
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if isinstance(data, pl.DataFrame):
        return data.to_arrow()
    try:
        if isinstance(data, Mapping):
            return pa.table(
                {
                    name: pa.array(values) if not isinstance(values, pa.Array | pa.ChunkedArray) else values
                    for name, values in data.items()
                }
            )
        if isinstance(data, Sequence) and not isinstance(data, str | bytes):
            return pa.Table.from_pylist(list(data)) if data else pa.table({})
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise InvalidInput(f"{what}: cannot read the batch as columns: {err}") from err
    raise InvalidInput(
        f"{what}: expected an Arrow table, a Polars frame, columns by name or a list of rows, got {type(data).__name__}"
    )


def column(
    table: pa.Table, name: str, target: pa.DataType, what: str, aliases: tuple[str, ...] = ()
) -> pa.ChunkedArray:
    """`table[name]` (or its first alias present) cast to `target`, with no nulls (InvalidInput if not).

    Timestamps may come as timestamps of any unit (truncated to ms) or as integer epoch ms.
    """
    found = next((n for n in (name, *aliases) if n in table.column_names), None)
    if found is None:
        raise InvalidInput(
            f"{what}: missing column {name!r}" + (f" (or {', '.join(map(repr, aliases))})" if aliases else "")
        )
    values = table.column(found)
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidInput(f"{what}: missing value in column {found!r} at row {row}")
    try:
        if pa.types.is_timestamp(target) and pa.types.is_timestamp(values.type):
            return pc.cast(values, options=pc.CastOptions(target, allow_time_truncate=True))
        if pa.types.is_boolean(target) and not pa.types.is_boolean(values.type):
            raise pa.ArrowInvalid("not booleans")
        if pa.types.is_string(values.type) and not pa.types.is_string(target):
            raise pa.ArrowInvalid("strings")
        return pc.cast(values, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise InvalidInput(f"{what}: column {found!r} ({values.type}) is not {target}: {err}") from err


def int_column(table: pa.Table, name: str, what: str, aliases: tuple[str, ...] = ()) -> np.ndarray:
    """An integer or timestamp column as int64 (timestamps: epoch ms)."""
    values = (
        column(table, name, pa.int64(), what, aliases)
        if name not in ("ts", "upload_ts", "signup_ts")
        else None
    )
    if values is None:
        values = column(table, name, pa.timestamp("ms", tz="UTC"), what, aliases).cast(pa.int64())
    return values.to_numpy().astype(np.int64, copy=False)


def _non_negative(values: np.ndarray, name: str, what: str, upper: int | None = None) -> None:
    bad = np.flatnonzero((values < 0) | (values > upper if upper is not None else False))
    if bad.size:
        bound = f" or above {upper}" if upper is not None else ""
        raise InvalidInput(f"{what}: {name} {int(values[bad[0]])} at row {int(bad[0])} is negative{bound}")


@dataclass(frozen=True)
class Impressions:
    """A validated impression batch, in delivery order (the timestamp column may be ``ts`` or ``ts_ms``)."""

    request_id: np.ndarray
    item_id: np.ndarray
    user_id: np.ndarray
    ts_ms: np.ndarray

    @classmethod
    def of(cls, data: Batch) -> Impressions:
        what = "impressions"
        table = as_table(data, what)
        ts = int_column(table, "ts", what, ("ts_ms",))
        _non_negative(ts, "ts", what)
        return cls(*(int_column(table, c, what) for c in ("request_id", "item_id", "user_id")), ts)

    def __len__(self) -> int:
        return len(self.ts_ms)


@dataclass(frozen=True)
class Actions:
    """A validated action batch, in delivery order."""

    request_id: np.ndarray
    item_id: np.ndarray
    ts_ms: np.ndarray
    watch_ms: np.ndarray
    like: np.ndarray

    @classmethod
    def of(cls, data: Batch) -> Actions:
        what = "actions"
        table = as_table(data, what)
        ts = int_column(table, "ts", what, ("ts_ms",))
        watch = int_column(table, "watch_ms", what)
        _non_negative(ts, "ts", what)
        _non_negative(watch, "watch_ms", what, MAX_WATCH_MS)
        like = (
            column(table, "like", ACTIONS.field("like").type, what)
            .to_numpy(zero_copy_only=False)
            .astype(bool)
        )
        return cls(int_column(table, "request_id", what), int_column(table, "item_id", what), ts, watch, like)

    def __len__(self) -> int:
        return len(self.ts_ms)


assert IMPRESSIONS.field("ts").type == ACTIONS.field("ts").type  # both parsed by int_column as epoch ms


@dataclass
class ImpressionRecord:
    """What the store remembers of a counted impression, to attribute its actions."""

    user_id: int
    ts_ms: int
    like: bool = False
    finish: bool = False
    action_ms: int | None = None  # ts of the action whose like/finish are counted

    @property
    def day(self) -> int:
        return self.ts_ms // MS_PER_DAY


@dataclass(frozen=True)
class PendingAction:
    """An action whose impression has not arrived yet."""

    ts_ms: int
    watch_ms: int
    like: bool

    @property
    def day(self) -> int:
        return self.ts_ms // MS_PER_DAY


@dataclass
class State:
    """What a backend loaded for a batch: user training consent, item durations, impression
    records and pending actions of the batch's keys (absent: unknown / none)."""

    consent_training: dict[int, bool] = field(default_factory=dict)
    duration_ms: dict[int, int] = field(default_factory=dict)
    impressions: dict[Key, ImpressionRecord] = field(default_factory=dict)
    pending: dict[Key, PendingAction] = field(default_factory=dict)


@dataclass
class Changes:
    """What a batch changes: counter deltas by side and id ([n, likes, finishes]), impression records
    and pending actions to write (a pending value of None: delete it), and what happened to each event."""

    users: dict[int, list[int]] = field(default_factory=dict)
    items: dict[int, list[int]] = field(default_factory=dict)
    impressions: dict[Key, ImpressionRecord] = field(default_factory=dict)
    pending: dict[Key, PendingAction | None] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.stats[outcome] = self.stats.get(outcome, 0) + 1

    def add(self, user_id: int, item_id: int, index: int, delta: int) -> None:
        if delta:
            self.users.setdefault(user_id, [0, 0, 0])[index] += delta
            self.items.setdefault(item_id, [0, 0, 0])[index] += delta


def is_finish(watch_ms: int, duration_ms: int) -> bool:
    """preprocessing's label rule, in integers (features.label_exprs)."""
    return watch_ms * FINISH_DENOMINATOR >= duration_ms * FINISH_NUMERATOR


def visible(record_day: int, action_day: int) -> bool:
    """Whether an action of `action_day` looks up an impression record of `record_day` at all: the
    join window (same or next day) and the day before it, which `_apply_action` then refuses. The
    backends store records by day, and Redis searches exactly these days."""
    return -1 <= action_day - record_day <= 1


def _apply_action(
    changes: Changes, key: Key, record: ImpressionRecord, action: PendingAction, duration_ms: int
) -> str:
    """Count `action` on its impression's record; returns the outcome."""
    if not record.day <= action.day <= record.day + 1:
        return "outside_window"
    if record.action_ms is not None and action.ts_ms < record.action_ms:
        return "stale"
    like, finish = bool(action.like), is_finish(action.watch_ms, duration_ms)
    changes.add(record.user_id, key[1], 1, int(like) - int(record.like))
    changes.add(record.user_id, key[1], 2, int(finish) - int(record.finish))
    record.like, record.finish, record.action_ms = like, finish, action.ts_ms
    changes.impressions[key] = record
    return "applied"


def plan_impressions(batch: Impressions, state: State) -> Changes:
    """Counter changes of an impression batch, events in delivery order (duplicates counted once)."""
    changes = Changes()
    records, pending = state.impressions, dict(state.pending)
    for rid, iid, uid, ts in zip(
        batch.request_id.tolist(),
        batch.item_id.tolist(),
        batch.user_id.tolist(),
        batch.ts_ms.tolist(),
        strict=True,
    ):
        key = (rid, iid)
        if key in records:
            changes.count("duplicate")
            continue
        if not state.consent_training.get(uid, False):
            changes.count("excluded_user")  # unknown, or no consent to training: batch drops these rows
            continue
        if iid not in state.duration_ms:
            changes.count("excluded_item")
            continue
        record = records[key] = changes.impressions[key] = ImpressionRecord(uid, ts)
        changes.add(uid, iid, 0, 1)
        changes.count("applied")
        waiting = pending.pop(key, None)
        if waiting is not None and record.day <= waiting.day <= record.day + 1:
            changes.pending[key] = None
            changes.count(f"pending_{_apply_action(changes, key, record, waiting, state.duration_ms[iid])}")
    return changes


def plan_actions(batch: Actions, state: State) -> Changes:
    """Counter changes of an action batch, in delivery order."""
    changes = Changes()
    records, pending = state.impressions, state.pending
    for rid, iid, ts, watch, like in zip(
        batch.request_id.tolist(),
        batch.item_id.tolist(),
        batch.ts_ms.tolist(),
        batch.watch_ms.tolist(),
        batch.like.tolist(),
        strict=True,
    ):
        key, action = (rid, iid), PendingAction(ts, watch, like)
        record = records.get(key)
        if record is not None and visible(record.day, action.day):
            changes.count(_apply_action(changes, key, record, action, state.duration_ms.get(iid, 0)))
            continue
        earlier = pending.get(key)
        if earlier is not None and ts < earlier.ts_ms:
            changes.count("stale")
            continue
        pending[key] = changes.pending[key] = action
        changes.count("pending")
    return changes


__all__ = [
    "RETENTION_DAYS",
    "Actions",
    "Batch",
    "Changes",
    "ImpressionRecord",
    "Impressions",
    "PendingAction",
    "State",
    "as_table",
    "column",
    "int_column",
    "is_finish",
    "plan_actions",
    "plan_impressions",
    "retention_cutoff_day",
    "visible",
]
