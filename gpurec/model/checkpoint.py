"""Checkpoints: the sharded model, both optimizers' state and the data position, resumable exactly.

Layout under the training output directory:

    checkpoints/step-00000123/     torch.distributed.checkpoint (DCP) files: model + optimizer + id maps
    checkpoints/step-00000123/trainer.json   data position and the `TrainedRun`: what the model reads
    checkpoints/latest             the name of the newest complete checkpoint
    checkpoints/best               the name of the checkpoint that scored best on the valid split

Training writes checkpoints (`save_checkpoint`); evaluation, export and parameter sync read them
through `read_trained_run` and `gpurec.model.trained.load_trained_model`, so the format lives here,
in the model stage, below every reader: none of them imports the training package.

Two pointers, two uses. Resuming training continues from `latest` (the data position moves on
from there). A reader of a run (`find_checkpoint`: evaluation, export, `--init` of online training)
gets `best` when the run has one: batch training validates its checkpoints and points `best` at
the one with the highest valid AUC (`mark_best`). A checkpoint saved without `keep_best` (online
training, or batch training without validation) removes `best`, because nothing has judged it
against the newer model; the run's newest checkpoint is then the one to read.

DCP writes each rank's shards in parallel and can load them into a different sharding (or into
an unsharded model for evaluation and export), so a checkpoint is not tied to the world size it
was written with. `latest` is replaced only after every rank has finished writing, so a crash
mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.model.config import ModelConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
TRAINER_FILE = "trainer.json"


@dataclass(frozen=True)
class TrainedRun:
    """What a checkpoint's model reads and how it was made: written by training, read by evaluation,
    export and parameter sync (one typed reader instead of a dict of keys)."""

    model_config: ModelConfig
    sparse_specs: tuple[SparseFeatureSpec, ...]  # one table per sparse feature, in model order
    num_dense: int
    labels: tuple[str, ...]  # the manifest's label columns
    data_dir: str  # the preprocessed features it was trained on (their manifest names the dense order)
    world_size: int  # ranks, = partitions of the collisionless id maps in the checkpoint
    train_config: Mapping[str, Any] = field(default_factory=dict)  # the training settings, as a record
    resumed_from: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse_specs", tuple(self.sparse_specs))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "train_config", MappingProxyType(dict(self.train_config)))

    def to_json(self) -> dict[str, Any]:
        return {
            "model_config": asdict(self.model_config),
            "sparse_specs": [asdict(spec) for spec in self.sparse_specs],
            "num_dense": self.num_dense,
            "labels": list(self.labels),
            "data_dir": self.data_dir,
            "world_size": self.world_size,
            "train_config": dict(self.train_config),
            "resumed_from": self.resumed_from,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainedRun:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidInput(f"trained run record has unknown keys {sorted(unknown)}")
        values = dict(data)
        values["model_config"] = ModelConfig(**values["model_config"])
        values["sparse_specs"] = tuple(SparseFeatureSpec(**spec) for spec in values["sparse_specs"])
        return cls(**values)


@dataclass
class Validation:
    """Batch training's record of scoring its checkpoints on the valid split (early stopping)."""

    best_step: int = -1  # the best checkpoint's step (-1: none validated yet)
    best_score: float | None = None  # its score: the mean over tasks of the valid AUC
    best_auc: dict[str, float] = field(default_factory=dict)  # its valid AUC per task
    last_step: int = -1  # the step validated last
    rounds: int = 0  # validations so far
    since_best: int = 0  # validations since the best one: training stops when this reaches patience

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Validation:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class TrainerState:
    """Where training stands: the next batch to train is `batch` of `epoch`; `run` says what it trains."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    run: TrainedRun | None = None
    # Online training: the next offset of every input partition ("examples/3" -> offset), saved with
    # the model so a restarted trainer continues exactly after the last example it trained ...
    offsets: dict[str, int] = field(default_factory=dict)
    # ... and an order-independent checksum of the examples trained (a sum of their keys' hashes
    # mod 2**64), so a test can check that each was trained exactly once.
    digest: int = 0
    # Batch training with validation: the scores so far and the best step (None: not validating).
    validation: Validation | None = None

    def to_json(self) -> dict[str, Any]:
        position = {"step": self.step, "epoch": self.epoch, "batch": self.batch, "samples": self.samples}
        online = {"offsets": dict(self.offsets), "digest": self.digest} if self.offsets else {}
        validated = {"validation": self.validation.to_json()} if self.validation is not None else {}
        return {**position, **online, **validated, "run": self.run.to_json() if self.run is not None else None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainerState:
        run = data.get("run")
        position = {k: int(data[k]) for k in ("step", "epoch", "batch", "samples")}
        offsets = {str(k): int(v) for k, v in data.get("offsets", {}).items()}
        validation = data.get("validation")
        return cls(
            **position,
            run=TrainedRun.from_json(run) if run is not None else None,
            offsets=offsets,
            digest=int(data.get("digest", 0)),
            validation=Validation.from_json(validation) if validation is not None else None,
        )


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def latest_checkpoint(out_dir_or_checkpoint: str | Path) -> Path | None:
    """A checkpoint directory: the given one if it is a checkpoint, else the run's latest."""
    path = Path(out_dir_or_checkpoint)
    if (path / TRAINER_FILE).exists():
        return path
    pointer = checkpoint_root(path) / LATEST
    if not pointer.exists():
        return None
    return checkpoint_root(path) / pointer.read_text().strip()


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's best validated checkpoint (`checkpoints/best`), if it has one that is complete."""
    pointer = checkpoint_root(out_dir) / BEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    return path if (path / TRAINER_FILE).is_file() else None


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    optimizer: Any,
    state: TrainerState,
    keep: int = 2,
    ids: Any = None,
    keep_best: bool = False,
) -> Path:
    """Save (collectively: every rank calls it) and point `latest` at it; keep the newest `keep`
    (and the `best` one, which may be older).

    `ids` (an `IdMap`) adds this rank's partition of the id maps (when it has state): keys are
    per partition, so every rank writes its own and a reader can load any or all of them.
    `keep_best`: this checkpoint will be validated (batch training), so `best` stays until
    `mark_best` moves it; otherwise `best` is removed and readers get this newest checkpoint.
    """
    root = checkpoint_root(out_dir)
    path = root / f"step-{state.step:08d}"
    content = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if ids is not None and ids.state_dict():
        content["ids"] = ids.state_dict()
    dcp.save(content, checkpoint_id=path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        (path / TRAINER_FILE).write_text(json.dumps(state.to_json(), indent=2))
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(path.name)
        tmp.replace(root / LATEST)
        if not keep_best:
            (root / BEST).unlink(missing_ok=True)
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return path


def mark_best(out_dir: str | Path, checkpoint: str | Path, keep: int = 2) -> None:
    """Point `best` at a checkpoint of this run (one rank calls it, after the save's barrier)."""
    root = checkpoint_root(out_dir)
    tmp = root / (BEST + ".tmp")
    tmp.write_text(Path(checkpoint).name)
    tmp.replace(root / BEST)
    _prune(root, keep)  # the previous best may now be older than the newest `keep`


def write_trainer_state(checkpoint: str | Path, state: TrainerState) -> None:
    """Replace a saved checkpoint's trainer.json (validation results arrive after the save)."""
    path = Path(checkpoint) / TRAINER_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2))
    tmp.replace(path)


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, sparing the ones `latest` and `best` name
    (`best` may be older than the newest `keep`)."""
    spare = {pointer.read_text().strip() for pointer in (root / LATEST, root / BEST) if pointer.is_file()}
    ordered = sorted(p for p in root.glob("step-*") if p.is_dir())
    for stale in ordered[: max(0, len(ordered) - keep)]:
        if stale.name not in spare:
            shutil.rmtree(stale, ignore_errors=True)


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState.from_json(json.loads((Path(checkpoint) / TRAINER_FILE).read_text()))


def find_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """The checkpoint to read: the given checkpoint directory, or a training run's best validated
    checkpoint (`checkpoints/best`), or, when it has none, its latest."""
    given = Path(run_or_checkpoint)
    path = None if (given / TRAINER_FILE).exists() else best_checkpoint(given)
    path = path or latest_checkpoint(run_or_checkpoint)
    if path is None:
        raise InputNotFound(
            f"no checkpoint in {run_or_checkpoint} (expected a training run with checkpoints/latest, "
            f"or a checkpoint directory with {TRAINER_FILE})"
        )
    return path


def read_trained_run(run_or_checkpoint: str | Path) -> TrainedRun:
    """The `TrainedRun` of a checkpoint (or of the one `find_checkpoint` picks in a training run)."""
    path = find_checkpoint(run_or_checkpoint)
    run = read_trainer_state(path).run
    if run is None:
        raise InvalidInput(f"{path / TRAINER_FILE} has no trained-run record")
    return run


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: Any | None = None, ids: Any = None) -> TrainerState:
    """Load into `model` (sharded or not) and, if given, `optimizer` and `ids` (one id map or a
    list of them, e.g. every partition for export); return the trainer state."""
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    id_maps = [] if ids is None else ids if isinstance(ids, list) else [ids]
    id_maps = [id_map for id_map in id_maps if id_map.state_dict()]  # stateless maps (hashing) save nothing
    if id_maps:
        state["ids"] = {key: tensor for id_map in id_maps for key, tensor in id_map.state_dict().items()}
    dcp.load(state, checkpoint_id=Path(checkpoint))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for id_map in id_maps:
        id_map.load_state_dict(state["ids"])
    return read_trainer_state(checkpoint)
