"""The online feature store's interface: written from the streams, read at serving time.

    store = open_feature_store("sqlite:///runs/features.db")   # or "redis://127.0.0.1:6379/0"
    store.put_users(users); store.put_items(items)             # profiles and item metadata
    store.record_impressions(served); store.record_actions(actions)
    rows = store.read(user_id, candidate_item_ids, ts_ms)      # the ranker's inputs, in candidate order

Two backends keep the same data and pass the same tests: `SQLiteFeatureStore` (embedded, the
default; one writer process and any number of reader processes on one file) and
`RedisFeatureStore` (production; hashes per user and item, counters by HINCRBY). Both run the
same counting rules (`gpurec.features.events`) and compute dense values from the feature list's
own expressions (`gpurec.features.layout`), so what they serve equals what `gpurec preprocess`
writes for the same events (tests/test_feature_store.py replays a world through both to prove it).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpurec.data.hashing_core import PAD_ID
from gpurec.errors import InvalidInput
from gpurec.features.events import Batch

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class FeatureRows:
    """The model inputs for one user's N candidates, in the order they were asked for.

    `dense` [N, D] float32 in `DENSE_FEATURES` order; `sparse` single-valued ids [N] int64 and
    `multi_valued` ragged id arrays per candidate, by feature name (every feature of
    `SPARSE_FEATURES`); the user's consent flags (an unknown user has neither); which users and
    items the store did not know (they got the defaults: counters 0, so the priors).
    """

    item_ids: np.ndarray
    dense: np.ndarray
    sparse: dict[str, np.ndarray]
    multi_valued: dict[str, list[np.ndarray]]
    consent_personalisation: bool
    consent_training: bool
    user_known: bool
    item_known: np.ndarray
    forgotten: bool = False
    """The user asked to be forgotten (`OnlineFeatureStore.forget_user`): serve them non-profiled and
    log nothing of the request."""

    @property
    def missing_items(self) -> int:
        return int((~self.item_known).sum())

    @property
    def missing(self) -> int:
        """How many lookups fell back to defaults: the user (0 or 1) plus the unknown candidates."""
        return int(not self.user_known) + self.missing_items

    def model_inputs(self) -> dict[str, np.ndarray]:
        """The serving contract's arrays: ``dense`` [N, D], each single-valued feature [N, 1] and each
        multi-valued one [N, K] padded with `PAD_ID` (K: the longest row, at least 1)."""
        out: dict[str, np.ndarray] = {"dense": self.dense}
        out.update({name: ids.reshape(-1, 1) for name, ids in self.sparse.items()})
        for name, rows in self.multi_valued.items():
            width = max([1, *(len(r) for r in rows)])
            padded = np.full((len(rows), width), PAD_ID, dtype=np.int64)
            for i, ids in enumerate(rows):
                padded[i, : len(ids)] = ids
            out[name] = padded
        return out


@dataclass(frozen=True)
class WriteResult:
    """What one write call did, by outcome: ``applied``; ``duplicate`` (already counted);
    ``excluded_user`` / ``excluded_item`` (unknown or non-consenting user, unknown item: not
    counted, as in batch); ``pending`` (action waiting for its impression: it arrived first, or
    more than a day after the impression's day, which batch never joins); ``outside_window`` (action
    on the day before its impression's); ``stale`` (older than the action already counted);
    ``pending_applied`` (an impression that brought its waiting action with it)."""

    rows: int
    outcomes: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)


class OnlineFeatureStore(abc.ABC):
    """Point-in-time user and item features, kept current from the event streams.

    Writes are batched (one transaction or pipeline per call) and safe to redeliver. Reads take one
    round trip per request. A store refuses to open on data written for another feature list.
    """

    @abc.abstractmethod
    def put_users(self, users: Batch) -> WriteResult:
        """Insert or replace user profiles (the USERS log's columns); their counters are kept."""

    @abc.abstractmethod
    def put_items(self, items: Batch) -> WriteResult:
        """Insert or replace item metadata (the ITEMS log's columns); their counters are kept."""

    @abc.abstractmethod
    def record_impressions(self, impressions: Batch) -> WriteResult:
        """Count served impressions (request_id, item_id, user_id, ts or ts_ms)."""

    @abc.abstractmethod
    def record_actions(self, actions: Batch) -> WriteResult:
        """Count the likes and finishes of actions (request_id, item_id, ts or ts_ms, watch_ms, like)."""

    @abc.abstractmethod
    def _read(self, user_id: int, item_ids: np.ndarray, ts_ms: int, profiled: bool = True) -> FeatureRows: ...

    @abc.abstractmethod
    def _set_consent(self, user_id: int, personalisation: bool | None, training: bool | None) -> tuple[bool, bool] | None: ...

    def set_consent(
        self, user_id: int, personalisation: bool | None = None, training: bool | None = None
    ) -> tuple[bool, bool] | None:
        """Change a user's consent flags in their profile (None: leave that flag as it is), in one
        atomic write; returns (personalisation, training) after it, or None for a user the store has
        no profile of (nothing is written). The next `read` sees the change."""
        for name, flag in (("personalisation", personalisation), ("training", training)):
            if flag is not None and not isinstance(flag, bool | np.bool_):
                raise InvalidInput(f"set_consent: {name} must be True, False or None, got {flag!r}")
        return self._set_consent(
            _int(user_id, "user_id"),
            None if personalisation is None else bool(personalisation),
            None if training is None else bool(training),
        )

    @abc.abstractmethod
    def _forget(self, user_id: int, digest: bytes) -> dict[str, int]: ...

    @abc.abstractmethod
    def _forget_salt(self) -> bytes: ...

    def forget_user(self, user_id: int) -> dict[str, int]:
        """Erase a user: their profile, counters and impression records are deleted, and a keyed digest
        of their id (not the id: a verifier searching the store must not find it) goes on the store's
        deny-list, so reads say `forgotten` and a later profile put for the id is refused. Idempotent;
        returns how many entries were deleted, by kind."""
        return self._forget(_int(user_id, "user_id"), self.forget_digest(user_id))

    def forget_digest(self, user_id: int) -> bytes:
        """The deny-list entry of a user id: BLAKE2b keyed with the store's own random salt, so the
        entry names the user only to someone holding the store (who can test candidate ids)."""
        raw = int(user_id).to_bytes(8, "little", signed=True)
        return hashlib.blake2b(raw, key=self._forget_salt(), digest_size=16).digest()

    @abc.abstractmethod
    def prune(self, before_ms: int) -> None:
        """Drop impression records and pending actions older than `before_ms` (done automatically as
        event time advances; see `gpurec.features.events.RETENTION_DAYS`)."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """How many users, items, impression records and pending actions the store holds."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def read(
        self, user_id: int, item_ids: Sequence[int] | np.ndarray, ts_ms: int, profiled: bool = True
    ) -> FeatureRows:
        """The model inputs of `item_ids` for `user_id` at request time `ts_ms` (epoch ms), as of now.

        `profiled=False`: no per-user input but the user's region and language (for a user without
        personalisation consent; see `gpurec.features.rows.assemble`)."""
        return self._read(_int(user_id, "user_id"), _ids(item_ids), _int(ts_ms, "ts_ms"), bool(profiled))

    def __enter__(self) -> OnlineFeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int(value: object, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | np.integer)
        or not INT64_MIN <= int(value) <= INT64_MAX
    ):
        raise InvalidInput(f"read: {name} must be a 64-bit integer, got {value!r}")
    return int(value)


def _ids(item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(item_ids)
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise InvalidInput(
            f"read: item_ids must be a flat list of integer ids, got {type(item_ids).__name__} of {array.dtype} shape {array.shape}"
        )
    if array.dtype == np.uint64 and array.size and array.max() > INT64_MAX:
        raise InvalidInput("read: item_ids beyond int64")
    return array.astype(np.int64, copy=False)


def open_feature_store(url: str | Path, **options: object) -> OnlineFeatureStore:
    """``sqlite:///relative.db``, ``sqlite:////absolute.db`` or a plain path; ``redis://host:port/db``.

    Options go to the backend (SQLite: ``timeout_s``; Redis: ``prefix``).
    """
    text = str(url)
    if text.startswith(("redis://", "rediss://", "unix://")):
        from gpurec.features.redis import RedisFeatureStore

        return RedisFeatureStore(text, **options)  # type: ignore[arg-type]
    if "://" in text and not text.startswith("sqlite:///"):
        raise InvalidInput(
            f"feature store URL {text!r}: expected sqlite:///path, a file path or redis://host:port/db"
        )
    # SQLAlchemy's convention: sqlite:///relative/path, sqlite:////absolute/path.
    path = text.removeprefix("sqlite:///")
    if not path:
        raise InvalidInput("feature store URL has no path: sqlite:///path/to/features.db")
    from gpurec.features.sqlite import SQLiteFeatureStore

    return SQLiteFeatureStore(path, **options)  # type: ignore[arg-type]


__all__ = ["FeatureRows", "OnlineFeatureStore", "WriteResult", "open_feature_store"]
