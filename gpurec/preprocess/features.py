"""The feature contract: one declarative list of what the model sees, and how each value is made.

Everything downstream reads this list: the pipeline builds the columns from it, the manifest
describes it, the trainer takes its dense input order from `DENSE_FEATURES` (through the manifest)
and its embedding tables from `SPARSE_FEATURES`. Adding a feature means adding one entry here.

Dense features are point-in-time: the counters they are computed from (`user_n`, `user_likes`, ...)
count only events strictly before the impression's timestamp (see `gpurec.preprocess.counters`).
Sparse features are 64-bit ids from `gpurec.data.hashing`, salted by the feature name, so every
day, shard, engine and the serving path produce the same id for the same raw value. Each sparse
feature declares how its raw value is hashed (`raw`: an integer id, a string, or the hour of day of
the impression's timestamp) and, for values from a dimension table, which column holds it
(`source`); `dims.py` hashes those columns from this list, and the serving contract records the
rules (`raw_hashing_rules`, written into `contract.json` at export) for the request hasher
`gpurec.serve.contract.hash_raw_features`, which the client uses too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from gpurec.data.hashing import RAW_RULES, hash_raw_values
from gpurec.data.hashing_core import HOURS_PER_DAY, RawRule
from gpurec.errors import InvalidInput

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

HASHING_SCHEME = (
    "gpurec.data.hashing/v1: splitmix64(id ^ salt(feature)) for ints, blake2b-64(feature, value) for strings;"
    " a hash equal to the padding id -1 is -2"
)

# Counter columns the pipeline provides before the dense features are computed.
COUNTER_COLUMNS: tuple[str, ...] = ("user_n", "user_likes", "user_finishes", "item_n", "item_likes", "item_finishes")


def smoothed_rate(events: str, impressions: str, prior: float) -> pl.Expr:
    """(events + w * prior) / (impressions + w): a rate that starts at the prior instead of 0/0."""
    return (pl.col(events) + PRIOR_WEIGHT * prior) / (pl.col(impressions) + PRIOR_WEIGHT)


Kind = Literal["dense", "sparse"]
DIMENSION_TABLES: tuple[str, ...] = ("users", "items")


@dataclass(frozen=True)
class Feature:
    """One model input: its name, where it lives in the output files and how it is computed.

    `expr` builds the value from the labelled, counted impression frame (dense: float64 before the
    cast to float32; sparse: Int64 or list[Int64]). `cardinality` says where the manifest's
    cardinality estimate comes from: a dimension-table column (distinct values there), or a fixed
    number of possible values. Sparse only: `raw` is how a raw value becomes an id (one of
    `RAW_RULES`), `source` the ``table.column`` of a dimension table holding the raw value (hashed
    there once per row by `dims.py`; also the default `cardinality`).
    """

    name: str
    kind: Kind
    expr: pl.Expr
    description: str
    multi_valued: bool = False
    cardinality: str | int | None = None
    raw: RawRule | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "dense" and (self.raw is not None or self.source is not None):
            raise InvalidInput(f"dense feature {self.name!r} has no raw hashing rule or source column")
        if self.kind == "sparse" and self.raw not in RAW_RULES:
            raise InvalidInput(f"sparse feature {self.name!r} needs raw= one of {RAW_RULES}, got {self.raw!r}")
        if self.source is not None:
            table, _, column = self.source.partition(".")
            if table not in DIMENSION_TABLES or not column:
                raise InvalidInput(f"feature {self.name!r}: source must be <{'|'.join(DIMENSION_TABLES)}>.<column>, got {self.source!r}")
            if self.cardinality is None:
                object.__setattr__(self, "cardinality", self.source)

    @property
    def source_table(self) -> str | None:
        return self.source.partition(".")[0] if self.source else None

    @property
    def source_column(self) -> str | None:
        return self.source.partition(".")[2] if self.source else None

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

def dimension_feature(name: str, source: str, raw: RawRule, description: str, multi_valued: bool = False) -> Feature:
    """A sparse feature whose raw value is the dimension-table column `source` (``users.region``).

    `dims.py` hashes that column by `raw` once per user or item and joins the ids in as
    ``sparse_<name>``; `expr` then only selects that column.
    """
    return Feature(name, "sparse", pl.col(f"sparse_{name}"), description, multi_valued, raw=raw, source=source)


# The hour has 24 values: their ids are hashed once (by the serving path's own raw hasher) and
# looked up, which is ~8x cheaper than hashing every impression.
HOUR_IDS = pl.Series("hour_ids", hash_raw_values(np.arange(HOURS_PER_DAY).tolist(), "hour", "hour"), dtype=pl.Int64)
SPARSE_FEATURES: tuple[Feature, ...] = (
    dimension_feature("user_id", "users.user_id", "int", "hashed user id"),
    dimension_feature("item_id", "items.item_id", "int", "hashed item id"),
    dimension_feature("author_id", "items.author_id", "int", "hashed creator id"),
    dimension_feature("user_region", "users.region", "string", "user's region"),
    dimension_feature("device", "users.device", "string", "user's device"),
    dimension_feature("user_language", "users.language", "string", "user's language"),
    dimension_feature("item_language", "items.language", "string", "item's language"),
    Feature(
        "hour",
        "sparse",
        pl.lit(HOUR_IDS).gather(pl.col("ts").dt.hour()),
        "UTC hour of the impression",
        cardinality=HOURS_PER_DAY,
        raw="hour",
    ),
    dimension_feature("hashtags", "items.hashtags", "string", "item's hashtags (multi-valued)", multi_valued=True),
)

FEATURES: tuple[Feature, ...] = DENSE_FEATURES + SPARSE_FEATURES


def raw_hashing_rules(names: Iterable[str] | None = None) -> dict[str, str]:
    """Sparse feature name -> raw hashing rule, from `SPARSE_FEATURES` (those in `names`, if given).

    What `contract.json` records as ``raw_hashing`` at export, so a client hashes raw request
    values exactly as preprocessing did without importing this (Polars) module.
    """
    wanted = None if names is None else set(names)
    return {f.name: str(f.raw) for f in SPARSE_FEATURES if wanted is None or f.name in wanted}


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
    "DIMENSION_TABLES",
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
    "dimension_feature",
    "label_exprs",
    "output_exprs",
    "output_schema",
    "raw_hashing_rules",
    "smoothed_rate",
]
