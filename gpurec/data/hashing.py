"""Stable 64-bit feature hashing, identical in Polars (CPU or GPU engine), numpy and Python.

Sparse features become 64-bit ids without a vocabulary: each partition, each serving request,
each stream event hashes its raw values on its own and gets the same ids. That needs a hash that
never changes between library versions or engines, so neither Polars' `hash()` (unstable across
versions, different on the cuDF engine) nor Python's `hash()` (salted per process) will do.

- Integer ids: splitmix64(raw XOR salt(feature)), written with plain wrapping uint64 arithmetic
  (multiply, xor, shift as floor-division by a power of two), which every engine runs alike.
- Strings: the first 8 bytes of blake2b(feature, value). Strings live in small dimension tables
  (regions, languages, hashtags), so their distinct values are hashed on the host and joined in.

Salting by feature keeps the same raw value in two features (user 7, author 7) apart when
tables are shared. No function here returns the padding id `PAD_ID`: a hash equal to it becomes
`PAD_FOLD_ID` (see `hashing_core`), in Polars exactly as in numpy and Python.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

# The numpy/hashlib part lives in hashing_core (importable without Polars); re-exported here.
from gpurec.data.hashing_core import (
    _GOLDEN,
    _M1,
    _M2,
    PAD_FOLD_ID,
    PAD_ID,
    RAW_RULES,
    feature_salt,
    hash_id,
    hash_ids_np,
    hash_raw_values,
    hash_string,
    splitmix64,
)

__all__ = [
    "PAD_FOLD_ID",
    "PAD_ID",
    "RAW_RULES",
    "feature_salt",
    "hash_id",
    "hash_ids_expr",
    "hash_ids_np",
    "hash_raw_values",
    "hash_string",
    "splitmix64",
    "string_hash_table",
]


def _shr(x: pl.Expr, bits: int) -> pl.Expr:
    return x // pl.lit(1 << bits, dtype=pl.UInt64)


def hash_ids_expr(expr: pl.Expr, feature: str) -> pl.Expr:
    """`hash_id` as a Polars expression over an integer column; returns Int64 (never `PAD_ID`)."""
    u64 = pl.UInt64
    x = expr.cast(pl.Int64).reinterpret(signed=False).xor(pl.lit(feature_salt(feature), dtype=u64))
    x = x + pl.lit(_GOLDEN, dtype=u64)
    x = x.xor(_shr(x, 30)) * pl.lit(_M1, dtype=u64)
    x = x.xor(_shr(x, 27)) * pl.lit(_M2, dtype=u64)
    x = x.xor(_shr(x, 31)).reinterpret(signed=True)
    # name.keep: the input column's name, as before the fold (when/then would name it "literal")
    return pl.when(x == PAD_ID).then(pl.lit(PAD_FOLD_ID, dtype=pl.Int64)).otherwise(x).name.keep()


def string_hash_table(values: Iterable[str], feature: str, column: str = "value") -> pl.DataFrame:
    """A (column, `<column>_hash`) frame mapping each distinct string to its id, for joining."""
    distinct = sorted({v for v in values if v is not None})
    return pl.DataFrame(
        {column: distinct, f"{column}_hash": [hash_string(v, feature) for v in distinct]},
        schema={column: pl.String, f"{column}_hash": pl.Int64},
    )
