"""Dimension tables (users, items) with their sparse ids hashed once per row, ready to join.

Assumption (stated in the manifest): users and items are small next to the event logs (one row per
user or item, not per event), so they are loaded whole; only impressions and actions are streamed by
day. Strings are hashed through `string_hash_table` over the distinct values of these tables, and
integer ids through `hash_ids_expr`, here, once per user or item instead of once per impression:
the per-day pipeline then joins ready-made Int64 ids.

Each table also gets a dense row number (`u_idx`, `i_idx`): the point-in-time counters sort on
(index, time) packed into one 64-bit key, which is much cheaper than sorting on two 64-bit columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from gpurec.data.hashing import hash_ids_expr, string_hash_table


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


def _with_string_ids(frame: pl.DataFrame, columns: dict[str, str]) -> pl.DataFrame:
    """`frame` plus `sparse_<feature>` for each string column -> feature, joined from a hash table
    of the column's distinct values (row order kept)."""
    for column, feature in columns.items():
        table = string_hash_table(frame[column].unique().to_list(), feature, column)
        frame = frame.join(
            table.rename({f"{column}_hash": f"sparse_{feature}"}), on=column, how="left", maintain_order="left"
        )
    return frame


def _hashtag_lists(items: pl.DataFrame) -> pl.DataFrame:
    """item_id -> sparse_hashtags (list[Int64], tag order kept, empty list for no tags)."""
    tags = items.select("item_id", "hashtags").with_row_index("_item_row").explode("hashtags")
    table = string_hash_table(tags["hashtags"].drop_nulls().unique().to_list(), "hashtags", "hashtags")
    hashed = tags.join(table, on="hashtags", how="left", maintain_order="left")
    return (
        hashed.group_by("_item_row", maintain_order=True)
        .agg(pl.col("item_id").first(), pl.col("hashtags_hash").drop_nulls().alias("sparse_hashtags"))
        .drop("_item_row")
    )


def build_dimensions(users: pa.Table, items: pa.Table) -> Dimensions:
    """Dimension frames from validated users/items tables (duplicate ids: the last row wins)."""
    user_frame = pl.from_arrow(users).unique("user_id", keep="last", maintain_order=True)
    item_frame = pl.from_arrow(items).unique("item_id", keep="last", maintain_order=True)
    consenting = user_frame.filter(pl.col("consent_training"))
    users_dim = (
        _with_string_ids(consenting, {"region": "user_region", "device": "device", "language": "user_language"})
        .select(
            "user_id",
            hash_ids_expr(pl.col("user_id"), "user_id").alias("sparse_user_id"),
            "sparse_user_region",
            "sparse_device",
            "sparse_user_language",
        )
        .with_row_index("u_idx")
    )
    items_dim = (
        _with_string_ids(item_frame, {"language": "item_language"})
        .select(
            "item_id",
            "duration_ms",
            "upload_ts",
            hash_ids_expr(pl.col("item_id"), "item_id").alias("sparse_item_id"),
            hash_ids_expr(pl.col("author_id"), "author_id").alias("sparse_author_id"),
            "sparse_item_language",
        )
        .join(_hashtag_lists(item_frame), on="item_id", how="left", maintain_order="left")
        .with_columns(pl.col("sparse_hashtags").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
        .with_row_index("i_idx")
    )
    cardinality = {
        "users.user_id": consenting.height,
        "users.region": consenting["region"].n_unique(),
        "users.device": consenting["device"].n_unique(),
        "users.language": consenting["language"].n_unique(),
        "items.item_id": item_frame.height,
        "items.author_id": item_frame["author_id"].n_unique(),
        "items.language": item_frame["language"].n_unique(),
        "items.hashtags": item_frame["hashtags"].explode().drop_nulls().n_unique(),
    }
    return Dimensions(users_dim, items_dim, consenting["user_id"], cardinality)


__all__ = ["Dimensions", "build_dimensions"]
