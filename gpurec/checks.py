"""Checks of the command-line values and paths a stage reads or writes.

The argparse `type=` functions below refuse out-of-range flags (the console command turns the
refusal into one line, exit 2); the path checks raise the typed errors of `gpurec.errors`. Stages
call them before doing any work, so a wrong value fails in a second with a message naming the flag,
instead of minutes later (or with an OSError traceback) deep in a library. A base module like
`gpurec.errors`: every stage may import it, it imports no stage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from pathlib import Path

from gpurec.errors import InputNotFound, InvalidInput

# Layout of a training run (gpurec.model.checkpoint): `<run>/checkpoints/latest` names the newest
# checkpoint directory, which holds `trainer.json`. Repeated here so the check needs no torch.
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
TRAINER_FILE = "trainer.json"


def require_dir(path: str | Path, what: str) -> Path:
    """`path` if it is an existing directory; InputNotFound naming `what` (e.g. "--input") if not."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{what} {path} does not exist")
    if not path.is_dir():
        raise InputNotFound(f"{what} {path} is a file, not a directory")
    return path


def require_file(path: str | Path, what: str) -> Path:
    """`path` if it is an existing file; InputNotFound naming `what` if not."""
    path = Path(path)
    if not path.exists():
        raise InputNotFound(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputNotFound(f"{what} {path} is a directory, not a file")
    return path


def output_dir(path: str | Path, what: str) -> Path:
    """`path` if a directory can be written there: it is one, or it (and maybe parents) can be made.

    InvalidInput when `path`, or the nearest existing parent, is a file.
    """
    path = Path(path)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if existing.is_dir():
            return path
        if existing == path:
            raise InvalidInput(f"{what} {path} is a file, not a directory")
        raise InvalidInput(f"{what} {path}: {existing} is a file, so no directory can be made under it")
    return path


def require_checkpoint(path: str | Path, what: str = "--checkpoint") -> Path:
    """The checkpoint directory of a training run (its best validated one, else its latest) or
    `path` itself if it is one (the choice of `gpurec.model.checkpoint.find_checkpoint`).

    InputNotFound when there is none, before torch is even imported.
    """
    path = require_dir(path, what)
    best = path / CHECKPOINTS / BEST
    pointer = best if best.is_file() else path / CHECKPOINTS / LATEST
    if (path / TRAINER_FILE).is_file():
        checkpoint = path
    elif pointer.is_file():
        checkpoint = path / CHECKPOINTS / pointer.read_text().strip()
        if not (checkpoint / TRAINER_FILE).is_file():
            raise InputNotFound(f"{pointer} names {checkpoint.name}, which is not a complete checkpoint (no {TRAINER_FILE})")
    else:
        raise InputNotFound(
            f"no checkpoint in {what} {path} (expected a training run with {CHECKPOINTS}/{LATEST}, "
            f"or a checkpoint directory with {TRAINER_FILE}; write one with `gpurec train --out {path}`)"
        )
    try:
        json.loads((checkpoint / TRAINER_FILE).read_text())
    except (OSError, ValueError) as err:
        raise InvalidInput(f"{checkpoint / TRAINER_FILE} is not readable JSON: {err}") from None
    return checkpoint


__all__ = ["output_dir", "require_checkpoint", "require_dir", "require_file"]


# ---- argparse `type=` functions for the commands' numeric and date flags ---------------------


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def port(text: str) -> int:
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1-65535, got {text}")
    return value


def iso_day(text: str) -> str:
    """A calendar day, YYYY-MM-DD (returned as given)."""
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a day YYYY-MM-DD, got {text!r}") from None
    if len(text) != 10:
        raise argparse.ArgumentTypeError(f"must be a day YYYY-MM-DD, got {text!r}")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value
