"""The serving contract: what a request to the `ranker` and `recommend` models carries, as data.

Decision (issue 4, part 1): a request carries the model's *input* contract, not raw events. Per
candidate row: the dense feature vector (float32, manifest order) and the hashed sparse ids, one
int64 per single-valued feature and the multi-valued ones (hashtags) as a row of int64 padded
with `PAD_ID`. Why not raw values: the dense features are point-in-time user/item counters that
come from a feature store at serving time (it does not exist yet), and the server should not
re-implement preprocessing; hashing is cheap and stable (`gpurec.data.hashing`), so the client
does it with `hash_raw_features` below and the server only remaps ids to table rows.

This module is imported by clients: it needs numpy only (never torch, never tritonclient). The
same `ServingContract` generates the Triton `config.pbtxt` inputs/outputs and is written as
`contract.json` next to every exported model version, so a client validates a request against
exactly what the server was built with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

CONTRACT_VERSION = 1
CONTRACT_FILE = "contract.json"
PAD_ID = -1
"""Padding of multi-valued id rows. A real hashed id equal to -1 has probability 2^-64 per value;
`hash_raw_features` refuses one rather than let it be dropped silently."""

RANKER_MODEL = "ranker"
RECOMMEND_MODEL = "recommend"
DENSE_INPUT = "dense"
SCORE_OUTPUT = "score"
# `recommend` only: the raw item ids passed through (so top-k comes back as item ids) and k.
CANDIDATE_IDS_INPUT = "candidate_ids"
K_INPUT = "k"
TOPK_IDS_OUTPUT = "item_ids"
TOPK_SCORES_OUTPUT = "scores"
TOPK_INDICES_OUTPUT = "indices"

# How preprocessing turns each raw sparse value into an id (gpurec/preprocess/dims.py and
# features.py): integer ids through `hash_id(value, feature)`, strings through
# `hash_string(value, feature)`; "hour" is the UTC hour of day 0-23 hashed as an integer.
RAW_HASHING: dict[str, Literal["int", "string"]] = {
    "user_id": "int",
    "item_id": "int",
    "author_id": "int",
    "user_region": "string",
    "device": "string",
    "user_language": "string",
    "item_language": "string",
    "hour": "int",
    "hashtags": "string",
}


class ContractError(ValueError):
    """A request does not match the serving contract (missing input, wrong dtype or shape)."""


@dataclass(frozen=True)
class TensorSpec:
    """One Triton input or output: name, numpy dtype name and per-row dims (-1 = variable)."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def triton_dtype(self) -> str:
        return _TRITON_DTYPES[self.dtype]


_TRITON_DTYPES = {"float32": "FP32", "int64": "INT64", "int32": "INT32"}


@dataclass(frozen=True)
class ServingContract:
    """The ranker's input/output contract, read from the trained model and its manifest.

    `sparse_features` are single-valued (one id per row), `multi_valued_features` padded rows of
    ids; `tasks` are the per-task probability outputs, `score_weights` how `score` combines them
    (``score = sum_t w_t * p_t``). `max_batch_size` bounds the rows of one request (= candidates
    of one `recommend` call).
    """

    dense_features: tuple[str, ...]
    sparse_features: tuple[str, ...]
    multi_valued_features: tuple[str, ...]
    tasks: tuple[str, ...]
    score_weights: dict[str, float]
    max_batch_size: int
    hashing: str = ""
    raw_hashing: dict[str, str] = field(default_factory=dict)
    pad_id: int = PAD_ID
    version: int = CONTRACT_VERSION

    def __post_init__(self) -> None:
        names = [DENSE_INPUT, *self.sparse_features, *self.multi_valued_features]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be distinct, got {names}")
        if set(self.tasks) & {SCORE_OUTPUT} or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"task names must be distinct and not {SCORE_OUTPUT!r}, got {self.tasks}")
        if self.max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive, got {self.max_batch_size}")

    # ---- the tensors, used for config.pbtxt and request validation ----------------------------

    def ranker_inputs(self) -> list[TensorSpec]:
        """Per-row inputs of `ranker` (Triton adds the batch dimension)."""
        return [
            TensorSpec(DENSE_INPUT, "float32", (len(self.dense_features),)),
            *(TensorSpec(name, "int64", (1,)) for name in self.sparse_features),
            *(TensorSpec(name, "int64", (-1,)) for name in self.multi_valued_features),
        ]

    def ranker_outputs(self) -> list[TensorSpec]:
        return [TensorSpec(name, "float32", (1,)) for name in (*self.tasks, SCORE_OUTPUT)]

    def recommend_inputs(self) -> list[TensorSpec]:
        """`recommend` is not batched by Triton: its first dim is the N candidates of one user."""
        rows = [TensorSpec(s.name, s.dtype, (-1, *s.dims)) for s in self.ranker_inputs()]
        return [*rows, TensorSpec(CANDIDATE_IDS_INPUT, "int64", (-1,)), TensorSpec(K_INPUT, "int32", (1,))]

    def recommend_outputs(self) -> list[TensorSpec]:
        return [
            TensorSpec(TOPK_IDS_OUTPUT, "int64", (-1,)),
            TensorSpec(TOPK_SCORES_OUTPUT, "float32", (-1,)),
            TensorSpec(TOPK_INDICES_OUTPUT, "int64", (-1,)),
        ]

    def validate_rows(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Check a ranker request (arrays with the batch dim first); return its row count.

        Raises `ContractError` naming the first problem: a missing or unknown input, a wrong
        dtype, a wrong shape, rows that disagree, too many rows, or a non-finite dense value.
        """
        specs = {s.name: s for s in self.ranker_inputs()}
        missing = [n for n in specs if n not in arrays]
        unknown = [n for n in arrays if n not in specs]
        if missing or unknown:
            raise ContractError(f"inputs: missing {missing}, unknown {unknown}; expected {list(specs)}")
        rows = None
        for name, spec in specs.items():
            array = arrays[name]
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype):
                got = getattr(array, "dtype", type(array).__name__)
                raise ContractError(f"input {name!r}: expected dtype {spec.dtype}, got {got}")
            if array.ndim != 1 + len(spec.dims) or any(d not in (-1, s) for d, s in zip(spec.dims, array.shape[1:], strict=True)):
                raise ContractError(f"input {name!r}: expected shape [rows, {', '.join(map(str, spec.dims))}], got {list(array.shape)}")
            if rows is None:
                rows = array.shape[0]
            elif array.shape[0] != rows:
                raise ContractError(f"input {name!r} has {array.shape[0]} rows, {DENSE_INPUT!r} has {rows}")
        assert rows is not None
        if rows == 0:
            raise ContractError("a request needs at least one row (candidate)")
        if rows > self.max_batch_size:
            raise ContractError(f"{rows} rows exceed max_batch_size {self.max_batch_size}")
        if not np.isfinite(arrays[DENSE_INPUT]).all():
            raise ContractError(f"input {DENSE_INPUT!r} has NaN or infinite values")
        return rows

    # ---- persistence ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [asdict(s) for s in self.ranker_inputs()]
        data["outputs"] = [asdict(s) for s in self.ranker_outputs()]
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServingContract:
        if data.get("version") != CONTRACT_VERSION:
            raise ValueError(f"contract version {data.get('version')!r}, this gpurec reads {CONTRACT_VERSION}")
        fields = {k: v for k, v in data.items() if k not in ("inputs", "outputs")}
        for key in ("dense_features", "sparse_features", "multi_valued_features", "tasks"):
            fields[key] = tuple(fields[key])
        return cls(**fields)

    @classmethod
    def load(cls, path: str | Path) -> ServingContract:
        """From `contract.json`, or a directory holding one (a model version directory)."""
        path = Path(path)
        return cls.from_json(json.loads((path / CONTRACT_FILE if path.is_dir() else path).read_text()))


def pad_id_lists(lists: Sequence[Sequence[int]], width: int | None = None) -> np.ndarray:
    """Ragged id lists -> [rows, width] int64 padded with `PAD_ID` (width: the longest, at least 1)."""
    longest = max((len(ids) for ids in lists), default=0)
    width = max(1, longest) if width is None else width
    if longest > width:
        raise ContractError(f"a row has {longest} ids, more than the width {width}")
    out = np.full((len(lists), width), PAD_ID, dtype=np.int64)
    for i, ids in enumerate(lists):
        out[i, : len(ids)] = np.asarray(ids, dtype=np.int64)
    return out


def hash_raw_features(contract: ServingContract, raw: Mapping[str, Sequence[Any]]) -> dict[str, np.ndarray]:
    """Hash raw sparse values (ints, strings, lists of strings) into the contract's id inputs.

    ``raw[feature]`` holds one value per row (a list of values for a multi-valued feature); the
    result has one int64 array per sparse input, shaped as the ranker expects. Dense features are
    not computed here: pass them as ``dense`` [rows, D] float32 next to these ids.
    """
    from gpurec.data.hashing_core import hash_ids_np, hash_string  # numpy + hashlib, no Polars

    how = contract.raw_hashing or RAW_HASHING
    out: dict[str, np.ndarray] = {}
    for feature in (*contract.sparse_features, *contract.multi_valued_features):
        if feature not in raw:
            raise ContractError(f"raw value missing for sparse feature {feature!r}")
        kind = how.get(feature)
        if kind is None:
            raise ContractError(f"no hashing rule for feature {feature!r} (known: {sorted(how)})")
        values = raw[feature]
        if feature in contract.multi_valued_features:
            lists = [[_hash_one(v, feature, kind, hash_ids_np, hash_string) for v in row] for row in values]
            out[feature] = pad_id_lists(lists)
        else:
            ids = [_hash_one(v, feature, kind, hash_ids_np, hash_string) for v in values]
            out[feature] = np.asarray(ids, dtype=np.int64).reshape(-1, 1)
    return out


def _hash_one(value: Any, feature: str, kind: str, hash_ids_np, hash_string) -> int:
    if kind == "string":
        if not isinstance(value, str):
            raise ContractError(f"feature {feature!r} takes strings, got {value!r}")
        hashed = hash_string(value, feature)
    else:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ContractError(f"feature {feature!r} takes integers, got {value!r}")
        hashed = int(hash_ids_np(np.asarray([value], dtype=np.int64), feature)[0])
    if hashed == PAD_ID:
        raise ContractError(f"value {value!r} of {feature!r} hashes to the padding id {PAD_ID}")
    return hashed


def rows_from_features(contract: ServingContract, frame: Any) -> dict[str, np.ndarray]:
    """Contract inputs from rows of the preprocessed feature files (`dense_<name>`, `sparse_<name>` columns).

    `frame` is anything indexable by column name whose columns convert with ``np.asarray`` (a
    Polars or pandas frame, a pyarrow table, a dict of lists). Until a feature store serves
    point-in-time features, these files are where a demo or a test gets realistic requests.
    """

    def column(name: str) -> Any:
        values = frame[name]
        return values.to_list() if hasattr(values, "to_list") else values

    rows: dict[str, np.ndarray] = {
        DENSE_INPUT: np.stack([np.asarray(column(f"dense_{n}"), dtype=np.float32) for n in contract.dense_features], axis=1)
    }
    for name in contract.sparse_features:
        rows[name] = np.asarray(column(f"sparse_{name}"), dtype=np.int64).reshape(-1, 1)
    for name in contract.multi_valued_features:
        rows[name] = pad_id_lists([list(ids or []) for ids in column(f"sparse_{name}")])
    return rows


def assemble_rows(
    contract: ServingContract, context: Mapping[str, Any], candidates: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """One user's request: per-user values broadcast over N candidates, by feature name.

    Every dense and sparse feature of the contract comes from exactly one of the two mappings:
    `context` holds one value per feature for the user (``user_id``, ``device``, ``hour``,
    ``user_like_rate``...), `candidates` one value per candidate (``item_id``, ``hashtags`` as
    lists of ids, ``item_age_hours``...). Sparse values are hashed ids (see `hash_raw_features`).
    """
    names = [*contract.dense_features, *contract.sparse_features, *contract.multi_valued_features]
    both = sorted(set(context) & set(candidates))
    missing = [n for n in names if n not in context and n not in candidates]
    unknown = sorted((set(context) | set(candidates)) - set(names))
    if both or missing or unknown:
        raise ContractError(f"features given twice {both}, missing {missing}, unknown {unknown}")
    sizes = {len(v) for v in candidates.values()}
    if len(sizes) != 1:
        raise ContractError(f"candidate features differ in length: {sorted(sizes)}" if sizes else "no candidate features")
    (n,) = sizes

    def per_row(name: str, dtype: type) -> np.ndarray:
        if name in candidates:
            return np.asarray(candidates[name], dtype=dtype)
        return np.full(n, context[name], dtype=dtype)

    rows: dict[str, np.ndarray] = {DENSE_INPUT: np.stack([per_row(d, np.float32) for d in contract.dense_features], axis=1)}
    for name in contract.sparse_features:
        rows[name] = per_row(name, np.int64).reshape(n, 1)
    for name in contract.multi_valued_features:
        lists = candidates[name] if name in candidates else [context[name]] * n
        rows[name] = pad_id_lists([list(ids) for ids in lists])
    return rows
