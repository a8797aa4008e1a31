"""The numpy-only half of `gpurec.data.hashing`: what a serving client needs to hash raw values.

Split from `hashing.py` so that `gpurec.client` (numpy + tritonclient only) can hash ids exactly
as preprocessing does without importing Polars; `gpurec.data.hashing` re-exports every name
here, so the scheme still lives (and is pinned by tests) in one place.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def feature_salt(feature: str) -> int:
    """A fixed 64-bit salt per feature name."""
    return int.from_bytes(
        hashlib.blake2b(feature.encode(), digest_size=8, person=b"gpurec-salt").digest(), "little"
    )


def to_signed(u: int) -> int:
    """A uint64 value as the signed int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def splitmix64(x: int) -> int:
    """Reference scalar splitmix64 finaliser (uint64 in, uint64 out)."""
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def hash_id(value: int, feature: str) -> int:
    """Hash one integer id of `feature` to a signed 64-bit id."""
    return to_signed(splitmix64((value & _MASK) ^ feature_salt(feature)))


def hash_ids_np(values: np.ndarray, feature: str) -> np.ndarray:
    """Vectorised `hash_id` over an integer array; returns int64."""
    x = np.asarray(values).astype(np.int64).view(np.uint64) ^ np.uint64(feature_salt(feature))
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        x = x ^ (x >> np.uint64(31))
    return x.view(np.int64)


def hash_string(value: str, feature: str) -> int:
    """Hash one string value of `feature` to a signed 64-bit id."""
    digest = hashlib.blake2b(value.encode(), digest_size=8, key=feature.encode()[:64]).digest()
    return int.from_bytes(digest, "little", signed=True)
