"""Checkpoints: the sharded model, both optimizers' state and the data position, resumable exactly.

Layout under the training output directory:

    checkpoints/step-00000123/     torch.distributed.checkpoint (DCP) files: model + optimizer
    checkpoints/step-00000123/trainer.json   configs, data position, what the model reads
    checkpoints/latest             the name of the newest complete checkpoint

DCP writes each rank's shards in parallel and can load them into a different sharding (or into
an unsharded model for evaluation and export), so a checkpoint is not tied to the world size it
was written with. `latest` is replaced only after every rank has finished writing, so a crash
mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.json"


@dataclass
class TrainerState:
    """Where training stands: the next batch to train is `batch` of `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # configs and feature layout, for readers


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


def save_checkpoint(
    out_dir: str | Path, model: nn.Module, optimizer: Any, state: TrainerState, keep: int = 2, ids: Any = None
) -> Path:
    """Save (collectively: every rank calls it) and point `latest` at it; keep the newest `keep`.

    `ids` (a `CollisionlessIds`) adds this rank's partition of the id maps: keys are per
    partition, so every rank writes its own and a reader can load any or all of them.
    """
    root = checkpoint_root(out_dir)
    path = root / f"step-{state.step:08d}"
    content = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if ids is not None:
        content["ids"] = ids.state_dict()
    dcp.save(content, checkpoint_id=path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        (path / TRAINER_FILE).write_text(json.dumps(asdict(state), indent=2))
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(path.name)
        tmp.replace(root / LATEST)
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != path)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def read_trainer_state(checkpoint: str | Path) -> TrainerState:
    return TrainerState(**json.loads((Path(checkpoint) / TRAINER_FILE).read_text()))


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: Any | None = None, ids: Any = None) -> TrainerState:
    """Load into `model` (sharded or not) and, if given, `optimizer` and `ids` (one id map or a
    list of them, e.g. every partition for export); return the trainer state."""
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    id_maps = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if id_maps:
        state["ids"] = {key: tensor for id_map in id_maps for key, tensor in id_map.state_dict().items()}
    dcp.load(state, checkpoint_id=Path(checkpoint))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for id_map in id_maps:
        id_map.load_state_dict(state["ids"])
    return read_trainer_state(checkpoint)
