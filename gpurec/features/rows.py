"""User and item rows as both backends write and read them, and their assembly into model inputs.

A stored row is: the counters (`COUNTS`), the integer columns of `TableLayout.numeric_columns`
(raw dense dimension values, timestamps as epoch ms; single-valued sparse ids hashed when the row
was put; the consent flags of a user) and the multi-valued ids (`blob_columns`, the bytes of an
int64 array). Reads are columnar (one array per kind for all candidates), which keeps a
300-candidate request to a few numpy conversions instead of thousands of Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gpurec.data.hashing_core import PAD_ID, hash_raw_values
from gpurec.errors import InvalidInput
from gpurec.features.events import Batch, as_table, column, int_column
from gpurec.features.layout import Layout, TableLayout, unknown_sparse_id
from gpurec.features.store import FeatureRows
from gpurec.preprocess.counters import COUNTS

EMPTY_IDS = np.zeros(0, np.int64)
NON_PROFILED_USER_FEATURES: tuple[str, ...] = ("user_region", "user_language")
"""The only per-user inputs of a non-profiled request (a user without personalisation consent):
where and in which language they watch, so popular items of their region can be ranked; never
their id, device, counters or history."""


def encode_ids(ids: np.ndarray) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def decode_ids(data: bytes | None) -> np.ndarray:
    """The ids of `encode_ids` (a read-only view of `data`: no copy on a little-endian machine)."""
    return np.frombuffer(data, dtype="<i8") if data else EMPTY_IDS


@dataclass(frozen=True)
class DimensionRows:
    """Validated, hashed rows to put: keys, `numeric_columns` [N, K] int64, `blob_columns` by name."""

    keys: list[int]
    numeric: np.ndarray
    blobs: dict[str, list[bytes]]

    def __len__(self) -> int:
        return len(self.keys)


def dimension_rows(t: TableLayout, data: Batch) -> DimensionRows:
    """Rows of the users or items log, validated (the columns the store needs) and hashed.

    Several rows with one key: the last wins, as in preprocessing's dimension tables.
    """
    table = as_table(data, t.name)
    keys = int_column(table, t.key, t.name)
    last = np.sort(len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1])
    if len(last) < len(keys):
        table, keys = table.take(pa.array(last)), keys[last]
    sources = sorted({str(f.source_column) for f in t.sparse})
    hashed = t.hash_rows(pa.table({c: column(table, c, t.schema.field(c).type, t.name) for c in sources}))
    dims = [int_column(table, c, t.name) for c in t.dense_columns]
    if "duration_ms" in t.dense_columns and (dims[t.dense_columns.index("duration_ms")] < 0).any():
        raise InvalidInput(f"{t.name}: negative duration_ms")
    flags = [
        column(table, flag, t.schema.field(flag).type, t.name).to_numpy(zero_copy_only=False)
        for flag in t.flags
    ]
    numeric = [
        *dims,
        *(np.asarray(hashed[f.name], np.int64) for f in t.single),
        *(np.asarray(v, np.int64) for v in flags),
    ]
    matrix = np.stack(numeric, axis=1) if numeric else np.zeros((len(keys), 0), np.int64)
    blobs = {f"s_{f.name}": [encode_ids(ids) for ids in hashed[f.name]] for f in t.multi}
    return DimensionRows(keys.tolist(), matrix.astype(np.int64, copy=False), blobs)


@dataclass(frozen=True)
class StoredRows:
    """N rows as read back, aligned with the requested keys (unknown keys: `known` False, zeros)."""

    known: np.ndarray  # [N] bool
    counts: np.ndarray  # [N, len(COUNTS)] int64
    numeric: np.ndarray  # [N, len(numeric_columns)] int64
    blobs: dict[str, list[bytes | None]]

    @classmethod
    def from_found(cls, t: TableLayout, keys: list[int], found: list[tuple]) -> StoredRows:
        """From rows ``(key, *counts, *numeric, *blobs)`` of the keys that exist, in any order."""
        width = len(COUNTS) + len(t.numeric_columns)
        position = {row[0]: j for j, row in enumerate(found)}
        at = np.array([position.get(k, -1) for k in keys], np.int64)
        known = at >= 0
        values = np.zeros((len(keys), width), np.int64)
        if found:
            values[known] = np.array([row[1 : 1 + width] for row in found], np.int64).reshape(-1, width)[
                at[known]
            ]
        blobs = {
            name: [found[j][1 + width + b] if j >= 0 else None for j in at.tolist()]
            for b, name in enumerate(t.blob_columns)
        }
        return cls(known, values[:, : len(COUNTS)], values[:, len(COUNTS) :], blobs)


def assemble(
    layout: Layout,
    user_id: int,
    user: StoredRows,
    item_ids: np.ndarray,
    items: StoredRows,
    ts_ms: int,
    profiled: bool = True,
) -> FeatureRows:
    """The model inputs of one request (`user`: one row) from the stored rows; unknown rows get the
    defaults (counters 0, so the priors; ids per `unknown_sparse_id`; no consent).

    `profiled=False` (a user without personalisation consent): every per-user input is what an
    anonymous user gets (counters 0, so the priors; no dimension values; `PAD_ID` for the user's id,
    device and any other user feature), except `NON_PROFILED_USER_FEATURES` (region and language),
    taken from the profile. The user id is not hashed in (an unknown user's would be), so the
    inputs are the same for every user of one region and language. The consent flags and
    `user_known` stay the profile's: the caller needs them.
    """
    n = len(item_ids)
    user_known = bool(user.known[0])
    u_numeric = dict(zip(layout.users.numeric_columns, user.numeric[0].tolist(), strict=True))
    i_numeric = {c: items.numeric[:, j] for j, c in enumerate(layout.items.numeric_columns)}
    dense = layout.dense_matrix(
        user.counts[0] if profiled else np.zeros_like(user.counts[0]),
        items.counts,
        {c: u_numeric[f"d_{c}"] for c in layout.users.dense_columns},
        {c: i_numeric[f"d_{c}"] for c in layout.items.dense_columns},
        items.known,
        user_known and profiled,
        ts_ms,
    )
    sparse: dict[str, np.ndarray] = {}
    multi: dict[str, list[np.ndarray]] = {}
    for f in layout.users.single:
        if not profiled:
            kept = user_known and f.name in NON_PROFILED_USER_FEATURES
            value = u_numeric[f"s_{f.name}"] if kept else PAD_ID
        else:
            value = u_numeric[f"s_{f.name}"] if user_known else unknown_sparse_id(f, user_id, layout.users)
        sparse[f.name] = np.full(n, value, np.int64)
    for f in layout.users.multi:
        multi[f.name] = [decode_ids(user.blobs[f"s_{f.name}"][0]) if profiled else EMPTY_IDS] * n
    missing = np.flatnonzero(~items.known)
    for f in layout.items.single:
        ids = i_numeric[f"s_{f.name}"].copy()
        if missing.size and f.source_column == layout.items.key:
            ids[missing] = hash_raw_values(item_ids[missing].tolist(), f.name, str(f.raw))
        elif missing.size:
            ids[missing] = unknown_sparse_id(f, 0, layout.items)
        sparse[f.name] = ids
    for f in layout.items.multi:
        multi[f.name] = [decode_ids(blob) for blob in items.blobs[f"s_{f.name}"]]
    sparse.update(layout.hour_feature_ids(ts_ms, n))
    consent = [bool(u_numeric[flag]) if user_known else False for flag in layout.users.flags]
    return FeatureRows(
        item_ids,
        dense,
        {f.name: sparse[f.name] for f in layout.sparse if f.name in sparse},
        {f.name: multi[f.name] for f in layout.sparse if f.name in multi},
        consent[0],
        consent[1],
        user_known,
        items.known,
    )


__all__ = [
    "NON_PROFILED_USER_FEATURES",
    "DimensionRows",
    "StoredRows",
    "assemble",
    "decode_ids",
    "dimension_rows",
    "encode_ids",
]
