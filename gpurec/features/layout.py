"""What the online store keeps per user and item, derived from the one feature list.

Nothing here names a feature: the layout is read from `gpurec.preprocess.features` at import, so
adding a feature there changes what the store writes and reads (and the fingerprint below, so a
store built for another list is refused instead of serving wrong inputs).

- Counters: `COUNTER_COLUMNS` (``user_n``, ``item_likes``, ...) are ``<side>_<count>``, one
  integer per user and item per count of `gpurec.preprocess.counters.COUNTS`.
- Dense dimension columns: every other column a dense expression reads besides the request time
  ``ts`` is a column of the users or items log (an item's ``duration_ms`` and ``upload_ts``),
  stored raw (timestamps as epoch ms) and cast back to the log's type before evaluation.
- Sparse ids: features with a ``source`` column are hashed once when the user or item is put
  (as `dims.py` does once per dimension row), with the single raw hasher
  `gpurec.data.hashing_core.hash_raw_values`; the ``hour`` rule is hashed from the request time.

Dense values are computed by evaluating the features' own Polars expressions on a small frame of
the candidates' counters and dimension values: the same expressions, dtypes and float32 cast as
`output_exprs`, so online equals batch by construction (about 0.5 ms for 300 candidates).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import polars as pl
import pyarrow as pa

from gpurec.data.hashing_core import HOURS_PER_DAY, PAD_ID, hash_raw_values
from gpurec.data.schema import ITEMS, USERS
from gpurec.errors import InvalidInput
from gpurec.preprocess import features as feature_list
from gpurec.preprocess.counters import COUNTS
from gpurec.preprocess.features import HASHING_SCHEME, Feature

REQUEST_TS = "ts"
"""The dense expressions' name for the time the features are read at (the impression's ts in batch)."""
MISSING_DENSE_VALUE = 0.0
"""A dense feature whose dimension input is unknown (an item the store has not been given): log1p(0),
i.e. "just uploaded" for the item's age and "no length" for its duration. Counters of an unknown
user or item are 0, so their rates are the priors."""
MS_PER_HOUR = 3_600_000
SIDES: tuple[str, ...] = ("user", "item")
SCHEMAS: dict[str, pa.Schema] = {"users": USERS, "items": ITEMS}
KEYS: dict[str, str] = {"users": "user_id", "items": "item_id"}
# The finish label needs the item's duration whether or not a dense feature reads it.
ALWAYS_STORED: dict[str, tuple[str, ...]] = {"users": (), "items": ("duration_ms",)}
CONSENT_FLAGS: tuple[str, ...] = ("consent_personalisation", "consent_training")


@dataclass(frozen=True)
class TableLayout:
    """One dimension table: its key, the raw columns kept for dense features, and its sparse features."""

    name: str
    key: str
    dense_columns: tuple[str, ...]
    sparse: tuple[Feature, ...]

    @property
    def schema(self) -> pa.Schema:
        return SCHEMAS[self.name]

    @property
    def flags(self) -> tuple[str, ...]:
        return CONSENT_FLAGS if self.name == "users" else ()

    @property
    def single(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.sparse if not f.multi_valued)

    @property
    def multi(self) -> tuple[Feature, ...]:
        return tuple(f for f in self.sparse if f.multi_valued)

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """Stored integer columns besides the counters: ``d_<column>``, ``s_<feature>``, the flags."""
        return (*(f"d_{c}" for c in self.dense_columns), *(f"s_{f.name}" for f in self.single), *self.flags)

    @property
    def blob_columns(self) -> tuple[str, ...]:
        """Stored multi-valued ids (int64 little-endian bytes): ``s_<feature>``."""
        return tuple(f"s_{f.name}" for f in self.multi)

    def polars_dtype(self, column: str) -> pl.DataType:
        return pl.from_arrow(pa.array([], type=self.schema.field(column).type)).dtype

    def hash_rows(self, table: pa.Table) -> dict[str, list[int] | list[np.ndarray]]:
        """Sparse ids of every row of `table` per feature: ints, or int64 arrays for multi-valued ones.

        Null elements of a list are dropped, as preprocessing does (an empty list stays empty).
        """
        out: dict[str, list[int] | list[np.ndarray]] = {}
        for feature in self.sparse:
            values = table.column(str(feature.source_column)).to_pylist()
            if not feature.multi_valued:
                out[feature.name] = hash_raw_values(values, feature.name, str(feature.raw)).tolist()
                continue
            rows = [[v for v in row if v is not None] for row in values]
            ids = hash_raw_values([v for row in rows for v in row], feature.name, str(feature.raw))
            out[feature.name] = np.split(ids, np.cumsum([len(row) for row in rows])[:-1]) if rows else []
        return out


def _dense_dimension_columns() -> dict[str, tuple[str, ...]]:
    """Dimension columns the dense expressions read, by table (refuses one that is in neither or both)."""
    read = {name for f in feature_list.DENSE_FEATURES for name in f.expr.meta.root_names()}
    counters = {f"{side}_{count}" for side in SIDES for count in COUNTS}
    if set(feature_list.COUNTER_COLUMNS) != counters:
        raise InvalidInput(
            f"COUNTER_COLUMNS {feature_list.COUNTER_COLUMNS} are not <side>_<count> for {SIDES} x {COUNTS}"
        )
    out: dict[str, list[str]] = {table: list(ALWAYS_STORED[table]) for table in SCHEMAS}
    for column in sorted(read - counters - {REQUEST_TS}):
        tables = [t for t, schema in SCHEMAS.items() if column in schema.names]
        if len(tables) != 1:
            raise InvalidInput(
                f"dense features read {column!r}, which the online store cannot place: it is in {tables or 'no'} log schema"
            )
        if column not in out[tables[0]]:
            out[tables[0]].append(column)
    return {table: tuple(columns) for table, columns in out.items()}


@dataclass(frozen=True)
class Layout:
    """The store's view of the feature list: tables, request-time features and dense expressions."""

    users: TableLayout
    items: TableLayout
    hour_features: tuple[Feature, ...]
    dense: tuple[Feature, ...]
    sparse: tuple[Feature, ...]

    @classmethod
    def from_features(cls) -> Layout:
        dense_columns = _dense_dimension_columns()
        by_table: dict[str, list[Feature]] = {"users": [], "items": []}
        hours = []
        for f in feature_list.SPARSE_FEATURES:
            if f.source_table in by_table:
                if str(f.source_column) not in SCHEMAS[str(f.source_table)].names:
                    raise InvalidInput(
                        f"feature {f.name!r}: source {f.source!r} is not a column of the {f.source_table} log"
                    )
                by_table[str(f.source_table)].append(f)
            elif f.source is None and f.raw == "hour":
                hours.append(f)
            else:
                raise InvalidInput(
                    f"the online store cannot serve sparse feature {f.name!r} (raw {f.raw!r}, source {f.source!r})"
                )
        tables = {t: TableLayout(t, KEYS[t], dense_columns[t], tuple(by_table[t])) for t in SCHEMAS}
        return cls(
            tables["users"],
            tables["items"],
            tuple(hours),
            feature_list.DENSE_FEATURES,
            feature_list.SPARSE_FEATURES,
        )

    def table(self, name: str) -> TableLayout:
        return self.users if name == "users" else self.items

    @cached_property
    def fingerprint(self) -> str:
        """Changes whenever what the store keeps or how it hashes changes (checked when a store opens)."""
        spec = {
            "hashing": HASHING_SCHEME,
            "counts": list(COUNTS),
            **{
                t.name: {
                    "dense": list(t.dense_columns),
                    "sparse": [[f.name, f.raw, f.source, f.multi_valued] for f in t.sparse],
                }
                for t in (self.users, self.items)
            },
            "hour": [f.name for f in self.hour_features],
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def hour_ids(self) -> dict[str, np.ndarray]:
        """feature -> the 24 ids of the hours of day, hashed once (as features.py does)."""
        return {
            f.name: hash_raw_values(list(range(HOURS_PER_DAY)), f.name, "hour") for f in self.hour_features
        }

    @cached_property
    def _dense_exprs(self) -> list[pl.Expr]:
        # Exactly what `output_exprs` writes: the feature's expression, cast to float32.
        return [f.expr.cast(pl.Float32).fill_null(MISSING_DENSE_VALUE).alias(f.column) for f in self.dense]

    def dense_matrix(
        self,
        user_counts: np.ndarray,
        item_counts: np.ndarray,
        user_dims: Mapping[str, np.ndarray],
        item_dims: Mapping[str, np.ndarray],
        item_known: np.ndarray,
        user_known: bool,
        ts_ms: int,
    ) -> np.ndarray:
        """[N, D] float32 in `DENSE_FEATURES` order for one user and N candidates.

        `user_counts`: [len(COUNTS)] ints; `item_counts`: [N, len(COUNTS)]; `*_dims`: raw dimension
        columns (epoch ms for timestamps), [N] for items, one value for the user; rows of unknown
        items (and an unknown user's columns) are null, which `MISSING_DENSE_VALUE` replaces.
        """
        n = len(item_counts)
        columns: list[pl.Series] = [
            pl.Series(REQUEST_TS, np.full(n, ts_ms, np.int64)).cast(pl.Datetime("ms", "UTC"))
        ]
        for i, count in enumerate(COUNTS):
            columns.append(pl.Series(f"user_{count}", np.full(n, user_counts[i], np.int64)))
            columns.append(pl.Series(f"item_{count}", item_counts[:, i].astype(np.int64)))
        for column in self.users.dense_columns:
            raw = pa.array(
                np.full(n, user_dims[column] if user_known else 0, np.int64), mask=np.full(n, not user_known)
            )
            columns.append(pl.Series(column, raw).cast(self.users.polars_dtype(column)))
        for column in self.items.dense_columns:
            raw = pa.array(np.asarray(item_dims[column], np.int64), mask=~item_known)
            columns.append(pl.Series(column, raw).cast(self.items.polars_dtype(column)))
        return pl.DataFrame(columns).select(self._dense_exprs).to_numpy().astype(np.float32, copy=False)

    def hour_feature_ids(self, ts_ms: int, n: int) -> dict[str, np.ndarray]:
        hour = (ts_ms // MS_PER_HOUR) % HOURS_PER_DAY
        return {name: np.full(n, ids[hour], np.int64) for name, ids in self.hour_ids.items()}


def unknown_sparse_id(feature: Feature, key_value: int, table: TableLayout) -> int:
    """A sparse id for a user or item the store does not know: its own id hashed (the raw value is
    the requested id), `PAD_ID` for anything else (no raw value hashes to it, so the model's id map
    treats it as out of vocabulary)."""
    if feature.source_column == table.key:
        return int(hash_raw_values([key_value], feature.name, str(feature.raw))[0])
    return PAD_ID


__all__ = ["CONSENT_FLAGS", "MISSING_DENSE_VALUE", "REQUEST_TS", "Layout", "TableLayout", "unknown_sparse_id"]
