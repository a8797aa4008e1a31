"""Parameter deltas on disk: written atomically by the trainer, applied in place by the served ranker.

Self-contained (stdlib + torch only): `gpurec export` copies this file next to the ranker's
`model.py` in the model repository, so the Triton model applies deltas with exactly this code and
no gpurec install. Both sides name tensors by the served TorchScript module's state names
(`model.embedding_bag_collection.embedding_bags.t_item_id.weight`, `remap.keys`, ...).

A delta is one file `<seq:09d>.<kind>.delta` in the sync directory:

    line 1: JSON header: format, seq, kind, sha256 and length of the payload, plus what the writer
            adds (created_ms, newest event time trained, examples trained, ...)
    rest:   the payload, `torch.save` of [(name, index or None, values), ...]

- kinds: `rows` (embedding rows touched since the last delta, with their current values, plus
  the id-map slots that changed), `dense` (every dense weight), `snapshot` (every tensor in full:
  where a server that starts, restarts or falls behind begins).
- Entries carry current values, not differences, so applying a delta twice is harmless.
- Atomic: written to a hidden temporary file, flushed and fsync'ed, then renamed into place; a
  reader never sees a half-written delta under its final name. A write that fails (a full disk)
  removes its temporary file and raises `DeltaNotWritten`; the deltas before it stay as they were. The checksum catches what the
  filesystem did not (a torn copy, a flipped byte): such a delta is refused, never half applied.
- `DeltaApplier` applies deltas to a module's tensors all-or-nothing: every entry is checked
  (name, dtype, shape, index range) before the first is written, and the writes happen under the
  lock the caller's `execute` holds, so a request sees a whole delta or none of it. A gap in the
  sequence or a corrupt delta makes it reload: the newest snapshot, then the deltas after it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
KINDS = ("rows", "dense", "snapshot")
_NAME = re.compile(r"^(\d{9})\.(rows|dense|snapshot)\.delta$")

Entry = tuple[str, "torch.Tensor | None", torch.Tensor]  # (state name, row index or None, values)


class CorruptDelta(ValueError):
    """A delta file that is not whole or not what its header says."""


class DeltaNotWritten(OSError):
    """A delta (or snapshot) that could not be written whole (disk full): nothing of it is visible."""


def delta_name(seq: int, kind: str) -> str:
    return f"{seq:09d}.{kind}.delta"


def write_delta(directory: str | Path, seq: int, kind: str, entries: list[Entry], header: dict[str, Any] | None = None) -> Path:
    """Write one delta atomically; returns its path (visible only once complete)."""
    if kind not in KINDS:
        raise ValueError(f"delta kind must be one of {KINDS}, got {kind!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save([(name, index, values.detach().cpu().contiguous()) for name, index, values in entries], buffer)
    payload = buffer.getvalue()
    head = {**(header or {}), "format": FORMAT, "seq": seq, "kind": kind, "sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload)}
    final = directory / delta_name(seq, kind)
    temporary = directory / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(json.dumps(head, sort_keys=True).encode() + b"\n")
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, final)
    except OSError as error:  # a full disk: free what the partial file took; the older deltas stand
        temporary.unlink(missing_ok=True)
        message = f"delta {final.name} not written to {directory}: {error.strerror or error}; the deltas before it are intact"
        raise DeltaNotWritten(*((error.errno, message) if error.errno else (message,))) from error
    _fsync_directory(directory)
    return final


def read_header(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        line = f.readline()
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptDelta(f"{Path(path).name}: unreadable header ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptDelta(f"{Path(path).name}: not a format-{FORMAT} delta")
    return header


def read_delta(path: str | Path) -> tuple[dict[str, Any], list[Entry]]:
    """The header and entries of a delta; CorruptDelta when it is torn or altered."""
    data = Path(path).read_bytes()
    newline = data.find(b"\n")
    if newline < 0:
        raise CorruptDelta(f"{Path(path).name}: no header line")
    header = read_header(path)
    payload = data[newline + 1 :]
    if len(payload) != header.get("length") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CorruptDelta(f"{Path(path).name}: payload does not match its checksum ({len(payload)} bytes)")
    try:
        entries = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as error:  # the checksum matched, so this is a writer bug, still never applied
        raise CorruptDelta(f"{Path(path).name}: payload does not load ({error})") from None
    return header, entries


def list_deltas(directory: str | Path) -> list[tuple[int, str, Path]]:
    """(seq, kind, path) of every complete delta, in sequence order."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return sorted(found)


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DeltaApplier:
    """Keeps a module's tensors at the newest delta of a sync directory, in place.

    `lock` is the lock the server's `execute` holds while scoring. `version` is the seq of the
    last delta applied (-1: none yet). `poll()` applies what is new and returns how many deltas it
    applied; a thread can call it every few milliseconds (`start`).
    """

    def __init__(self, module: torch.nn.Module, directory: str | Path, lock: threading.Lock | None = None) -> None:
        self.directory = Path(directory)
        self.lock = lock or threading.Lock()
        self.tensors: dict[str, torch.Tensor] = dict(module.state_dict(keep_vars=False))
        self.version = -1
        self.applied = 0
        self.reloads = 0
        self.refused = 0  # corrupt deltas seen
        self.last_header: dict[str, Any] = {}
        self.last_applied_at = 0.0  # time.time() when the last delta became visible to requests
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> int:
        deltas = [d for d in list_deltas(self.directory) if d[0] > self.version]
        if not deltas:
            return 0
        if self.version < 0 or deltas[0][0] != self.version + 1:
            return self._reload()
        count = 0
        for seq, kind, path in deltas:
            if seq != self.version + 1:
                return count + self._reload()  # a gap: never serve a mix
            try:
                self._apply(seq, kind, *read_delta(path))
            except (CorruptDelta, OSError):
                self.refused += 1
                return count + self._reload()
            count += 1
        return count

    def _reload(self) -> int:
        """The newest loadable snapshot, then every delta after it; keeps serving what it has if none."""
        deltas = list_deltas(self.directory)
        for index in range(len(deltas) - 1, -1, -1):
            seq, kind, path = deltas[index]
            if kind != "snapshot":
                continue
            try:
                header, entries = read_delta(path)
            except (CorruptDelta, OSError):
                self.refused += 1
                continue
            following = []
            for next_seq, next_kind, next_path in deltas[index + 1 :]:
                if next_seq != seq + 1 + len(following):
                    break
                try:
                    following.append((next_seq, next_kind, *read_delta(next_path)))
                except (CorruptDelta, OSError):
                    self.refused += 1
                    break
            if seq < self.version and (not following or following[-1][0] <= self.version):
                return 0  # nothing newer than what is served
            try:
                self._apply(seq, kind, header, entries)
            except CorruptDelta:
                self.refused += 1
                continue
            applied = 1
            for item in following:
                try:
                    self._apply(*item)
                except CorruptDelta:
                    self.refused += 1
                    break
                applied += 1
            self.reloads += 1
            return applied
        return 0

    def _apply(self, seq: int, kind: str, header: dict[str, Any], entries: list[Entry]) -> None:
        # Checked and moved to the model's device before the lock, so requests wait only for the
        # writes. On a GPU the writes are queued on the same (default) stream as the forward passes
        # of `execute`, so a request after the lock is released runs after them.
        checked = []
        for name, index, values in entries:
            target = self._target(name, index, values)
            moved = values.to(target.device, target.dtype, non_blocking=False)
            checked.append((target, None if index is None else index.to(target.device), moved))
        with self.lock:
            with torch.no_grad():
                for target, index, values in checked:
                    if index is None:
                        target.copy_(values)
                    else:
                        target.index_copy_(0, index, values)
            self.version = seq
            self.last_header = header
            self.last_applied_at = time.time()
        self.applied += 1

    def _target(self, name: str, index: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
        target = self.tensors.get(name)
        if target is None:
            raise CorruptDelta(f"delta names {name!r}, which the served model does not have")
        if index is None:
            if values.shape != target.shape:
                raise CorruptDelta(f"{name}: delta shape {tuple(values.shape)} != served {tuple(target.shape)}")
            return target
        if index.dim() != 1 or values.shape[0] != index.numel() or values.shape[1:] != target.shape[1:]:
            raise CorruptDelta(f"{name}: delta of {tuple(values.shape)} rows at {index.numel()} indices does not fit {tuple(target.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= target.shape[0]):
            raise CorruptDelta(f"{name}: row index out of range [0, {target.shape[0]})")
        return target

    def start(self, interval_s: float = 0.005, on_error: Any = None) -> None:
        """Poll in a daemon thread until `stop()`; errors go to `on_error` (never kill the thread)."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.poll()
                except Exception as error:  # a bad delta must not stop serving
                    if on_error is not None:
                        on_error(error)

        self._thread = threading.Thread(target=loop, name="gpurec-delta-applier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def entries_size(entries: Iterable[Entry]) -> int:
    return sum(values.numel() * values.element_size() for _, _, values in entries)
