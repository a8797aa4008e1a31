"""The numpy-only half of `gpurec.data.hashing`: what a serving client needs to hash raw values.

Split from `hashing.py` so that `gpurec.client` (numpy + tritonclient only) can hash ids exactly
as preprocessing does without importing Polars; `gpurec.data.hashing` re-exports every name
here, so the scheme still lives (and is pinned by tests) in one place.

Two more things every path shares live here for the same reason:

- `PAD_ID`, the padding of multi-valued id rows in serving requests. No hash ever equals it: a
  value whose hash would be `PAD_ID` gets `PAD_FOLD_ID` instead, in every hashing function
  (Python, numpy, Polars), so preprocessing, training and serving all see the same real id and
  padding can never swallow one.
- `RAW_RULES` and `hash_raw_values`: how a sparse feature's raw value becomes an id. Each sparse
  feature of `gpurec.preprocess.features` names its rule; the serving contract records them
  (`contract.json`), and `gpurec.serve.contract.hash_raw_features` (also behind
  `gpurec.client.hash_raw`) hashes requests through `hash_raw_values`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np

from gpurec.errors import InvalidInput

PAD_ID = -1
"""Padding of multi-valued id rows; never a hashed id (see `PAD_FOLD_ID`)."""
PAD_FOLD_ID = PAD_ID - 1
"""The id of a value whose hash is `PAD_ID` (one in 2^64 values per feature)."""

RawRule = Literal["int", "string", "hour"]
RAW_RULES: tuple[RawRule, ...] = ("int", "string", "hour")
"""How a raw sparse value is hashed: "int" an integer id (`hash_id`), "string" a string
(`hash_string`), "hour" the UTC hour of day 0-23 of the event's timestamp (`hash_id` of the hour)."""
HOURS_PER_DAY = 24

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


def fold_pad(hashed: int) -> int:
    """A hash as an id: `PAD_ID` becomes `PAD_FOLD_ID`, anything else stays."""
    return PAD_FOLD_ID if hashed == PAD_ID else hashed


def hash_id(value: int, feature: str) -> int:
    """Hash one integer id of `feature` to a signed 64-bit id (never `PAD_ID`)."""
    return fold_pad(to_signed(splitmix64((value & _MASK) ^ feature_salt(feature))))


def hash_ids_np(values: np.ndarray, feature: str) -> np.ndarray:
    """Vectorised `hash_id` over an integer array; returns int64 (never `PAD_ID`)."""
    x = np.asarray(values).astype(np.int64).view(np.uint64) ^ np.uint64(feature_salt(feature))
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
        x = x ^ (x >> np.uint64(31))
    ids = x.view(np.int64)
    return np.where(ids == PAD_ID, np.int64(PAD_FOLD_ID), ids)


def hash_string(value: str, feature: str) -> int:
    """Hash one string value of `feature` to a signed 64-bit id (never `PAD_ID`)."""
    digest = hashlib.blake2b(value.encode(), digest_size=8, key=feature.encode()[:64]).digest()
    return fold_pad(int.from_bytes(digest, "little", signed=True))


def hash_raw_values(values: Iterable[Any], feature: str, rule: str) -> np.ndarray:
    """Ids (int64) of raw values of `feature` hashed by its raw rule (one of `RAW_RULES`).

    The one raw hasher of the serving side, and the rule preprocessing follows (it hashes the
    same way in Polars, once per dimension row). Raises `InvalidInput` naming the feature for a
    value the rule does not take: a non-string for "string", a non-integer (or bool) for "int",
    anything but an integer 0-23 for "hour".
    """
    values = list(values)
    if rule == "string":
        bad = [v for v in values if not isinstance(v, str)]
        if bad:
            raise InvalidInput(f"feature {feature!r} takes strings (raw), got {bad[0]!r}")
        return np.asarray([hash_string(v, feature) for v in values], dtype=np.int64)
    if rule not in RAW_RULES:
        raise InvalidInput(f"feature {feature!r}: unknown raw hashing rule {rule!r} (known: {', '.join(RAW_RULES)})")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | np.integer)]
    if bad:
        what = "hours of day (integers 0-23)" if rule == "hour" else "integer ids"
        raise InvalidInput(f"feature {feature!r} takes {what} (raw), got {bad[0]!r}")
    if rule == "hour":
        bad = [v for v in values if not 0 <= v < HOURS_PER_DAY]
        if bad:
            raise InvalidInput(f"feature {feature!r} takes the UTC hour of day 0-23 (raw), got {bad[0]!r}")
    try:
        ints = np.asarray(values, dtype=np.int64) if values else np.zeros(0, np.int64)
    except OverflowError as err:
        raise InvalidInput(f"feature {feature!r} takes 64-bit integer ids (raw): {err}") from err
    return hash_ids_np(ints, feature)
