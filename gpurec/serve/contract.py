"""The serving contract: what a request to the `ranker` and `recommend` models carries, as data.

Decision (issue 4, part 1): a request carries the model's *input* contract, not raw events. Per
candidate row: the dense feature vector (float32, manifest order) and the hashed sparse ids, one
int64 per single-valued feature and the multi-valued ones (hashtags) as a row of int64 padded
with `PAD_ID`. Why not raw values: the dense features are point-in-time user/item counters that
come from a feature store at serving time (it does not exist yet), and the server should not
re-implement preprocessing; hashing is cheap and stable (`gpurec.data.hashing`), so the client
does it with `hash_raw_features` below and the server only remaps ids to table rows.

`hash_raw_features` is the one raw hasher of the serving side (`gpurec.client.hash_raw` calls it):
each feature's rule comes from the contract's `raw_hashing`, which export takes from the feature
list (`gpurec.preprocess.features.raw_hashing_rules`), and the hashing itself is
`gpurec.data.hashing_core.hash_raw_values`, the same functions preprocessing hashes with.

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
from typing import Any

import numpy as np

# PAD_ID is defined with the hashing (which never yields it) and re-exported here.
from gpurec.data.hashing_core import PAD_ID, RAW_RULES, hash_raw_values
from gpurec.errors import InvalidInput

CONTRACT_VERSION = 1
CONTRACT_FILE = "contract.json"

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


class ContractError(InvalidInput):
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
    of one `recommend` call). `raw_hashing` maps each sparse feature to its raw hashing rule (one
    of `RAW_RULES`), as the feature list declared it when the model was exported.
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
        unknown = {n: r for n, r in self.raw_hashing.items() if r not in RAW_RULES or n not in names[1:]}
        if unknown:
            raise ValueError(f"raw_hashing must map sparse inputs to one of {RAW_RULES}, got {unknown}")

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


def hash_raw_features(
    contract: ServingContract, raw: Mapping[str, Sequence[Any]], *, all_features: bool = True
) -> dict[str, np.ndarray]:
    """Hash raw sparse values (ints, strings, hours, lists of them) into the contract's id inputs.

    ``raw[feature]`` holds one value per row (a list of values for a multi-valued feature); the
    result has one int64 array per sparse input, shaped as the ranker expects ([rows, 1], and
    [rows, K] padded with `PAD_ID` for multi-valued ones). Each feature is hashed by the rule the
    contract records for it, with the same functions preprocessing uses, so the ids equal those in
    the feature files. With ``all_features=False`` only the sparse features present in `raw` are
    hashed (a client hashes user and candidate values separately); other keys are ignored. Dense
    features are not computed here: pass them as ``dense`` [rows, D] float32 next to these ids.
    """
    multi = set(contract.multi_valued_features)
    out: dict[str, np.ndarray] = {}
    for feature in (*contract.sparse_features, *contract.multi_valued_features):
        if feature not in raw:
            if all_features:
                raise ContractError(f"raw value missing for sparse feature {feature!r}")
            continue
        rule = contract.raw_hashing.get(feature)
        if rule is None:
            raise ContractError(
                f"the contract has no raw hashing rule for {feature!r} (rules: {contract.raw_hashing}); "
                "re-export the model with this gpurec, or send hashed ids"
            )
        values = _rows_of(raw[feature], feature)
        lists = [_rows_of(row, feature) for row in values] if feature in multi else [values]
        try:  # one call per feature: multi-valued rows are hashed flat, then split back
            ids = hash_raw_values([v for row in lists for v in row], feature, rule)
        except InvalidInput as err:
            raise ContractError(str(err)) from err
        if feature in multi:
            rows = np.split(ids, np.cumsum([len(row) for row in lists])[:-1]) if lists else []  # split([]) is one row
            out[feature] = pad_id_lists(rows)
        else:
            out[feature] = ids.reshape(-1, 1)
    return out


def _rows_of(values: Any, feature: str) -> list[Any]:
    """`values` as a list of per-row values; a string or scalar where rows are expected is refused."""
    scalar_array = isinstance(values, np.ndarray) and values.ndim == 0
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray) or scalar_array:
        raise ContractError(f"feature {feature!r}: expected a list of values, got {values!r}")
    return list(values)


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
