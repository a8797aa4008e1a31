"""Typed model configuration: one dataclass per concept, loadable from TOML (or YAML).

The ranker's shape lives in a config file rather than in code so that training, the benchmark
and serving build exactly the same model from one source of truth. Loading is strict: a
misspelt key (``botom_mlp``) would otherwise silently fall back to a default and train a
different model than the one asked for, so unknown keys are an error that names the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gpurec.embedding.config import IdTableConfig
from gpurec.embedding.tables import POOLINGS, Pooling, SparseFeatureSpec, require_positive_int
from gpurec.errors import InputNotFound, InvalidInput

_Config = TypeVar("_Config")
Interaction = Literal["dot", "dcn"]

INTERACTIONS: tuple[str, ...] = ("dot", "dcn")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the multi-task DLRM ranker.

    ``num_embeddings`` overrides ``default_num_embeddings`` per feature (a user table needs
    more rows than a language table). ``bottom_mlp`` maps the dense features to one vector;
    with ``interaction = "dot"`` its last size must equal ``embedding_dim`` because it is dotted
    with every embedding. ``score_weights`` combine per-task probabilities into the single
    ranking score serving sorts by; tasks without a weight do not contribute to it.
    """

    embedding_dim: int = 64
    default_num_embeddings: int = 100_000
    num_embeddings: dict[str, int] = field(default_factory=dict)
    bottom_mlp: tuple[int, ...] = (512, 256, 64)
    top_mlp: tuple[int, ...] = (512, 256)
    interaction: Interaction = "dot"
    dcn_layers: int = 3
    dcn_low_rank: int = 128
    multi_valued_pooling: Pooling = "mean"
    tasks: tuple[str, ...] = ("like", "finish")
    score_weights: dict[str, float] = field(default_factory=lambda: {"like": 1.0, "finish": 1.0})
    ids: IdTableConfig = field(default_factory=IdTableConfig)  # how ids get rows: [model.ids]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", IdTableConfig.from_value(self.ids))
        # TOML and YAML give lists; freeze them so configs compare and print the same way.
        object.__setattr__(self, "bottom_mlp", _int_tuple("bottom_mlp", self.bottom_mlp))
        object.__setattr__(self, "top_mlp", _int_tuple("top_mlp", self.top_mlp))
        object.__setattr__(self, "tasks", _str_tuple("tasks", self.tasks))
        object.__setattr__(self, "num_embeddings", dict(_mapping("num_embeddings", self.num_embeddings)))
        object.__setattr__(self, "score_weights", dict(_mapping("score_weights", self.score_weights)))
        self._validate()

    def _validate(self) -> None:
        require_positive_int("embedding_dim", self.embedding_dim)
        require_positive_int("default_num_embeddings", self.default_num_embeddings)
        for feature, rows in self.num_embeddings.items():
            require_positive_int(f"num_embeddings[{feature!r}]", rows)
        if self.interaction not in INTERACTIONS:
            raise InvalidInput(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        if self.multi_valued_pooling not in POOLINGS:
            raise InvalidInput(
                f"multi_valued_pooling must be one of {POOLINGS}, got {self.multi_valued_pooling!r}"
            )
        if self.interaction == "dot" and self.bottom_mlp[-1] != self.embedding_dim:
            raise InvalidInput(
                f"dot interaction needs bottom_mlp[-1] == embedding_dim, got {self.bottom_mlp[-1]} != {self.embedding_dim}"
            )
        require_positive_int("dcn_layers", self.dcn_layers)
        require_positive_int("dcn_low_rank", self.dcn_low_rank)
        if len(set(self.tasks)) != len(self.tasks):
            raise InvalidInput(f"tasks must be distinct, got {self.tasks}")
        for task in self.tasks:
            if not task.isidentifier():
                raise InvalidInput(f"task names must be identifiers (they name model heads), got {task!r}")
        if not self.score_weights:
            raise InvalidInput("score_weights must weight at least one task")
        for task, weight in self.score_weights.items():
            if task not in self.tasks:
                raise InvalidInput(f"score_weights names unknown task {task!r} (tasks: {self.tasks})")
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                raise InvalidInput(f"score_weights[{task!r}] must be a number, got {weight!r}")

    def sparse_specs(
        self, features: Iterable[str], multi_valued: Iterable[str] = ()
    ) -> list[SparseFeatureSpec]:
        """Specs for ``features`` in the given order; features in ``multi_valued`` pool their ids.

        ``features`` is the full list of sparse features (the manifest's); every name in
        ``num_embeddings`` and ``multi_valued`` must be one of them.
        """
        multi = set(multi_valued)
        names = list(features)
        unknown = multi - set(names)
        if unknown:
            raise InvalidInput(f"multi_valued names features not in the feature list: {sorted(unknown)}")
        # A misspelt override would otherwise leave the real feature at the default size.
        unknown = set(self.num_embeddings) - set(names)
        if unknown:
            raise InvalidInput(f"num_embeddings names features not in the feature list: {sorted(unknown)}")
        return [
            SparseFeatureSpec(
                name=name,
                num_embeddings=self.num_embeddings.get(name, self.default_num_embeddings),
                embedding_dim=self.embedding_dim,
                multi_valued=name in multi,
                pooling=self.multi_valued_pooling if name in multi else "sum",
            )
            for name in names
        ]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build a config from a parsed mapping, rejecting keys that are not fields."""
        return dataclass_from_mapping(cls, values, "model")


def dataclass_from_mapping(cls: type[_Config], values: Mapping[str, Any], section: str) -> _Config:
    """`cls(**values)`, but a key that is not a field is an error naming it, so a typo in a config
    file cannot silently fall back to a default."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            raise InvalidInput(f"unknown key {key!r} in {section} config (known keys: {', '.join(known)})")
    return cls(**values)


def load_model_config(path: str | Path, section: str = "model") -> ModelConfig:
    """Load the ``[section]`` table of a TOML (or, with pyyaml installed, YAML) file.

    Configs are sectioned so that one file can later also carry the training and serving
    settings; only the named section is read and checked.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InvalidInput(f"{path}: unsupported config format {suffix!r} (use .toml, .yaml or .yml)")
    if not path.is_file():
        raise InputNotFound(f"config file {path} does not exist")
    if suffix == ".toml":
        try:
            with path.open("rb") as f:
                document = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise InvalidInput(f"{path} is not valid TOML: {err}") from err
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise InvalidInput(f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use TOML") from exc
        document = yaml.safe_load(path.read_text()) or {}
    else:
        raise InvalidInput(f"{path}: unsupported config format {suffix!r} (use .toml, .yaml or .yml)")
    if section not in document:
        raise InvalidInput(f"{path}: no [{section}] section")
    try:
        return ModelConfig.from_dict(_mapping(section, document[section]))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{path}: {exc}") from exc


def _int_tuple(what: str, values: Iterable[int]) -> tuple[int, ...]:
    result = tuple(values)
    if not result:
        raise InvalidInput(f"{what} must have at least one layer")
    for size in result:
        require_positive_int(f"{what} layer size", size)
    return result


def _str_tuple(what: str, values: Iterable[str]) -> tuple[str, ...]:
    result = (values,) if isinstance(values, str) else tuple(values)
    if not result or not all(isinstance(v, str) and v for v in result):
        raise InvalidInput(f"{what} must be a non-empty list of names, got {values!r}")
    return result


def _mapping(what: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a table/mapping, got {type(value).__name__}")
    return value
