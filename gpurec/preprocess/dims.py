"""Dimension tables (users, items) with their sparse ids hashed once per row, ready to join.

Assumption (stated in the manifest): users and items are small next to the event logs (one row per
user or item, not per event), so they are loaded whole; only impressions and actions are streamed by
day. Which columns are hashed, and how, comes from the feature list: every sparse feature with a
`source` column (``users.region``) gets ``sparse_<name>`` here, hashed by its `raw` rule, once per
user or item instead of once per impression, so the per-day pipeline joins ready-made Int64 ids.
Integers go through `hash_ids_expr`, strings through `string_hash_table` over the distinct values;
list columns (hashtags) are hashed element-wise into list[Int64]. The dimension columns the dense
features read (an item's duration and upload time) are kept as they are.

Each table also gets a dense row number (`u_idx`, `i_idx`): the point-in-time counters sort on
(index, time) packed into one 64-bit key, which is much cheaper than sorting on two 64-bit columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from gpurec.data.hashing import hash_ids_expr, string_hash_table
from gpurec.errors import InvalidInput
from gpurec.preprocess import features as feature_list  # read at call time: the list is the source
from gpurec.preprocess.features import Feature


@dataclass(frozen=True)
class Dimensions:
    """`users`: consenting users only (joining on it is the consent filter); `items`: every valid item."""

    users: pl.DataFrame
    items: pl.DataFrame
    consenting_user_ids: pl.Series
    cardinality: dict[str, int]

    @property
    def user_feature_columns(self) -> list[str]:
        """Columns gathered onto each impression from its user's row."""
        return [c for c in self.users.columns if c not in ("u_idx", "user_id")]

    @property
    def item_feature_columns(self) -> list[str]:
        return [c for c in self.items.columns if c not in ("i_idx", "item_id")]


def _hash_scalars(frame: pl.DataFrame, column: str, feature: Feature) -> pl.Series:
    """Ids of `frame[column]` (one per row, null stays null) hashed by `feature.raw`."""
    if feature.raw == "int":
        return frame.select(hash_ids_expr(pl.col(column), feature.name)).to_series()
    if feature.raw == "string":
        table = string_hash_table(frame[column].drop_nulls().unique().to_list(), feature.name, column)
        return frame.select(column).join(table, on=column, how="left", maintain_order="left")[f"{column}_hash"]
    raise InvalidInput(f"feature {feature.name!r}: raw rule {feature.raw!r} cannot hash the dimension column {feature.source!r}")


def _hashed_column(frame: pl.DataFrame, feature: Feature) -> pl.Series:
    """``sparse_<name>`` for each row of `frame`, from the feature's source column (row order kept).

    A list column is hashed element-wise (element order kept; no or null elements: an empty list).
    """
    column = feature.source_column
    assert column is not None
    if column not in frame.columns:
        raise InvalidInput(f"feature {feature.name!r}: source column {feature.source!r} is not in the {feature.source_table} table")
    if not feature.multi_valued:
        return _hash_scalars(frame, column, feature).alias(f"sparse_{feature.name}")
    elements = frame.select(column).with_row_index("_row").explode(column)
    hashed = elements.with_columns(_hash_scalars(elements, column, feature).alias("_id"))
    lists = hashed.group_by("_row", maintain_order=True).agg(pl.col("_id").drop_nulls()).sort("_row")
    return lists["_id"].cast(pl.List(pl.Int64)).alias(f"sparse_{feature.name}")


def _dimension_frame(frame: pl.DataFrame, table: str, key: str) -> pl.DataFrame:
    """`key`, the columns the dense features read, and ``sparse_<name>`` of every feature sourced
    from `table`, in feature-list order."""
    dense_inputs = {c for f in feature_list.DENSE_FEATURES for c in f.expr.meta.root_names()}
    kept = [c for c in frame.columns if c in dense_inputs and c != key]
    sparse = [_hashed_column(frame, f) for f in feature_list.SPARSE_FEATURES if f.source_table == table]
    return frame.select(key, *kept).with_columns(sparse)


def _cardinality(frames: dict[str, pl.DataFrame]) -> dict[str, int]:
    """Distinct raw values of each source column (list columns: distinct elements)."""
    out = {}
    for f in feature_list.SPARSE_FEATURES:
        if f.source is None:
            continue
        values = frames[str(f.source_table)][str(f.source_column)]
        out[f.source] = values.explode().drop_nulls().n_unique() if f.multi_valued else values.n_unique()
    return out


def build_dimensions(users: pa.Table, items: pa.Table) -> Dimensions:
    """Dimension frames from validated users/items tables (duplicate ids: the last row wins)."""
    user_frame = pl.from_arrow(users).unique("user_id", keep="last", maintain_order=True)
    item_frame = pl.from_arrow(items).unique("item_id", keep="last", maintain_order=True)
    consenting = user_frame.filter(pl.col("consent_training"))
    users_dim = _dimension_frame(consenting, "users", "user_id").with_row_index("u_idx")
    items_dim = _dimension_frame(item_frame, "items", "item_id").with_row_index("i_idx")
    cardinality = _cardinality({"users": consenting, "items": item_frame})
    return Dimensions(users_dim, items_dim, consenting["user_id"], cardinality)


__all__ = ["Dimensions", "build_dimensions"]
