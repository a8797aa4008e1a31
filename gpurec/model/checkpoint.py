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
was written with.

Torn writes and full disks. A checkpoint is written under a hidden name (`.step-00000123.partial`),
every file fsync'ed, then `manifest.json` (each file's size and sha256) is written last, and only
then is the directory renamed to `step-00000123` and `latest` moved (each pointer: temporary file,
fsync, rename). So a crash or a full disk mid-save leaves the previous checkpoint as the one to
resume from, and a save that fails raises `CheckpointNotWritten`, one line that names the intact
previous checkpoint. Readers verify the manifest (`verify_checkpoint`): a checkpoint whose files
were truncated or altered afterwards is never read as data; `latest_checkpoint` and
`find_checkpoint` then fall back to the newest checkpoint that verifies, with a warning, and
`load_checkpoint` of such a directory raises `CorruptCheckpoint`. Checkpoints written before
manifests existed are read unverified.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
from gpurec.errors import GpurecError, InputNotFound, InvalidInput
from gpurec.model.config import ModelConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
TRAINER_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1
DCP_METADATA = ".metadata"

log = logging.getLogger(__name__)


class CheckpointNotWritten(GpurecError):
    """A save that failed (disk full, file too large, I/O error): nothing of it became visible."""


class CorruptCheckpoint(InvalidInput):
    """A checkpoint whose files do not match its manifest (torn, truncated or altered)."""


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
    """A checkpoint directory: the given one if it is a checkpoint, else the run's latest whole one.

    When `latest` names a checkpoint that fails verification (or is missing or unreadable) this
    is the newest checkpoint that verifies, with a warning; None when the run has none."""
    path = Path(out_dir_or_checkpoint)
    if (path / TRAINER_FILE).exists():
        return path
    root = checkpoint_root(path)
    named = _read_pointer(root / LATEST)
    if named is not None and verify_checkpoint(root / named) is None:
        return root / named
    return _fall_back(root, named, LATEST)


def best_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's best validated checkpoint (`checkpoints/best`), if it has one that verifies."""
    root = checkpoint_root(out_dir)
    named = _read_pointer(root / BEST)
    if named is None:
        return None
    problem = verify_checkpoint(root / named)
    if problem is not None:
        log.warning("checkpoint %s (best) is not whole: %s; reading the latest instead", named, problem)
        return None
    return root / named


def verify_checkpoint(checkpoint: str | Path) -> str | None:
    """Why a checkpoint directory cannot be read as data (None: it is whole).

    Checks every file against `manifest.json` (size and sha256). A verified directory is not
    hashed again while its files' sizes and modification times stay the same (a process may
    look up `latest` many times)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return "missing"
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():  # written before manifests existed: read unverified
        return None if (path / TRAINER_FILE).is_file() and (path / DCP_METADATA).is_file() else "incomplete: no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable {MANIFEST_FILE} ({type(error).__name__})"
    present = {p.name for p in path.iterdir() if p.name != MANIFEST_FILE}
    if missing := sorted(set(files) - present):
        return f"missing {', '.join(missing)}"
    for name, (size, _) in sorted(files.items()):
        actual = (path / name).stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} (torn)"
    key, signature = str(path.resolve()), _signature(path, files)
    if _VERIFIED.get(key) == signature:
        return None
    for name, (_, digest) in sorted(files.items()):
        if _sha256(path / name) != digest:
            return f"{name} does not match its sha256 (altered or torn)"
    _VERIFIED[key] = signature
    return None


_VERIFIED: dict[str, tuple] = {}  # checkpoint -> the file stats it verified (or was written) with


def _signature(path: Path, files: Mapping[str, Any]) -> tuple:
    stats = [(name, (path / name).stat()) for name in sorted(files)]
    manifest = (path / MANIFEST_FILE).stat()
    return (manifest.st_mtime_ns, manifest.st_ino, *((n, s.st_size, s.st_mtime_ns, s.st_ino) for n, s in stats))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoints(root: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (hidden partial saves are not among them)."""
    return sorted(p for p in root.glob("step-*") if p.is_dir()) if root.is_dir() else []


def _read_pointer(pointer: Path) -> str | None:
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name.startswith("step-") and "/" not in name else None


def _fall_back(root: Path, named: str | None, pointer: str) -> Path | None:
    """The newest checkpoint that verifies, when `pointer` names none that does (warned)."""
    if named is None and not (root / pointer).exists() and not _checkpoints(root):
        return None  # a run that has not saved yet
    what = f"{pointer} names {named}" if named else f"{pointer} is missing or unreadable"
    problem = verify_checkpoint(root / named) if named else None
    for candidate in reversed(_checkpoints(root)):
        if candidate.name != named and verify_checkpoint(candidate) is None:
            log.warning("checkpoint: %s%s; rolled back to %s", what, f", which is not whole: {problem}" if problem else "", candidate.name)
            return candidate
    log.warning("checkpoint: %s%s, and no other checkpoint is whole", what, f" ({problem})" if problem else "")
    return None


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    """Write a small file whole or not at all: a temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _manifest(checkpoint: Path) -> str:
    """The manifest of every file in `checkpoint`: name -> size and sha256."""
    files = {}
    for p in sorted(checkpoint.iterdir()):
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.endswith(".tmp"):
            files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1)


def seal_checkpoint(checkpoint: str | Path) -> None:
    """Write a checkpoint directory's manifest last, durably: for a tool that writes a checkpoint's
    files itself (the erasure rewrite, `gpurec.privacy.checkpoint_forget`)."""
    _write_durably(Path(checkpoint) / MANIFEST_FILE, _manifest(Path(checkpoint)))


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
    A save that fails (a full disk) raises `CheckpointNotWritten` and leaves the previous
    checkpoints as they were.
    """
    root = checkpoint_root(out_dir)
    path = root / f"step-{state.step:08d}"
    partial = root / f".{path.name}.partial"  # hidden until whole: `step-*` never matches it
    rank = dist.get_rank() if dist.is_initialized() else 0
    content = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if ids is not None and ids.state_dict():
        content["ids"] = ids.state_dict()
    if rank == 0 and root.is_dir():
        for leftover in root.glob(".step-*.partial"):  # what a crashed save left (one trainer per run)
            shutil.rmtree(leftover, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    try:
        dcp.save(content, checkpoint_id=partial)  # every rank's files, fsync'ed, before it returns
        if rank == 0:
            _write_durably(partial / TRAINER_FILE, json.dumps(state.to_json(), indent=2))
            _write_durably(partial / MANIFEST_FILE, _manifest(partial))
            if path.exists():  # the same step saved again: the new one replaces it whole
                shutil.rmtree(path)
            os.replace(partial, path)
            fsync_directory(root)
            # Hashed just now: readers in this process need not hash it again.
            _VERIFIED[str(path.resolve())] = _signature(path, json.loads((path / MANIFEST_FILE).read_text())["files"])
            _write_durably(root / LATEST, path.name)
    except (Exception, dcp.CheckpointException) as error:  # DCP's wrapper of a rank's failure is a BaseException
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # free what the failed save took
        raise CheckpointNotWritten(_not_written(path, root, error)) from error
    if rank == 0:
        if not keep_best:
            (root / BEST).unlink(missing_ok=True)
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()
    return path


def _not_written(path: Path, root: Path, error: BaseException) -> str:
    """One line: what failed, why, and what is still there. The OS error is looked for under DCP's
    wrapper; torch's zip writer loses it ("unexpected pos"), so an 8 MiB probe write then asks the
    filesystem itself (a full disk or a file-size limit answers the same way)."""
    cause = _innermost(error)
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else _probe_write(root)
    if reason is None:
        reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"
    previous = _read_pointer(root / LATEST)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return f"checkpoint {path.name} not written to {root}: {reason}; {kept} (free space, then rerun to resume from it)"


def _innermost(error: BaseException) -> BaseException:
    """The first OSError in the chain of causes (and of DCP's per-rank failures), else the last cause."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and not any(cause is s for s in seen):
        if isinstance(cause, OSError):
            return cause
        seen.append(cause)
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(cause, "failures", {}).values()]
        nested = [f for f in failures if isinstance(f, BaseException)]
        cause = cause.__cause__ or cause.__context__ or (nested[0] if nested else None)
    return seen[-1]


def _probe_write(root: Path) -> str | None:
    probe = root / f".probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(8 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        return error.strerror or str(error)
    finally:
        probe.unlink(missing_ok=True)
    return None


def mark_best(out_dir: str | Path, checkpoint: str | Path, keep: int = 2) -> None:
    """Point `best` at a checkpoint of this run (one rank calls it, after the save's barrier)."""
    root = checkpoint_root(out_dir)
    _write_durably(root / BEST, Path(checkpoint).name)
    _prune(root, keep)  # the previous best may now be older than the newest `keep`


def write_trainer_state(checkpoint: str | Path, state: TrainerState) -> None:
    """Replace a saved checkpoint's trainer.json (validation results arrive after the save), and
    its manifest entry. A crash between the two renames leaves a checkpoint that does not verify:
    readers then roll back to the previous one, never read a mismatched pair."""
    checkpoint = Path(checkpoint)
    text = json.dumps(state.to_json(), indent=2)
    manifest = None
    if (checkpoint / MANIFEST_FILE).exists():  # the other files are unchanged: only this entry moves
        manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
        manifest["files"][TRAINER_FILE] = {"size": len(text.encode()), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    _write_durably(checkpoint / TRAINER_FILE, text)
    if manifest is not None:
        _write_durably(checkpoint / MANIFEST_FILE, json.dumps(manifest, indent=1))


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, sparing the ones `latest` and `best` name
    (`best` may be older than the newest `keep`)."""
    spare = {name for pointer in (root / LATEST, root / BEST) if (name := _read_pointer(pointer))}
    ordered = _checkpoints(root)
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
    list of them, e.g. every partition for export); return the trainer state. A checkpoint that
    does not match its manifest raises `CorruptCheckpoint` before anything is loaded."""
    problem = verify_checkpoint(checkpoint)
    if problem is not None:
        raise CorruptCheckpoint(f"checkpoint {checkpoint} is not whole: {problem}; never read as data (load an earlier one)")
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    id_maps = [] if ids is None else ids if isinstance(ids, list) else [ids]
    id_maps = [id_map for id_map in id_maps if id_map.state_dict()]  # stateless maps (hashing) save nothing
    if id_maps:
        state["ids"] = {key: tensor for id_map in id_maps for key, tensor in id_map.state_dict().items()}
        saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
        # Only what the checkpoint holds: the id map fills state added later (erasure) itself.
        state["ids"] = {key: tensor for key, tensor in state["ids"].items() if f"ids.{key}" in saved}
    dcp.load(state, checkpoint_id=Path(checkpoint))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    for id_map in id_maps:
        id_map.load_state_dict(state["ids"])
    return read_trainer_state(checkpoint)
