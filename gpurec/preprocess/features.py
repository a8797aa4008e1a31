"""The feature contract: one declarative list of what the model sees, and how each value is made.

Everything downstream reads this list: the pipeline builds the columns from it, the manifest
describes it, the trainer takes its dense input order from `DENSE_FEATURES` (through the manifest)
and its embedding tables from `SPARSE_FEATURES`. Adding a feature means adding one entry here.

Dense features are point-in-time: the counters they are computed from (`user_n`, `user_likes`, ...)
count only events strictly before the impression's timestamp (see `gpurec.preprocess.counters`).
Sparse features are 64-bit ids from `gpurec.data.hashing`, salted by the feature name, so every
day, shard, engine and the serving path produce the same id for the same raw value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from gpurec.data.hashing import hash_ids_np

# Smoothed rates: (events + PRIOR_WEIGHT * prior) / (impressions + PRIOR_WEIGHT). A user or item
# with no history gets the prior; after a few dozen impressions its own rate dominates.
PRIOR_WEIGHT = 10.0
PRIOR_LIKE_RATE = 0.02
PRIOR_FINISH_RATE = 0.3
# An impression is "finished" when watch_ms >= FINISH_NUMERATOR / FINISH_DENOMINATOR * duration_ms,
# compared in integers so every engine and the pandas reference agree exactly.
FINISH_NUMERATOR = 9
FINISH_DENOMINATOR = 10

MS_PER_HOUR = 3_600_000

LABELS: tuple[str, ...] = ("like", "finish")
META_COLUMNS: tuple[str, ...] = ("request_id", "ts", "user_id", "item_id", "position")
"""Raw ids and context kept next to the features, for evaluation and popularity baselines; never inputs."""

HASHING_SCHEME = "gpurec.data.hashing/v1: splitmix64(id ^ salt(feature)) for ints, blake2b-64(feature, value) for strings"

# Counter columns the pipeline provides before the dense features are computed.
COUNTER_COLUMNS: tuple[str, ...] = ("user_n", "user_likes", "user_finishes", "item_n", "item_likes", "item_finishes")


def smoothed_rate(events: str, impressions: str, prior: float) -> pl.Expr:
    """(events + w * prior) / (impressions + w): a rate that starts at the prior instead of 0/0."""
    return (pl.col(events) + PRIOR_WEIGHT * prior) / (pl.col(impressions) + PRIOR_WEIGHT)


Kind = Literal["dense", "sparse"]


@dataclass(frozen=True)
class Feature:
    """One model input: its name, where it lives in the output files and how it is computed.

    `expr` builds the value from the labelled, counted impression frame (dense: float64 before the
    cast to float32; sparse: Int64 or list[Int64]). `cardinality` says where the manifest's
    cardinality estimate comes from: a dimension-table column (distinct values there), or a fixed
    number of possible values.
    """

    name: str
    kind: Kind
    expr: pl.Expr
    description: str
    multi_valued: bool = False
    cardinality: str | int | None = None

    @property
    def column(self) -> str:
        return f"{self.kind}_{self.name}"

    @property
    def dtype(self) -> str:
        if self.kind == "dense":
            return "float32"
        return "list[int64]" if self.multi_valued else "int64"

    @property
    def polars_dtype(self) -> pl.DataType:
        if self.kind == "dense":
            return pl.Float32()
        return pl.List(pl.Int64) if self.multi_valued else pl.Int64()


DENSE_FEATURES: tuple[Feature, ...] = (
    Feature("user_impressions", "dense", pl.col("user_n").log1p(), "log1p(user's prior impressions)"),
    Feature(
        "user_like_rate",
        "dense",
        smoothed_rate("user_likes", "user_n", PRIOR_LIKE_RATE),
        "user's smoothed like rate (likes counted at their action ts)",
    ),
    Feature(
        "user_finish_rate",
        "dense",
        smoothed_rate("user_finishes", "user_n", PRIOR_FINISH_RATE),
        "user's smoothed finish rate (finishes counted at their action ts)",
    ),
    Feature("item_impressions", "dense", pl.col("item_n").log1p(), "log1p(item's prior impressions)"),
    Feature(
        "item_like_rate",
        "dense",
        smoothed_rate("item_likes", "item_n", PRIOR_LIKE_RATE),
        "item's smoothed like rate",
    ),
    Feature(
        "item_finish_rate",
        "dense",
        smoothed_rate("item_finishes", "item_n", PRIOR_FINISH_RATE),
        "item's smoothed finish rate",
    ),
    Feature(
        "item_age_hours",
        "dense",
        ((pl.col("ts") - pl.col("upload_ts")).dt.total_milliseconds() / MS_PER_HOUR).clip(0.0).log1p(),
        "log1p(hours since upload at impression time), clipped at 0",
    ),
    Feature("duration_s", "dense", (pl.col("duration_ms") / 1000.0).log1p(), "log1p(item duration in seconds)"),
)

# Sparse ids of the dimension tables are hashed once per dimension row (see `dims.py`) and joined in;
# `expr` then only selects the column. The hour has 24 values: their ids are hashed once (the same
# `hash_ids` as everywhere) and looked up, which is ~8x cheaper than hashing every impression.
HOUR_IDS = pl.Series("hour_ids", hash_ids_np(np.arange(24), "hour"), dtype=pl.Int64)
SPARSE_FEATURES: tuple[Feature, ...] = (
    Feature("user_id", "sparse", pl.col("sparse_user_id"), "hashed user id", cardinality="users.user_id"),
    Feature("item_id", "sparse", pl.col("sparse_item_id"), "hashed item id", cardinality="items.item_id"),
    Feature("author_id", "sparse", pl.col("sparse_author_id"), "hashed creator id", cardinality="items.author_id"),
    Feature("user_region", "sparse", pl.col("sparse_user_region"), "user's region", cardinality="users.region"),
    Feature("device", "sparse", pl.col("sparse_device"), "user's device", cardinality="users.device"),
    Feature(
        "user_language", "sparse", pl.col("sparse_user_language"), "user's language", cardinality="users.language"
    ),
    Feature(
        "item_language", "sparse", pl.col("sparse_item_language"), "item's language", cardinality="items.language"
    ),
    Feature("hour", "sparse", pl.lit(HOUR_IDS).gather(pl.col("ts").dt.hour()), "UTC hour of the impression", cardinality=24),
    Feature(
        "hashtags",
        "sparse",
        pl.col("sparse_hashtags"),
        "item's hashtags (multi-valued)",
        multi_valued=True,
        cardinality="items.hashtags",
    ),
)

FEATURES: tuple[Feature, ...] = DENSE_FEATURES + SPARSE_FEATURES


def label_exprs() -> list[pl.Expr]:
    """like / finish as float32 0/1 from the joined action (no action row: both 0)."""
    finish = pl.col("watch_ms").cast(pl.Int64) * FINISH_DENOMINATOR >= pl.col("duration_ms").cast(pl.Int64) * FINISH_NUMERATOR
    return [
        pl.col("like").fill_null(False).cast(pl.Float32).alias("like"),
        (pl.col("watch_ms").is_not_null() & finish).fill_null(False).cast(pl.Float32).alias("finish"),
    ]


def output_exprs() -> list[pl.Expr]:
    """Every output column, in file order: meta, labels, dense (model order), sparse."""
    dense = [f.expr.cast(pl.Float32).alias(f.column) for f in DENSE_FEATURES]
    sparse = [f.expr.cast(f.polars_dtype).alias(f.column) for f in SPARSE_FEATURES]
    return [pl.col(c) for c in META_COLUMNS] + [pl.col(c) for c in LABELS] + dense + sparse


def output_schema() -> pl.Schema:
    """Schema of the feature files (used for empty days and by readers)."""
    meta = {"request_id": pl.Int64(), "ts": pl.Datetime("ms", "UTC"), "user_id": pl.Int64(), "item_id": pl.Int64(), "position": pl.Int32()}
    labels = dict.fromkeys(LABELS, pl.Float32())
    return pl.Schema({**meta, **labels, **{f.column: f.polars_dtype for f in FEATURES}})


__all__ = [
    "COUNTER_COLUMNS",
    "DENSE_FEATURES",
    "FEATURES",
    "FINISH_DENOMINATOR",
    "FINISH_NUMERATOR",
    "HASHING_SCHEME",
    "LABELS",
    "META_COLUMNS",
    "PRIOR_FINISH_RATE",
    "PRIOR_LIKE_RATE",
    "PRIOR_WEIGHT",
    "SPARSE_FEATURES",
    "Feature",
    "label_exprs",
    "output_exprs",
    "output_schema",
    "smoothed_rate",
]
