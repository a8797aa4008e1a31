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
tables are shared.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import polars as pl

_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def feature_salt(feature: str) -> int:
    """A fixed 64-bit salt per feature name."""
    return int.from_bytes(
        hashlib.blake2b(feature.encode(), digest_size=8, person=b"gpurec-salt").digest(), "little"
    )


def _to_signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def splitmix64(x: int) -> int:
    """Reference scalar splitmix64 finaliser (uint64 in, uint64 out)."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def hash_id(value: int, feature: str) -> int:
    """Hash one integer id of `feature` to a signed 64-bit id."""
    return _to_signed(splitmix64((value & _MASK) ^ feature_salt(feature)))


def hash_ids_np(values: np.ndarray, feature: str) -> np.ndarray:
    """Vectorised `hash_id` over an integer array; returns int64."""
    x = np.asarray(values).astype(np.int64).view(np.uint64) ^ np.uint64(feature_salt(feature))
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        x = x ^ (x >> np.uint64(31))
    return x.view(np.int64)


def _shr(x: pl.Expr, bits: int) -> pl.Expr:
    return x // pl.lit(1 << bits, dtype=pl.UInt64)


def hash_ids_expr(expr: pl.Expr, feature: str) -> pl.Expr:
    """`hash_id` as a Polars expression over an integer column; returns Int64."""
    u64 = pl.UInt64
    x = expr.cast(pl.Int64).reinterpret(signed=False).xor(pl.lit(feature_salt(feature), dtype=u64))
    x = x + pl.lit(_GOLDEN, dtype=u64)
    x = x.xor(_shr(x, 30)) * pl.lit(_M1, dtype=u64)
    x = x.xor(_shr(x, 27)) * pl.lit(_M2, dtype=u64)
    x = x.xor(_shr(x, 31))
    return x.reinterpret(signed=True)


def hash_string(value: str, feature: str) -> int:
    """Hash one string value of `feature` to a signed 64-bit id."""
    digest = hashlib.blake2b(value.encode(), digest_size=8, key=feature.encode()[:64]).digest()
    return int.from_bytes(digest, "little", signed=True)


def string_hash_table(values: Iterable[str], feature: str, column: str = "value") -> pl.DataFrame:
    """A (column, `<column>_hash`) frame mapping each distinct string to its id, for joining."""
    distinct = sorted({v for v in values if v is not None})
    return pl.DataFrame(
        {column: distinct, f"{column}_hash": [hash_string(v, feature) for v in distinct]},
        schema={column: pl.String, f"{column}_hash": pl.Int64},
    )
