"""Forget users in a saved checkpoint: rewrite it in place, atomically, with their rows erased.

A checkpoint holds the id maps (where a user's table key is stored), the embedding tables (the
user's row) and the optimizer state (its RowWiseAdagrad accumulator). `forget_in_checkpoint` does
offline what `Trainer.forget` does in a running trainer: every id-map partition releases the ids'
rows and deny-lists the ids (never admitted again when training resumes from it), and the
released rows' embedding and optimizer state become zeros, so a model exported from it serves the
user from the shared default row, exactly like a user never seen.

It works on the stored tensors, not on a rebuilt model: the whole checkpoint is read into memory
(DCP, one process, whatever world size wrote it), the few tensors that change are edited, and the
result is written as a new checkpoint next to the old one (`dcp.save`, then `trainer.json` as it
was, then the manifest, last), which then takes the old one's place in one `renameat2` exchange
(two renames where the platform lacks it); the old files are deleted. A crash leaves either the
old or the new checkpoint under the name, never a mix, and the next call finishes or redoes the
work. Other checkpoints of the run and its `latest`/`best` pointers stay as they are.

Limits: hashed (modulo) tables share rows between users, so nothing can be released there
(`supported` is False; the user's trace stays until a retrain without their data). The shared
dense weights and other tables (items the user watched) keep what the user's examples taught
them until the next retrain (see `gpurec.privacy.membership` for what that amounts to). Deleted
files' blocks may survive on the storage medium until overwritten: erasure here is at the file
level.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from gpurec.embedding.idmap import id_map_for
from gpurec.errors import InputNotFound
from gpurec.model.checkpoint import (
    TRAINER_FILE,
    fsync_directory,
    read_trainer_state,
    seal_checkpoint,
    verify_checkpoint,
)
from gpurec.sync.forget import user_table_key


def user_table_keys(user_id: int) -> list[int]:
    """The id-map keys a user's id becomes (`gpurec.sync.forget.user_table_key`), as a list."""
    return [user_table_key(user_id)]


@dataclass
class CheckpointForget:
    """What `forget_in_checkpoint` did; true when the checkpoint was rewritten."""

    checkpoint: str
    rewritten: bool = False
    supported: bool = True  # False: hashed tables, no row is one user's to release
    released: dict[str, int] = field(default_factory=dict)  # rows released per feature
    deleted: str = ""  # why a checkpoint that failed verification was deleted instead

    def __bool__(self) -> bool:
        return self.rewritten or bool(self.deleted)


def forget_in_checkpoint(
    checkpoint_dir: str | Path, ids_by_feature: Mapping[str, Sequence[int] | torch.Tensor]
) -> CheckpointForget:
    """Erase hashed ids (table keys, e.g. `user_table_keys`) per feature from one checkpoint
    directory (``<run>/checkpoints/step-*``), in place. Idempotent: a checkpoint that already
    forgot them is left untouched. A checkpoint that fails verification (torn, altered) is never
    read as data by anyone: it is deleted, since it may hold the ids."""
    path = Path(checkpoint_dir)
    _finish_interrupted(path)
    if not (path / TRAINER_FILE).is_file():
        raise InputNotFound(f"{path} is not a checkpoint directory (no {TRAINER_FILE})")
    result = CheckpointForget(str(path))
    problem = verify_checkpoint(path)
    if problem is not None:
        shutil.rmtree(path)
        result.deleted = f"not whole ({problem}): deleted"
        return result
    run = read_trainer_state(path).run
    if run is None:
        raise InputNotFound(f"{path / TRAINER_FILE} has no trained-run record")
    specs = list(run.sparse_specs)
    maps = [id_map_for(run.model_config.ids, specs, rank=p, world_size=run.world_size) for p in range(run.world_size)]
    result.supported = maps[0].supports_forget
    if not result.supported:
        return result
    state = _read_all(path)
    id_state = state.get("ids", {})
    released: dict[str, list[torch.Tensor]] = {}
    newly_denied = 0
    for id_map in maps:
        id_map.load_state_dict(id_state)
        denied = _forgotten(id_map)
        for feature, rows in id_map.forget(ids_by_feature).items():
            released.setdefault(feature, []).append(rows)
        newly_denied += _forgotten(id_map) - denied
        id_state.update(id_map.state_dict())
    rows = {feature: torch.cat(parts) for feature, parts in released.items()}
    if not rows and not newly_denied:
        return result  # nothing new: already forgotten here (or never present and already denied)
    by_table = {spec.table_name: (spec.num_embeddings, rows[spec.name]) for spec in specs if spec.name in rows}
    _zero_rows(state, by_table)
    state["ids"] = id_state
    _replace(path, state)
    result.rewritten = True
    result.released = {feature: int(r.numel()) for feature, r in rows.items()}
    return result


def _forgotten(id_map: Any) -> int:
    return int(sum(entry["forgotten"] for entry in id_map.stats().values()))


def _read_all(path: Path) -> dict[str, Any]:
    """Every tensor of a DCP checkpoint, as plain tensors, in one process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        return _load_state_dict_from_keys(checkpoint_id=str(path))


def _zero_rows(state: dict[str, Any], by_table: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Zero the rows in each table's weight and in every per-row optimizer state of the table."""
    for name, tensor in _walk(state):
        for table, (num_rows, rows) in by_table.items():
            weight = f"embedding_bags.{table}.weight"
            is_weight = name.startswith("model.") and name.endswith(weight)
            is_state = name.startswith("optimizer.") and f"{weight}." in name
            if (is_weight or is_state) and tensor.dim() >= 1 and tensor.shape[0] == num_rows:
                tensor[rows.to(tensor.device)] = 0


def _walk(tree: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(prefix[:-1], tree)]
    if isinstance(tree, Mapping):
        return [pair for key, value in tree.items() for pair in _walk(value, f"{prefix}{key}.")]
    if isinstance(tree, list | tuple):
        return [pair for i, value in enumerate(tree) for pair in _walk(value, f"{prefix}{i}.")]
    return []


# --- replacing the directory --------------------------------------------------------------------


def _staging(path: Path) -> tuple[Path, Path]:
    """(new checkpoint being written, old one swapped out): hidden siblings `step-*` never matches."""
    return path.with_name(f".{path.name}.forget-new"), path.with_name(f".{path.name}.forget-old")


def _finish_interrupted(path: Path) -> None:
    """Clean up after a rewrite that crashed: a half-written new checkpoint is dropped; an old
    one swapped out is deleted, or put back if the swap was cut between its two renames."""
    new, old = _staging(path)
    if new.exists() and not (new / "manifest.json").exists():
        shutil.rmtree(new)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        elif new.exists():
            os.replace(new, path)  # the sealed new one was about to take the name
            shutil.rmtree(old)
        else:
            os.replace(old, path)
    if new.exists():
        shutil.rmtree(new)  # sealed but never swapped in: redone from the old one


def _replace(path: Path, state: dict[str, Any]) -> None:
    new, old = _staging(path)
    shutil.rmtree(new, ignore_errors=True)
    try:
        dcp.save(state, checkpoint_id=str(new), no_dist=True)
        shutil.copyfile(path / TRAINER_FILE, new / TRAINER_FILE)
        seal_checkpoint(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if _exchange(new, path):
        shutil.rmtree(new)  # now the old checkpoint
    else:
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    fsync_directory(path.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))

