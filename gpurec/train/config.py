"""Training settings: a typed dataclass, read from the `[train]` table of the same TOML file as
the model (`gpurec/model/configs/default.toml`)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from gpurec.errors import InvalidInput
from gpurec.model.config import ModelConfig, dataclass_from_mapping, load_model_config
from gpurec.model.sharded import SHARDING_TYPES

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "model" / "configs" / "default.toml"


# Field annotation -> accepted Python type (an int is a valid float, as in TOML's `lr = 1`).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 8  # at most: with validation, training stops once the valid AUC stops improving
    batch_size: int = 512  # per rank; the global batch is batch_size * world_size
    max_steps: int = 0  # stop after this many steps (0: run all epochs)
    dense_lr: float = 0.005  # Adagrad on the MLPs and heads
    sparse_lr: float = 0.2  # RowWiseAdagrad fused into the embedding backward
    seed: int = 0  # model init and data order
    sharding: str = "auto"  # "auto" (TorchRec's planner) or one of SHARDING_TYPES for every table
    rows_per_id: float = 4  # table rows = rows_per_id x the manifest's id-cardinality estimate (may be < 1) ...
    min_rows: int = 64  # ... at least this, at most the model config's default_num_embeddings
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end of each epoch)
    log_every: int = 20
    device: str = "auto"  # auto | cpu | cuda
    prefetch: int = 4  # batches read ahead by the background loader thread
    shuffle_days: bool = False  # False: days in event-time order (rows are shuffled within a day)
    # Validation: score the valid split with a checkpoint at each epoch end (or every validate_every
    # steps) and at the end; `checkpoints/best` names the best one (mean AUC over tasks), which
    # evaluation and export read; stop after `patience` validations without improvement.
    validate: bool = True  # off, or no valid rows: no validation, readers get the latest checkpoint
    validate_every: int = 0  # steps between validations (0: at the end of each epoch)
    patience: int = 2  # validations without improvement before training stops (0: never stops early)

    def __post_init__(self) -> None:
        for f in fields(self):  # a TOML value of the wrong type (epochs = "two") is named, not a TypeError
            value, kind = getattr(self, f.name), _FIELD_TYPES[f.type]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise InvalidInput(f"train config {f.name} must be {kind.__name__}, got {value!r}")
        if self.sharding != "auto" and self.sharding not in SHARDING_TYPES:
            raise InvalidInput(f"sharding must be 'auto' or one of {SHARDING_TYPES}, got {self.sharding!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInput(f"device must be auto, cpu or cuda, got {self.device!r}")
        for name in ("epochs", "batch_size", "rows_per_id", "min_rows", "log_every", "prefetch"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"train config {name} must be positive, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "seed", "validate_every", "patience"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"train config {name} must not be negative, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return dataclass_from_mapping(cls, values, "train")


def load_configs(path: str | Path | None = None, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """The `[model]` and `[train]` tables of a TOML file (the default one if None), then overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    model = load_model_config(path)  # also checks that the file exists and parses
    with path.open("rb") as f:
        train_values = tomllib.load(f).get("train", {})
    if not isinstance(train_values, dict):
        raise InvalidInput(f"{path}: [train] must be a table")
    train_values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model, TrainConfig.from_dict(train_values)
    except (TypeError, ValueError) as err:
        raise InvalidInput(f"{path}: {err}") from err
