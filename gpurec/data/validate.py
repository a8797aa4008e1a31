"""Check raw event batches against the log contract and route bad rows to a dead letter.

The project's rule is "bad input gets a clear error naming what was wrong, and loses nothing": every
input row ends either in `valid` (exactly the log's schema) or in `rejected` (the dead-letter schema,
with a reason naming each problem and the original row as JSON), never silently dropped or mangled.

Input may arrive with loose types (a CSV reader, a JSON stream consumer, pandas), so coercion accepts
what a user would reasonably expect and nothing that could change a value:

- integer columns: ints, floats with an integral value (42.0) and decimal integer strings ('42',
  '-7'; not '+7', ' 7', '0x1f' or '42.0'); int32 columns reject values outside the int32 range;
- bool columns: bools and the ints 0/1 only (not 1.0, not 'true');
- timestamp columns: timestamps of any unit or zone (naive means UTC; sub-millisecond precision is
  truncated to the contract's ms), epoch milliseconds given as an integer (same rules as integer
  columns) and ISO-8601 strings (naive means UTC);
- string columns: strings only (a number in `region` is more likely a shifted column than a region);
  list<string> columns: lists of strings (an empty list is fine).

The common path (right types, all valid) is vectorised with pyarrow.compute; Python looks at single
values only for rows already known to be bad, or for a column whose vectorised cast failed. A Polars
frame goes in as `frame.to_arrow()` (large/view strings and naive datetimes are taken as above).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpurec.data.schema import LOGS, TIMESTAMP, LogSpec

MAX_WATCH_MS = 3_600_000
"""A watch longer than an hour on a short-video feed is a logging bug (a stuck player), not a signal."""

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("log", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("row", pa.string(), nullable=False),
        pa.field("rejected_at", TIMESTAMP, nullable=False),
    ]
)

_INT_RE = re.compile(r"-?[0-9]+")
_INT_RANGE = {pa.int32(): (-(2**31), 2**31 - 1), pa.int64(): (-(2**63), 2**63 - 1)}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Rule:
    """One value rule on the coerced columns named in `columns`, whichever log has them."""

    columns: tuple[str, ...]
    violated: Callable[[pa.ChunkedArray, int], pa.ChunkedArray]  # (values, future limit ms) -> bool mask
    reason: Callable[[str, Any, int, int], str]  # (column, bad value, now ms, tolerance ms) -> message
    # A timestamp's bad value is passed as epoch ms.


def _iso(ms: int) -> str:
    try:
        return (_EPOCH + dt.timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    except OverflowError:  # beyond year 9999, where Python's datetime ends
        return f"{ms} ms after epoch"


def _future(col: str, ms: int, now_ms: int, tolerance_ms: int) -> str:
    tol = f"{tolerance_ms // 60_000} min" if tolerance_ms % 60_000 == 0 else f"{tolerance_ms} ms"
    return f"{col} in the future: {_iso(ms)} > now + {tol} (now {_iso(now_ms)})"


# The value rules, written once for all logs.
RULES: tuple[Rule, ...] = (
    Rule(
        ("duration_ms", "watch_ms", "position"),
        lambda a, _: pc.less(a, 0),
        lambda c, v, *_: f"negative {c}: {v}",
    ),
    Rule(
        ("watch_ms",),
        lambda a, _: pc.greater(a, MAX_WATCH_MS),
        lambda c, v, *_: f"{c} {v} beyond bound {MAX_WATCH_MS}",
    ),
    Rule(
        ("ts", "upload_ts", "signup_ts"), lambda a, limit: pc.greater(a, pa.scalar(limit, TIMESTAMP)), _future
    ),
)


@dataclass(frozen=True)
class Validation:
    """A batch split in two: `valid` in the log's schema, `rejected` in DEAD_LETTER_SCHEMA."""

    valid: pa.Table
    rejected: pa.Table

    @property
    def num_valid(self) -> int:
        return self.valid.num_rows

    @property
    def num_rejected(self) -> int:
        return self.rejected.num_rows


class _Bad(Exception):
    """A single value that cannot enter the contract; the message is the rejection reason."""


def _spec(log: str) -> LogSpec:
    if log not in LOGS:
        raise ValueError(f"unknown log {log!r}; expected one of {sorted(LOGS)}")
    return LOGS[log]


def _py_int(v: Any, t: pa.DataType, name: str, wrong: _Bad) -> int:
    if (isinstance(v, float) and v.is_integer()) or (isinstance(v, str) and _INT_RE.fullmatch(v)):
        v = int(v)
    elif isinstance(v, bool) or not isinstance(v, int):
        raise wrong
    lo, hi = _INT_RANGE[t]
    if not lo <= v <= hi:
        raise _Bad(f"out of {t} range for {name!r}: {v}")
    return v


def _py_coerce(v: Any, field: pa.Field) -> Any:
    """One value converted to the field's type (timestamps as epoch ms), or _Bad naming why not."""
    name, t = field.name, field.type
    if isinstance(v, np.generic):
        v = v.item()
    if v is None:
        raise _Bad(f"missing value for {name!r}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _Bad(f"NaN in {name!r}" if math.isnan(v) else f"{'-' if v < 0 else ''}inf in {name!r}")
    shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
    wrong = _Bad(f"wrong type for {name!r}: expected {t}, got {shown}")
    if pa.types.is_boolean(t):
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
    elif pa.types.is_timestamp(t):
        try:
            if isinstance(v, str) and not _INT_RE.fullmatch(v):
                v = dt.datetime.fromisoformat(v[:-1] + "+00:00" if v.endswith("Z") else v)  # 'Z': Python 3.10
            if isinstance(v, dt.datetime):
                v = v if v.tzinfo else v.replace(tzinfo=dt.UTC)
                return (v - _EPOCH) // dt.timedelta(milliseconds=1)
        except (ValueError, TypeError, OverflowError):
            raise wrong from None
        return _py_int(v, pa.int64(), name, wrong)
    elif pa.types.is_integer(t):
        return _py_int(v, t, name, wrong)
    elif pa.types.is_floating(t):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif pa.types.is_string(t):
        if isinstance(v, str):
            return v
    elif (
        pa.types.is_list(t)
        and isinstance(v, (list, tuple))
        and all(x is None or isinstance(x, str) for x in v)
    ):
        return list(v)
    raise wrong


def _py_column(values: Sequence[Any], field: pa.Field) -> tuple[pa.ChunkedArray, dict[int, str]]:
    """The per-row path, for columns the vectorised cast could not take whole."""
    out: list[Any] = []
    bad: dict[int, str] = {}
    for i, v in enumerate(values):
        try:
            out.append(_py_coerce(v, field))
        except _Bad as e:
            out.append(None)
            bad[i] = str(e)
    storage = pa.int64() if pa.types.is_timestamp(field.type) else field.type
    return pa.chunked_array([pa.array(out, storage).cast(field.type)]), bad


def _is_str(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _all_int_strings(arr: pa.ChunkedArray) -> bool:
    return bool(pc.all(pc.match_substring_regex(arr, "^-?[0-9]+$")).as_py() is not False)


def _fast(arr: pa.ChunkedArray, t: pa.DataType) -> tuple[pa.ChunkedArray, pa.ChunkedArray | None] | None:
    """(column cast to `t`, mask of bad rows or None) without Python row work; None if it cannot tell."""
    src = arr.type
    if src == t:
        return arr, None
    if pa.types.is_dictionary(src):
        return _fast(arr.cast(src.value_type), t)
    if pa.types.is_null(src):
        return pa.chunked_array([pa.nulls(len(arr), t)]), None
    if pa.types.is_string(t) and _is_str(src):
        return arr.cast(t), None
    if pa.types.is_list(t) and (pa.types.is_list(src) or pa.types.is_large_list(src)):
        value_type = src.value_type
        return (arr.cast(t), None) if _is_str(value_type) or pa.types.is_null(value_type) else None
    if pa.types.is_timestamp(t):
        if pa.types.is_timestamp(src):
            return pc.cast(arr, options=pc.CastOptions(t, allow_time_truncate=True)), None
        if _is_str(src) and not _all_int_strings(arr):
            return pc.cast(arr, t), None  # ISO-8601 with a zone; anything else raises -> per-row path
        as_ms = _fast(arr, pa.int64())
        return None if as_ms is None else (as_ms[0].cast(t), as_ms[1])
    if pa.types.is_integer(t) and _is_str(src):  # '42' is 42; any other string is bad
        bad = pc.invert(pc.match_substring_regex(arr, "^-?[0-9]+$"))
        got = _fast(pc.if_else(bad.fill_null(False), pa.scalar(None, src), arr).cast(pa.int64()), t)
        return None if got is None else (got[0], bad if got[1] is None else pc.or_(bad, got[1]))
    if pa.types.is_integer(t) and pa.types.is_integer(src):
        return arr.cast(t), None  # out of range raises -> per-row path names the values
    if pa.types.is_floating(src) and (pa.types.is_integer(t) or pa.types.is_floating(t)):
        bad = pc.invert(pc.is_finite(arr))
        if pa.types.is_integer(t):
            lo, hi = _INT_RANGE[t]
            out_of_range = pc.or_(pc.less(arr, float(lo)), pc.greater_equal(arr, float(hi + 1)))
            bad = pc.or_(pc.or_(bad, pc.not_equal(pc.floor(arr), arr)), out_of_range)
        kept = pc.if_else(bad.fill_null(False), pa.scalar(None, src), arr)
        return kept.cast(t, safe=pa.types.is_integer(t)), bad
    if pa.types.is_boolean(t) and pa.types.is_integer(src):
        bad = pc.and_(pc.not_equal(arr, 0), pc.not_equal(arr, 1))
        return pc.if_else(bad, pa.scalar(None, t), pc.equal(arr, 1)), bad
    return None


def _pylist(data: pa.ChunkedArray | pa.Table) -> list[Any]:
    """Python values, with timestamps and dates as strings: Python's datetime cannot hold every Arrow
    value (a year-30000 ts would crash the error path), and strings are much faster to make."""

    def safe(col: pa.ChunkedArray) -> pa.ChunkedArray:
        if pa.types.is_date(col.type):
            return col.cast(pa.string())
        if not pa.types.is_timestamp(col.type):
            return col
        raw, per_s = col.cast(pa.int64()), {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[col.type.unit]
        lo = max(-62_135_596_800 * per_s, -(2**63))  # 0001-01-01
        hi = min(253_402_300_799 * per_s, 2**63 - 1)  # 9999-12-31 23:59:59
        readable = pc.and_(pc.greater_equal(raw, lo), pc.less_equal(raw, hi))
        as_number = pc.binary_join_element_wise(raw.cast(pa.string()), f" {col.type.unit} after epoch", "")
        return pc.if_else(readable, col.cast(pa.string()), as_number)

    if isinstance(data, pa.Table):
        return pa.Table.from_arrays([safe(c) for c in data.columns], names=data.column_names).to_pylist()
    return safe(data).to_pylist()


def _convert(
    col: pa.ChunkedArray | None, field: pa.Field, values: Sequence[Any] | None = None
) -> tuple[pa.ChunkedArray, dict[int, str]]:
    """The column in the field's type (bad rows null) and the reason for each bad row.

    `values` are the original Python values when there are any (dict rows): Arrow's inference may
    have widened them (1 next to 1.0 becomes 1.0), and a reason must show what was really sent.
    """
    try:
        got = None if col is None else _fast(col, field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        got = None
    if got is None:
        return _py_column(_pylist(col) if values is None else values, field)
    converted, mask = got
    bad: dict[int, str] = {}
    if col.null_count:
        missing = np.flatnonzero(col.is_null().to_numpy()).tolist()
        bad.update(dict.fromkeys(missing, f"missing value for {field.name!r}"))
    if mask is not None and pc.any(mask).as_py():
        idx = np.flatnonzero(mask.fill_null(False).to_numpy())
        shown = _pylist(col.take(idx)) if values is None else [values[i] for i in idx]
        for i, v in zip(idx.tolist(), shown, strict=True):
            try:
                _py_coerce(v, field)
                bad[i] = f"wrong type for {field.name!r}: expected {field.type}, got {v!r}"
            except _Bad as e:
                bad[i] = str(e)
    return converted, bad


def _plain(v: Any) -> Any:
    """A value JSON can hold without loss: NaN/inf as strings, numpy scalars as Python ones."""
    if isinstance(v, np.generic | np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _default(v: Any) -> Any:
    return _plain(v) if isinstance(v, np.generic | np.ndarray) else str(v)


_ENCODE = json.JSONEncoder(default=_default, allow_nan=False).encode


def _json(row: Any) -> str:
    """The original row as strict JSON; the slower `_plain` pass only when a value needs it."""
    try:
        return _ENCODE(row)
    except (ValueError, TypeError):  # NaN/inf, or keys JSON cannot hold
        return _ENCODE(_plain(row))


_Column = tuple[pa.ChunkedArray | None, Sequence[Any] | None]  # (as Arrow, original Python values)


def _run(
    columns: Mapping[str, _Column],
    n: int,
    log: str,
    originals: Callable[[list[int]], list[Any]],
    final: Mapping[int, str],
    now_ms: int | None,
    tolerance_ms: int,
) -> Validation:
    """Convert and check every column of `log`; rows in `final` are rejected with that reason only."""
    schema = _spec(log).schema
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    reasons: dict[int, list[str]] = {i: [r] for i, r in final.items()}

    def add(i: int, reason: str) -> None:
        if i not in final:
            reasons.setdefault(i, []).append(reason)

    out = []
    for field in schema:
        if field.name not in columns:
            for i in range(n):
                add(i, f"missing column {field.name!r}")
            out.append(pa.chunked_array([pa.nulls(n, field.type)]))
            continue
        arrow, values = columns[field.name]
        converted, bad = _convert(arrow, field, values)
        for i, reason in bad.items():
            add(i, reason)
        for rule in RULES:
            if (
                field.name in rule.columns
                and pc.any(mask := rule.violated(converted, now + tolerance_ms)).as_py()
            ):
                idx = np.flatnonzero(mask.fill_null(False).to_numpy())
                shown = converted.take(idx)
                shown = shown.cast(pa.int64()) if pa.types.is_timestamp(shown.type) else shown
                for i, v in zip(idx.tolist(), shown.to_pylist(), strict=True):
                    add(i, rule.reason(field.name, v, now, tolerance_ms))
        out.append(converted)
    valid = pa.Table.from_arrays(out, schema=schema)
    if reasons:
        keep = np.ones(n, dtype=bool)
        keep[list(reasons)] = False
        valid = valid.filter(pa.array(keep))
    idx = sorted(reasons)
    rows = [_json(r) for r in originals(idx)] if idx else []
    rejected = pa.Table.from_arrays(
        [
            pa.array([log] * len(idx), pa.string()),
            pa.array(["; ".join(reasons[i]) for i in idx], pa.string()),
            pa.array(rows, pa.string()),
            pa.array([time.time_ns() // 1_000_000] * len(idx), pa.int64()).cast(TIMESTAMP),
        ],
        schema=DEAD_LETTER_SCHEMA,
    )
    return Validation(valid, rejected)


def validate(
    table: pa.Table, log: str, *, now_ms: int | None = None, future_tolerance_ms: int = 300_000
) -> Validation:
    """Split `table` into rows of `log`'s contract and rejected rows with their reasons.

    Extra columns are ignored (but kept in the rejected rows' JSON); a missing column rejects every
    row. `now_ms` (default: the wall clock) is the reference for "in the future", which allows
    `future_tolerance_ms` of clock skew between producers.
    """
    columns: dict[str, _Column] = {}
    final: dict[int, str] = {}
    for name in _spec(log).schema.names:
        found = table.schema.get_all_field_indices(name)
        if len(found) > 1:  # which copy is meant would be a guess: trust nothing of this batch
            final = dict.fromkeys(range(table.num_rows), f"ambiguous column {name!r} ({len(found)} copies)")
        elif found:
            columns[name] = (table.column(found[0]), None)
    names = table.schema.names  # duplicate names get a suffix in the JSON so no copy is lost
    named = table.rename_columns([c if names.index(c) == j else f"{c}#{j}" for j, c in enumerate(names)])
    return _run(
        columns, table.num_rows, log, lambda i: _pylist(named.take(i)), final, now_ms, future_tolerance_ms
    )


def validate_rows(
    rows: Sequence[Any], log: str, *, now_ms: int | None = None, future_tolerance_ms: int = 300_000
) -> Validation:
    """`validate` for a list of dict rows, as a stream consumer hands them in.

    A column goes through Arrow's inference when its values agree and through the per-row path when
    they do not, so one odd value rejects one row, not the batch. A key absent from one dict is a
    missing value; absent from every dict, a missing column. A row that is not a dict is rejected.
    """
    final = {
        i: f"not a record: expected dict, got {type(r).__name__}"
        for i, r in enumerate(rows)
        if not isinstance(r, Mapping)
    }
    records = [r if isinstance(r, Mapping) else {} for r in rows]
    columns: dict[str, _Column] = {}
    for name in _spec(log).schema.names:
        if any(name in r for r in records):
            values = [r.get(name) for r in records]
            try:
                columns[name] = (pa.chunked_array([pa.array(values)]), values)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                columns[name] = (None, values)
    return _run(columns, len(rows), log, lambda i: [rows[j] for j in i], final, now_ms, future_tolerance_ms)


def write_dead_letter(rejected: pa.Table, root: str | Path, log: str) -> Path | None:
    """Append `rejected` as a new part file of `<root>/dead_letter/<log>/`; None if there is nothing.

    The part is linked into place under a fresh name, so concurrent writers never overwrite a part.
    """
    _spec(log)
    if rejected.num_rows == 0:
        return None
    directory = Path(root) / "dead_letter" / log
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{uuid.uuid4().hex}.parquet"
    pq.write_table(
        rejected.select(DEAD_LETTER_SCHEMA.names).cast(DEAD_LETTER_SCHEMA), tmp, compression="zstd"
    )
    n = len(list(directory.glob("part-*.parquet")))
    try:
        while True:
            part = directory / f"part-{n:05d}.parquet"
            try:
                part.hardlink_to(tmp)
                return part
            except FileExistsError:
                n += 1
    finally:
        tmp.unlink()


def read_dead_letter(root: str | Path, log: str | None = None) -> pa.Table:
    """Every rejected row of `log` (of all logs if None), in write order per log."""
    base = Path(root) / "dead_letter"
    logs = [_spec(log).name] if log is not None else sorted(p.name for p in base.glob("*") if p.is_dir())
    files = [f for name in logs for f in sorted((base / name).glob("part-*.parquet"))]
    if not files:
        return DEAD_LETTER_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(f, schema=DEAD_LETTER_SCHEMA) for f in files)
