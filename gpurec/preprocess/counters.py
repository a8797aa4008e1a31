"""Point-in-time counters: per user and per item, impressions, likes and finishes strictly before t.

Events: every impression counts at its own ts; a like or a finish counts at its ACTION ts (when
the user did it), never at the impression's ts, so a like that happens after a later impression was
served is invisible to that impression. Only consenting users' events count (the others' data is
not used for training at all).

Days are processed in order. `CounterState` carries, between days, the totals per user and item
of every event before the day's start, plus `pending`: like/finish events already known from
labelled impressions whose action time lies in a later day (an impression at 23:59:50 liked at
00:00:05). Within a day, counts come from one sort per side (users, items) of a stream of rows:

    state row (t = -1) | impression rows (t = ms into the day) | like/finish event rows

sorted on one packed 64-bit key (dense index << 28 | t + 1). A running sum gives "events up to
here"; the value at the first row of each (key, t) run, minus the value at the key's first row, is
"events of this key strictly before t", so impressions served in the same request (same ts) do not
count each other. Everything is plain column arithmetic (cum_sum, shift, forward_fill), which the
GPU engine runs too; no join_asof, no Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

COUNTS: tuple[str, ...] = ("n", "likes", "finishes")
SIDES: dict[str, str] = {"user": "u_idx", "item": "i_idx"}
_TIME_BITS = 28  # ms into a day (< 86_400_000 < 2**27), shifted by one for the state row at t = -1
_COUNT_DTYPE = pl.Int64


def _totals_schema(key: str) -> dict[str, pl.DataType]:
    return {key: pl.UInt32(), **dict.fromkeys(COUNTS, _COUNT_DTYPE())}


PENDING_SCHEMA = {"u_idx": pl.UInt32(), "i_idx": pl.UInt32(), "event_ms": pl.Int64(), "likes": _COUNT_DTYPE(), "finishes": _COUNT_DTYPE()}


@dataclass(frozen=True)
class CounterState:
    """Totals before a day's start (`users`: u_idx + COUNTS, `items`: i_idx + COUNTS) and the
    like/finish events (`pending`: PENDING_SCHEMA) whose action time is at or after it."""

    users: pl.DataFrame
    items: pl.DataFrame
    pending: pl.DataFrame

    @classmethod
    def empty(cls) -> CounterState:
        return cls(
            pl.DataFrame(schema=_totals_schema("u_idx")),
            pl.DataFrame(schema=_totals_schema("i_idx")),
            pl.DataFrame(schema=PENDING_SCHEMA),
        )

    def totals(self, side: str) -> pl.DataFrame:
        return self.users if side == "user" else self.items


def action_events(labelled: pl.LazyFrame) -> pl.LazyFrame:
    """Like/finish events of labelled impressions, at their action time (never before the impression)."""
    return labelled.filter((pl.col("like") > 0) | (pl.col("finish") > 0)).select(
        "u_idx",
        "i_idx",
        pl.max_horizontal("action_ms", "ts_ms").alias("event_ms"),
        pl.col("like").cast(_COUNT_DTYPE).alias("likes"),
        pl.col("finish").cast(_COUNT_DTYPE).alias("finishes"),
    )


def _add_totals(totals: pl.LazyFrame, key: str, increments: list[pl.LazyFrame]) -> pl.LazyFrame:
    """totals + sum of increments per key (each frame: key + any of COUNTS)."""
    parts = [totals] + [
        inc.select(pl.col(key), *[(pl.col(c) if c in inc.collect_schema() else pl.lit(0)).cast(_COUNT_DTYPE).alias(c) for c in COUNTS])
        for inc in increments
    ]
    return pl.concat(parts).group_by(key).agg(pl.col(c).sum() for c in COUNTS)


@dataclass(frozen=True)
class DayCounters:
    """Lazy results of one day: per-impression counts (in `row` order) and the next day's state parts."""

    counts: pl.LazyFrame | None  # user_n, user_likes, ..., item_finishes; None in state-only mode
    user_totals: pl.LazyFrame
    item_totals: pl.LazyFrame
    pending: pl.LazyFrame


def _stream(key: str, totals: pl.LazyFrame, labelled: pl.LazyFrame, events: pl.LazyFrame, day_start_ms: int) -> pl.LazyFrame:
    """The sorted per-key stream with `before_<c>` (key's events strictly before the row's t) and the
    `_key_start` / `_key_end` flags `_key_totals` reads.

    Only the packed key, the counts and `row` go through the sort (the key is recovered from the
    packed value), because the sort moves every column it carries.
    """
    zero, one = pl.lit(0, _COUNT_DTYPE), pl.lit(1, _COUNT_DTYPE)
    no_row = pl.lit(None, pl.UInt32).alias("row")

    def packed(t: pl.Expr) -> pl.Expr:
        return (pl.col(key).cast(pl.UInt64) * (1 << _TIME_BITS) + (t + 1).cast(pl.UInt64)).alias("sk")

    rows = pl.concat(
        [
            totals.select(packed(pl.lit(-1, pl.Int64)), *[pl.col(c) for c in COUNTS], no_row),
            labelled.select(packed(pl.col("ts_ms") - day_start_ms), one.alias("n"), zero.alias("likes"), zero.alias("finishes"), "row"),
            events.select(packed(pl.col("event_ms") - day_start_ms), zero.alias("n"), "likes", "finishes", no_row),
        ]
    )
    # Single-threaded sorts: on the CPU the other core is busy reading the next day and writing
    # the previous one; a parallel sort there doubled this stage's CPU time for no wall-time gain.
    running = rows.sort("sk", multithreaded=False).with_columns(
        (pl.col("sk") // (1 << _TIME_BITS)).cast(pl.UInt32).alias(key),
        *[(pl.col(c).cum_sum() - pl.col(c)).alias(f"_before_{c}") for c in COUNTS],  # all rows before this one
    ).with_columns(
        (pl.col("sk") != pl.col("sk").shift(1)).fill_null(True).alias("_run_start"),
        (pl.col(key) != pl.col(key).shift(1)).fill_null(True).alias("_key_start"),
        (pl.col(key) != pl.col(key).shift(-1)).fill_null(True).alias("_key_end"),
    )

    def at(flag: str, c: str) -> pl.Expr:
        return pl.when(flag).then(pl.col(f"_before_{c}")).forward_fill()

    return running.with_columns(*[(at("_run_start", c) - at("_key_start", c)).alias(f"before_{c}") for c in COUNTS])


def _key_totals(stream: pl.LazyFrame, key: str) -> pl.LazyFrame:
    """key + COUNTS: each key's events up to its last row, from its first and last stream rows
    (two filters instead of a forward fill over the whole stream)."""
    first = stream.filter("_key_start").select(key, *[pl.col(f"_before_{c}").alias(f"_first_{c}") for c in COUNTS])
    last = stream.filter("_key_end").select(*[(pl.col(f"_before_{c}") + pl.col(c)).alias(f"_last_{c}") for c in COUNTS])
    return pl.concat([first, last], how="horizontal").select(
        key, *[(pl.col(f"_last_{c}") - pl.col(f"_first_{c}")).alias(c) for c in COUNTS]
    )


def day_counters(state: CounterState, labelled: pl.LazyFrame, day_start_ms: int, day_end_ms: int, with_counts: bool) -> DayCounters:
    """Counts for each labelled impression of the day (if `with_counts`) and the state after the day.

    `labelled` must have u_idx, i_idx, ts_ms, action_ms, like, finish and a 0..n-1 `row`.
    """
    events = pl.concat([state.pending.lazy(), action_events(labelled)])
    early = events.filter(pl.col("event_ms") < day_start_ms)  # only after a day with no impressions
    today = events.filter(pl.col("event_ms").is_between(day_start_ms, day_end_ms, closed="left"))
    pending = events.filter(pl.col("event_ms") >= day_end_ms)
    totals_out: dict[str, pl.LazyFrame] = {}
    counts: list[pl.LazyFrame] = []
    for side, key in SIDES.items():
        start = _add_totals(state.totals(side).lazy(), key, [early]) if state.pending.height else state.totals(side).lazy()
        if not with_counts:
            totals_out[side] = _add_totals(start, key, [labelled.select(key, pl.lit(1).alias("n")), today])
            continue
        stream = _stream(key, start, labelled, today, day_start_ms)
        counts.append(
            stream.filter(pl.col("row").is_not_null())
            .sort("row", multithreaded=False)
            .select(*[pl.col(f"before_{c}").alias(f"{side}_{c}") for c in COUNTS])
        )
        totals_out[side] = _key_totals(stream, key)
    return DayCounters(
        counts=pl.concat(counts, how="horizontal") if with_counts else None,
        user_totals=totals_out["user"],
        item_totals=totals_out["item"],
        pending=pending,
    )


__all__ = ["COUNTS", "PENDING_SCHEMA", "SIDES", "CounterState", "DayCounters", "action_events", "day_counters"]
