"""The per-day lazy Polars pipeline: label, count, featurise one day of impressions.

One plan, two engines: the same LazyFrames are collected on the CPU or by cudf-polars, so nothing in
here may be a Python UDF. A day is the unit of memory: its impressions, the actions of that day and
the next (late actions), the dimension tables and the counter state.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from gpurec.data.schema import MS_PER_DAY, day_start_ms
from gpurec.preprocess.counters import CounterState, day_counters
from gpurec.preprocess.dims import Dimensions
from gpurec.preprocess.engine import EngineChoice
from gpurec.preprocess.features import label_exprs, output_exprs


def keyed_impressions(impressions: pl.LazyFrame, dims: Dimensions) -> pl.LazyFrame:
    """Impressions of consenting users and known items in time order, with their dense dimension
    indexes (`u_idx`, `i_idx`) and a 0..n-1 `row`.

    Index lookups are order-preserving hash lookups (`replace_strict`) rather than joins: a join
    scrambles row order and restoring it costs a sort of every column.
    """
    users, items = dims.users, dims.items
    return (
        impressions.sort("ts", maintain_order=True)
        .with_columns(
            pl.col("user_id").replace_strict(users["user_id"], users["u_idx"], default=None).alias("u_idx"),
            pl.col("item_id").replace_strict(items["item_id"], items["i_idx"], default=None).alias("i_idx"),
        )
        .filter(pl.col("u_idx").is_not_null() & pl.col("i_idx").is_not_null())
        .with_row_index("row")
    )


def matched_actions(keyed: pl.LazyFrame, actions: pl.LazyFrame) -> pl.LazyFrame:
    """row, request_id, item_id + action_ts, watch_ms, like, in `row` order (nulls: no action row).

    The join runs on the three key columns only and is put back in order by a narrow sort: joining
    the wide frame would copy every column (the hashtag lists too) through the join.
    """
    return (
        keyed.select("row", "request_id", "item_id")
        .join(
            actions.select("request_id", "item_id", pl.col("ts").alias("action_ts"), "watch_ms", "like"),
            on=["request_id", "item_id"],
            how="left",
        )
        .sort("row")  # no projection after this: Polars then plans an order-keeping join, 3x slower
    )


def labelled_impressions(keyed: pl.LazyFrame, matched: pl.LazyFrame, dims: Dimensions) -> pl.LazyFrame:
    """Keyed impressions + their actions + dimension features (gathered by index) + labels."""
    users, items = dims.users, dims.items
    user_columns = [pl.lit(users[c]).gather(pl.col("u_idx")).alias(c) for c in dims.user_feature_columns]
    item_columns = [pl.lit(items[c]).gather(pl.col("i_idx")).alias(c) for c in dims.item_feature_columns]
    return (
        pl.concat([keyed, matched.select("action_ts", "watch_ms", "like")], how="horizontal")
        .with_columns(*user_columns, *item_columns)
        .with_columns(
            *label_exprs(),
            pl.col("ts").dt.epoch("ms").alias("ts_ms"),
            pl.col("action_ts").dt.epoch("ms").alias("action_ms"),
        )
    )


@dataclass(frozen=True)
class DayOutput:
    """One day's features (None in state-only mode), its row counts and the state after it."""

    features: pl.DataFrame | None
    rows_valid: int
    excluded_no_consent: int
    excluded_unknown_item: int
    state: CounterState


def process_day(
    day: str,
    impressions: pl.DataFrame,
    actions: pl.DataFrame,
    dims: Dimensions,
    state: CounterState,
    engine: EngineChoice,
    with_features: bool = True,
) -> DayOutput:
    """Run one day: `actions` are the (validated) actions of `day` and the next day.

    If the same (request_id, item_id) has several action rows, the last one in log order wins
    (detected from the join's row count, so the common case pays nothing for it).
    """
    start = day_start_ms(day)
    # Joins, gathers and the state-only group_by run faster on the streaming engine, the sorted
    # counter streams on the in-memory one (measured on the CPU; on the GPU both are cudf-polars).
    streaming, in_memory = engine.polars_engine(streaming=True), engine.polars_engine()
    keyed_plan = keyed_impressions(impressions.lazy(), dims)
    keyed, matched = pl.collect_all([keyed_plan, matched_actions(keyed_plan, actions.lazy())], engine=streaming)
    if matched.height != keyed.height:  # an impression matched several action rows
        deduped = actions.unique(["request_id", "item_id"], keep="last", maintain_order=True)
        matched = matched_actions(keyed.lazy(), deduped.lazy()).collect(engine=streaming)
    labelled = labelled_impressions(keyed.lazy(), matched.lazy(), dims).collect(engine=streaming)
    no_consent = impressions.select((~pl.col("user_id").is_in(dims.consenting_user_ids.implode())).sum()).item()
    counters = day_counters(state, labelled.lazy(), start, start + MS_PER_DAY, with_counts=with_features)
    features = None
    if counters.counts is not None:
        plan = pl.concat([labelled.lazy(), counters.counts], how="horizontal").select(output_exprs())
        features, users, items, pending = pl.collect_all(
            [plan, counters.user_totals, counters.item_totals, counters.pending], engine=in_memory
        )
    else:
        users, items, pending = pl.collect_all(
            [counters.user_totals, counters.item_totals, counters.pending], engine=streaming
        )
    return DayOutput(
        features=features,
        rows_valid=impressions.height,
        excluded_no_consent=int(no_consent),
        excluded_unknown_item=impressions.height - int(no_consent) - labelled.height,
        state=CounterState(users, items, pending),
    )


__all__ = ["DayOutput", "keyed_impressions", "labelled_impressions", "matched_actions", "process_day"]
