"""What a client request holds (a user and their candidates) and what comes back, as plain numpy.

A request is one user's context plus N candidate items, by feature name, as in
`gpurec.serve.contract.assemble_rows`: `user` maps each per-user feature to one value (``user_id``,
``device``, ``hour``, ``user_like_rate``...), `candidates` maps each per-item feature to N values
(``item_id``, ``hashtags`` as lists of ids, ``item_age_hours``...). Sparse values are hashed ids;
`hash_raw` turns raw values (integer ids, strings, the hour of day) into them exactly as
preprocessing does, through the contract's one raw hasher (`hash_raw_features`) and the rules
recorded in `contract.json`.
Alternatively `candidates` may already be the model's input arrays (a mapping with a ``dense``
key, e.g. from `rows_from_features`), with `user` empty.

Everything here is checked on the client before anything is sent, so a bad request fails fast,
with the feature named, as `InvalidRequest`, and never costs a round trip or a retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpurec.client.errors import InvalidRequest, NonFiniteInput
from gpurec.serve.contract import (
    CONTRACT_FILE,
    DENSE_INPUT,
    PAD_ID,
    RANKER_MODEL,
    ContractError,
    ServingContract,
    assemble_rows,
    hash_raw_features,
)
from gpurec.serve.feed_contract import (
    FORGET,
    N_INPUT,
    PERSONALISATION,
    REQUEST_ID_INPUT,
    TRAINING,
    TS_INPUT,
    USER_ID_INPUT,
)

Features = Mapping[str, Any]
INT64_MIN, INT64_MAX, INT32_MAX = -(2**63), 2**63 - 1, 2**31 - 1


@dataclass(frozen=True)
class RankRequest:
    """One user and their candidates, to be scored."""

    user: Features
    candidates: Features


@dataclass(frozen=True)
class RecommendRequest:
    """One user, their candidates, how many to keep, and the ids to return for them.

    `item_ids` are the caller's own ids of the candidates (returned for the top k); by default the
    ``item_id`` values of `candidates`, i.e. the hashed ids.
    """

    user: Features
    candidates: Features
    k: int
    item_ids: Sequence[int] | np.ndarray | None = None


@dataclass(frozen=True)
class RankResult:
    """Scores of one user's candidates, in candidate order: per-task probabilities and the combined score."""

    tasks: dict[str, np.ndarray]
    score: np.ndarray

    def __len__(self) -> int:
        return int(self.score.shape[0])


@dataclass(frozen=True)
class Recommendation:
    """The top k of one user's candidates, best first: ids, combined scores, positions in the candidates."""

    item_ids: np.ndarray
    scores: np.ndarray
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


@dataclass(frozen=True)
class FeedRequest:
    """One user's live feed: how many items, at what event time (default: the server's clock),
    under which request id (default: the server makes one)."""

    user_id: int
    n: int
    ts_ms: int | None = None
    request_id: int | None = None


@dataclass(frozen=True)
class FeedResult:
    """What the feed showed: raw item ids and their scores, best first, and the request id and
    ranker version the served rows were logged under."""

    request_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: str

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])


@dataclass(frozen=True)
class ConsentResult:
    """A user's consent after a change, as the server recorded it (effective at their next request)."""

    user_id: int
    personalisation: bool
    training: bool
    ts_ms: int


def check_consent(
    user_id: int, personalisation: bool | None, training: bool | None, ts_ms: int | None
) -> dict[str, np.ndarray]:
    """The consent model's input arrays (InvalidRequest for a bad id, time or flag, or no flag)."""
    if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer) or not INT64_MIN <= int(user_id) <= INT64_MAX:
        raise InvalidRequest(f"invalid request: consent user_id must be a 64-bit integer, got {user_id!r}")
    if ts_ms is not None and (isinstance(ts_ms, bool) or not isinstance(ts_ms, int | np.integer) or not 0 <= int(ts_ms) <= INT64_MAX):
        raise InvalidRequest(f"invalid request: consent ts_ms must be epoch milliseconds (>= 0), got {ts_ms!r}")
    flags = {PERSONALISATION: personalisation, TRAINING: training}
    for name, flag in flags.items():
        if flag is not None and not isinstance(flag, bool | np.bool_):
            raise InvalidRequest(f"invalid request: consent {name} must be True, False or None, got {flag!r}")
    if personalisation is None and training is None:
        raise InvalidRequest("invalid request: consent needs personalisation, training or both")
    arrays = {USER_ID_INPUT: np.array([user_id], dtype=np.int64)}
    arrays.update({name: np.array([flag], dtype=np.bool_) for name, flag in flags.items() if flag is not None})
    if ts_ms is not None:
        arrays[TS_INPUT] = np.array([ts_ms], dtype=np.int64)
    return arrays


def check_forget(user_id: int, ts_ms: int | None) -> dict[str, np.ndarray]:
    """The consent model's input arrays for an erasure request (InvalidRequest for a bad id or time)."""
    if isinstance(user_id, bool) or not isinstance(user_id, int | np.integer) or not INT64_MIN <= int(user_id) <= INT64_MAX:
        raise InvalidRequest(f"invalid request: forget user_id must be a 64-bit integer, got {user_id!r}")
    if ts_ms is not None and (isinstance(ts_ms, bool) or not isinstance(ts_ms, int | np.integer) or not 0 <= int(ts_ms) <= INT64_MAX):
        raise InvalidRequest(f"invalid request: forget ts_ms must be epoch milliseconds (>= 0), got {ts_ms!r}")
    arrays = {USER_ID_INPUT: np.array([user_id], dtype=np.int64), FORGET: np.array([True], dtype=np.bool_)}
    if ts_ms is not None:
        arrays[TS_INPUT] = np.array([ts_ms], dtype=np.int64)
    return arrays


def load_contract(source: ServingContract | str | Path) -> ServingContract:
    """A contract from itself, a `contract.json`, a model version directory, or a model repository
    (then the newest version of `ranker`): the client validates against what the server was built with."""
    if isinstance(source, ServingContract):
        return source
    path = Path(source)
    ranker = path / RANKER_MODEL
    if ranker.is_dir():
        versions = sorted(int(p.name) for p in ranker.iterdir() if p.name.isdigit() and (p / CONTRACT_FILE).is_file())
        if not versions:
            raise FileNotFoundError(f"no version of {RANKER_MODEL!r} with a {CONTRACT_FILE} under {path}")
        path = ranker / str(versions[-1])
    try:
        return ServingContract.load(path)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise FileNotFoundError(f"cannot read a serving contract from {source}: {err}") from err


def hash_raw(contract: ServingContract, values: Features, per_candidate: bool) -> dict[str, Any]:
    """Hash the raw sparse values in `values` (user context, or candidates if `per_candidate`).

    Sparse features take raw values as preprocessing saw them, by the contract's rule for each
    (``user_id=7``, ``user_region="EU"``, ``hour=13``, ``hashtags=[["cats", "dogs"], ...]``);
    other values (dense features) pass through unchanged. Raises `InvalidRequest` naming the
    feature for a value its rule does not take.
    """
    sparse = {*contract.sparse_features, *contract.multi_valued_features}
    given = {name: value for name, value in values.items() if name in sparse}
    try:  # one row for the user's values, N for the candidates'
        hashed = hash_raw_features(
            contract, given if per_candidate else {n: [v] for n, v in given.items()}, all_features=False
        )
    except ContractError as err:
        raise InvalidRequest(f"invalid request: {err}") from err
    out = dict(values)
    for name, ids in hashed.items():
        # hashed ids are never PAD_ID, so dropping it gives back exactly each row's ids
        rows = [row[row != PAD_ID].tolist() for row in ids] if name in contract.multi_valued_features else ids[:, 0].tolist()
        out[name] = rows if per_candidate else rows[0]
    return out


def build_rows(contract: ServingContract, user: Features | None, candidates: Features) -> dict[str, np.ndarray]:
    """The model's input arrays for one request, checked against the contract (else `InvalidRequest`)."""
    user = user or {}
    if not isinstance(candidates, Mapping):
        raise InvalidRequest(f"candidates must be a mapping of feature name to values, got {type(candidates).__name__}")
    try:
        if DENSE_INPUT in candidates:  # already the model's inputs: checked as they are, no conversion
            if user:
                raise InvalidRequest("pass either input arrays as candidates (with 'dense') and no user, or features by name")
            rows = dict(candidates)
        else:
            _check_feature_values(contract, user, candidates)
            rows = assemble_rows(contract, user, candidates)
        contract.validate_rows(rows)
    except ContractError as err:
        kind = NonFiniteInput if "NaN or infinite" in str(err) else InvalidRequest
        raise kind(f"invalid request: {err}") from err
    except (TypeError, ValueError) as err:
        if isinstance(err, InvalidRequest):
            raise
        raise InvalidRequest(f"invalid request: a feature value does not convert to its dtype: {err}") from err
    return rows


def _check_feature_values(contract: ServingContract, user: Features, candidates: Features) -> None:
    """Refuse what `assemble_rows` would convert silently: non-integer ids, non-numeric dense values."""
    if not candidates:
        raise InvalidRequest("invalid request: no candidates (candidates has no features)")
    multi = set(contract.multi_valued_features)
    for source, values in (("user", user), ("candidates", candidates)):
        for name, value in values.items():
            if name in multi:
                flat = [v for row in value for v in row] if source == "candidates" else list(value)
                array = np.asarray(flat) if flat else np.zeros(0, np.int64)
            else:
                array = np.asarray(value)
            if name in contract.dense_features:
                ok = array.dtype.kind in "fiu"
                expected = "numbers (float32)"
            else:
                ok = array.dtype.kind in "iu" or array.size == 0
                expected = "hashed ids (int64; see gpurec.client.hash_raw for raw values)"
            if not ok:
                raise InvalidRequest(f"invalid request: {source} feature {name!r} takes {expected}, got dtype {array.dtype}")
            if source == "candidates" and name not in multi and array.ndim != 1:
                raise InvalidRequest(f"invalid request: candidate feature {name!r} must be 1-D (one value per candidate), got shape {list(array.shape)}")
            if source == "user" and name not in multi and array.ndim != 0:
                raise InvalidRequest(f"invalid request: user feature {name!r} must be one value, got shape {list(array.shape)}")


def candidate_ids(rows: Mapping[str, np.ndarray], item_ids: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """The ids `recommend` returns for the candidates: the caller's, else the rows' ``item_id``."""
    n = rows[DENSE_INPUT].shape[0]
    if item_ids is None:
        if "item_id" not in rows:
            raise InvalidRequest("invalid request: pass item_ids (the contract has no 'item_id' feature)")
        return rows["item_id"].reshape(-1).astype(np.int64)
    ids = np.asarray(item_ids)
    if ids.dtype.kind not in "iu" or ids.shape != (n,):
        raise InvalidRequest(f"invalid request: item_ids must be {n} integers (one per candidate), got {ids.dtype} {list(ids.shape)}")
    return ids.astype(np.int64)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidRequest(f"invalid request: k must be a positive integer, got {k!r}")
    return int(k)


def check_feed(request: FeedRequest) -> dict[str, np.ndarray]:
    """The feed model's input arrays for one request (InvalidRequest for what the server would refuse
    anyway: a non-integer id or time, n < 1; an n above the server's max_n is refused by the server)."""
    for name in ("user_id", "n", "ts_ms", "request_id"):
        value = getattr(request, name)
        if value is None and name in ("ts_ms", "request_id"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not INT64_MIN <= int(value) <= INT64_MAX:
            raise InvalidRequest(f"invalid request: feed {name} must be a 64-bit integer, got {value!r}")
    if request.n < 1 or request.n > INT32_MAX:
        raise InvalidRequest(f"invalid request: feed n must be a positive integer, got {request.n!r}")
    if request.ts_ms is not None and request.ts_ms < 0:
        raise InvalidRequest(f"invalid request: feed ts_ms must be epoch milliseconds (>= 0), got {request.ts_ms!r}")
    arrays = {
        USER_ID_INPUT: np.array([request.user_id], dtype=np.int64),
        N_INPUT: np.array([request.n], dtype=np.int32),
    }
    if request.ts_ms is not None:
        arrays[TS_INPUT] = np.array([request.ts_ms], dtype=np.int64)
    if request.request_id is not None:
        arrays[REQUEST_ID_INPUT] = np.array([request.request_id], dtype=np.int64)
    return arrays
