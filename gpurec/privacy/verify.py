"""The forget verifier: search every artifact of a workspace for a user's ids; any trace fails.

`find_traces(workspace, user_id, pseudonym_id, table_keys)` looks for every form a user's id takes
(`id_forms`): the raw id, the pseudonymous id, the hashed ids preprocessing and serving put in
``sparse_user_id`` (``hash_id(id, "user_id")``, also the keys of the collisionless id maps) and any
table keys the caller knows. Where it looks:

- every Parquet file (raw logs, preprocessed splits): integer and list-of-integer columns;
- the event log through the `EventLog` interface (SQLite or Kafka, every topic and partition):
  record keys and the user ids of decoded records (served rows with their sparse inputs, actions,
  consent changes, examples, dead letters and the payload bytes they carry), plus the joiner's
  state (LocalEventLog's ``state`` table; Kafka's state changelogs);
- every SQLite file (the log, the feature store, anything else): every table and column;
- a Redis feature store (``redis://`` URL): every key, by SCAN, its name and its values;
- torch artifacts: DCP checkpoints (any directory with a ``.metadata``), ``*.pt``/``*.pth`` files
  (TorchScript model repositories included) and parameter deltas: every integer tensor;
- text files (``*.json``, ``*.jsonl``, ``*.log``, ``*.txt``, ``*.pbtxt``, ...): a user field
  (``"user_id": 42``, ``user=42``, ``user 42``) holding one of the ids;
- every file, byte for byte, for the ids of 2**32 and above (pseudonymous and hashed ids are 63/64
  bits, so no false positives): their decimal string and 8-byte little and big-endian forms. This
  catches what no reader above knows (a new artifact, SQLite free pages and WAL residue, caches).

Small ids (below 2**32) collide with counts, positions and item ids, so they count only where a
field names a user (column ``user_id``, a user-keyed topic's record key, a Redis ``u:<id>`` key).
An artifact that cannot be read is a trace of kind ``unreadable``: the verdict fails closed.
Traces never contain the ids themselves (they are redacted), so a report can be stored safely.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gpurec.data.hashing_core import hash_id
from gpurec.privacy.verify_stores import USER_FEATURE, StoreScans, is_sqlite, sqlite_path
from gpurec.workspace import Workspace

SMALL = 1 << 32
TEXT_SUFFIXES = (".json", ".jsonl", ".log", ".txt", ".pbtxt", ".toml", ".csv", ".yaml", ".yml", ".md")
TORCH_SUFFIXES = (".pt", ".pth")
# A field naming a user (`"user_id": 42`, `user=42`, `user 42`, `forgotten_user: "42"`), but not a
# count such as `user_n` or `users`: the name ends in user / user_id / userid.
_USER_FIELD = re.compile(rb"""(?i)user(?:_?id)?["']?\s*(?:[:=]\s*|\s+#?)["']?(-?\d+)(?![\d.])""")
_USER_IN_NAME = re.compile(rb"(?i)user[-_ =]?(?:id[-_ =]?)?(\d+)(?!\d)")


@dataclass(frozen=True)
class Trace:
    """One place a user's id was found (or an artifact that could not be searched)."""

    kind: str  # raw, features, parquet, event_log, joiner_state, sqlite, feature_store, checkpoint,
    # delta, model, torch, text, privacy, bytes, unreadable
    artifact: str  # path relative to the workspace, or a URL
    where: str  # column / topic[partition] field / table.column / tensor / key / line
    matched: str  # which form of the id (see `id_forms`), or why the artifact is unreadable
    first: str = ""  # the first exact position (offset, row, line)
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def id_forms(user_id: int, pseudonym_id: int | None = None, table_keys: Sequence[int] = ()) -> dict[int, str]:
    """Every value a user's id takes in gpurec's artifacts -> what it is (the mapping searched)."""
    forms: dict[int, str] = {}
    for value, what in ((user_id, "raw id"), (pseudonym_id, "pseudonymous id")):
        if value is None:
            continue
        forms.setdefault(int(value), what)
        forms.setdefault(hash_id(int(value), USER_FEATURE), f"hashed {what} (sparse_user_id / id-map key)")
    for key in table_keys:
        forms.setdefault(int(key), "table key")
    return forms


class _Search(StoreScans):
    def __init__(self, workspace: Workspace, forms: dict[int, str], exclude: Sequence[Path]) -> None:
        self.ws, self.forms = workspace, forms
        self.big = {v: w for v, w in forms.items() if abs(v) >= SMALL}
        self.exclude = [Path(p).resolve() for p in exclude]
        self.searched: Counter[str] = Counter()
        self.found: dict[tuple[str, str, str, str], list[Any]] = {}
        self.notes: list[str] = []
        self._all = np.array(sorted(forms), dtype=np.int64)
        self._big = np.array(sorted(self.big), dtype=np.int64)
        self._patterns = [
            (v, [(str(v).encode(), True), (v.to_bytes(8, "little", signed=True), False), (v.to_bytes(8, "big", signed=True), False)])
            for v in self.big
        ]

    # ---- recording -----------------------------------------------------------------------------
    def add(self, kind: str, artifact: str, where: str, value: int, first: object = "", count: int = 1) -> None:
        key = (kind, self.redact(artifact), self.redact(where), self.forms[value])
        entry = self.found.setdefault(key, [self.redact(str(first)), 0])
        entry[1] += count

    def unreadable(self, kind: str, artifact: str, error: BaseException | str) -> None:
        self.found.setdefault(("unreadable", self.redact(artifact), kind, self.redact(str(error))[:300]), ["", 1])

    def redact(self, text: str) -> str:
        """`text` without the ids (big ones anywhere; small ones only after a user-naming word: a
        small number elsewhere, "row 7", is not the id)."""
        for value, what in self.forms.items():
            label = f"<{what.split(' (')[0]}>"
            if value in self.big:
                text = re.sub(rf"(?<!\d){re.escape(str(value))}(?!\d)", label, text)
            else:
                text = re.sub(rf"(?i)(user[-_ =:]?(?:id[-_ =:]?)?){value}(?!\d)", rf"\g<1>{label}", text)
        return text

    def traces(self) -> list[Trace]:
        found = [Trace(k, a, w, m, first, count) for (k, a, w, m), (first, count) in self.found.items()]
        return sorted(found, key=lambda t: (t.kind == "bytes", t.artifact, t.kind, t.where, t.matched))

    def name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.ws.root))
        except ValueError:
            return str(path)

    # ---- matching --------------------------------------------------------------------------------
    def match(self, value: object, user_field: bool) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        table = self.forms if user_field else self.big
        return value if value in table else None

    def match_array(self, values: np.ndarray, user_field: bool) -> dict[int, tuple[int, int]]:
        """value -> (count, first index) of the forms in an integer array."""
        wanted = self._all if user_field else self._big
        values = np.asarray(values).ravel()
        if not wanted.size or not values.size or not np.issubdtype(values.dtype, np.integer):
            return {}
        hits = np.flatnonzero(np.isin(values, wanted))
        out: dict[int, tuple[int, int]] = {}
        for i in hits:
            v = int(values[i])
            count, first = out.get(v, (0, int(i)))
            out[v] = (count + 1, first)
        return out

    def match_bytes(self, data: bytes, forms: Iterable[tuple[int, list[tuple[bytes, bool]]]] | None = None) -> Iterator[tuple[int, int, int]]:
        """(value, count, first offset) of the big ids' decimal and 8-byte forms in `data`."""
        for value, patterns in self._patterns if forms is None else forms:
            count, first = 0, -1
            for pattern, decimal in patterns:
                at = data.find(pattern)
                while at >= 0:
                    end = at + len(pattern)
                    if not decimal or (not data[at - 1 : at].isdigit() and not data[end : end + 1].isdigit()):
                        count += 1
                        first = at if first < 0 else min(first, at)
                    at = data.find(pattern, at + 1)
            if count:
                yield value, count, first

    def user_fields(self, text: bytes) -> Iterator[tuple[int, int]]:
        """(value, offset) of ids held by a field that names a user."""
        for m in _USER_FIELD.finditer(text):
            value = self.match(int(m.group(1)), True)
            if value is not None:
                yield value, m.start()

    def ints_in(self, obj: object, path: str = "") -> Iterator[tuple[str, int]]:
        """Every integer (and decimal string) of a decoded structure, with its path."""
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from self.ints_in(v, f"{path}.{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                yield from self.ints_in(v, f"{path}[{i}]")
        elif isinstance(obj, int) and not isinstance(obj, bool):
            yield path, obj
        elif isinstance(obj, str) and obj.lstrip("-").isdigit():
            yield path, int(obj)

    # ---- files -------------------------------------------------------------------------------
    def files(self) -> Iterator[Path]:
        for top, dirs, names in os.walk(self.ws.root):
            base = Path(top)
            for d in list(dirs):
                if (base / d).is_symlink():
                    self.notes.append(f"symlinked directory not followed: {self.name(base / d)}")
            dirs[:] = sorted(d for d in dirs if not self.excluded(base / d))
            for n in sorted(names):
                if not self.excluded(base / n):
                    yield base / n

    def excluded(self, path: Path) -> bool:
        resolved = path.resolve()
        if any(resolved == e or e in resolved.parents for e in self.exclude):
            self.notes.append(f"excluded by the caller: {self.name(path)}")
            return True
        return False

    def kind_of(self, path: Path, default: str) -> str:
        for kind, top in (("raw", self.ws.raw), ("features", self.ws.features), ("privacy", self.ws.privacy), ("model", self.ws.repo)):
            if top in path.parents:
                return kind
        return default

    def scan_bytes(self, path: Path) -> None:
        self.searched["bytes"] += 1
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                # mapped, not read: a checkpoint may be larger than memory; the page cache pages it
                data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
                with contextlib.closing(data) if size else contextlib.nullcontext():
                    for value, count, first in self.match_bytes(data):
                        self.add("bytes", self.name(path), "file bytes (decimal / int64 LE / BE)", value, f"byte {first}", count)
                    if path.suffix in TEXT_SUFFIXES or self.ws.privacy in path.parents:
                        self.scan_text(path, bytes(data))
        except (OSError, ValueError) as err:
            return self.unreadable("bytes", self.name(path), err)
        name = self.name(path).encode()  # a path naming the user (export-user-42.json) is a trace too
        found = [(v, 1) for v in (self.match(int(m.group(1)), True) for m in _USER_IN_NAME.finditer(name)) if v is not None]
        for value, _ in dict(found + [(v, c) for v, c, _f in self.match_bytes(name)]).items():
            self.add(self.kind_of(path, "bytes"), self.name(path), "file name", value)

    def scan_text(self, path: Path, data: bytes) -> None:
        kind = self.kind_of(path, "text")
        self.searched[kind] += 1
        for value, offset in self.user_fields(data):
            line = data.count(b"\n", 0, offset) + 1
            self.add(kind, self.name(path), "a user field", value, f"line {line}")

    def scan_parquet(self, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        kind = self.kind_of(path, "parquet")
        self.searched[kind] += 1
        try:
            table = pq.read_table(path)
        except Exception as err:  # any failure to read is a fail-closed trace
            return self.unreadable(kind, self.name(path), err)
        for field, column in zip(table.schema, table.columns, strict=True):
            column = column.combine_chunks() if column.num_chunks else pa.array([], field.type)
            while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                column = pc.list_flatten(column)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                for value in self.big:  # an id written as text (compressed pages hide it from the byte scan)
                    count = pc.sum(pc.match_substring(column, str(value))).as_py() or 0
                    if count:
                        self.add(kind, self.name(path), f"column {field.name}", value, "", count)
            if not pa.types.is_integer(column.type):
                continue
            values = column.fill_null(0).to_numpy(zero_copy_only=False)
            for value, (count, first) in self.match_array(values, "user" in field.name.lower()).items():
                self.add(kind, self.name(path), f"column {field.name}", value, f"row {first}", count)

    def scan_tensors(self, kind: str, artifact: str, obj: object, path: str = "") -> None:
        import torch

        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() or obj.is_complex() or obj.dtype == torch.bool or obj.is_sparse or obj.is_meta:
                return
            values = obj.detach().cpu().reshape(-1).to(torch.int64).numpy()
            for value, (count, first) in self.match_array(values, "user" in path.lower()).items():
                self.add(kind, artifact, f"tensor {path.lstrip('.')}", value, f"element {first}", count)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self.scan_tensors(kind, artifact, v, f"{path}.{k}")
        elif isinstance(obj, list | tuple):
            for i, v in enumerate(obj):
                self.scan_tensors(kind, artifact, v, f"{path}[{i}]")
        elif isinstance(obj, int) and self.match(obj, "user" in path.lower()) is not None:
            self.add(kind, artifact, f"value {path.lstrip('.')}", obj)

    def scan_torch_file(self, path: Path) -> None:
        import torch

        kind = self.kind_of(path, "torch")
        self.searched[kind] += 1
        try:
            with contextlib.suppress(ImportError):
                import fbgemm_gpu  # noqa: F401 - registers the ops scripted TorchRec modules call
            try:
                state: object = torch.jit.load(str(path), map_location="cpu").state_dict()
            except RuntimeError:  # not TorchScript: a plain torch.save
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any failure to read fails closed
            return self.unreadable(kind, self.name(path), err)
        self.scan_tensors(kind, self.name(path), state)

    def scan_delta(self, path: Path) -> None:
        from gpurec.sync.deltafile import read_delta

        self.searched["delta"] += 1
        try:
            header, entries = read_delta(path)
        except Exception as err:  # any failure to read fails closed
            return self.unreadable("delta", self.name(path), err)
        for name, _index, values in entries:  # the index holds row numbers, not ids
            self.scan_tensors("delta", self.name(path), values, name)
        self.scan_tensors("delta", self.name(path), {k: v for k, v in header.items() if isinstance(v, int)}, "header")

    def scan_checkpoint(self, directory: Path) -> None:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        self.searched["checkpoint"] += 1
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
                state = _load_state_dict_from_keys(checkpoint_id=str(directory))
        except Exception as err:  # any failure to read fails closed
            return self.unreadable("checkpoint", self.name(directory), err)
        self.scan_tensors("checkpoint", self.name(directory), state)


def find_traces(
    workspace: Workspace | str | Path,
    user_id: int,
    pseudonym_id: int | None = None,
    table_keys: Sequence[int] = (),
    exclude: Sequence[Path] = (),
) -> list[Trace]:
    """Every trace of the user in the workspace (empty: none found). `exclude`: paths the caller
    declares are not user data (its own receipt, say); they are named in `verify_report`."""
    return _run(workspace, user_id, pseudonym_id, table_keys, exclude).traces()


def _run(
    workspace: Workspace | str | Path, user_id: int, pseudonym_id: int | None, table_keys: Sequence[int], exclude: Sequence[Path]
) -> _Search:
    if not isinstance(workspace, Workspace):  # a directory: opened as the privacy commands open it
        workspace = Workspace.open(workspace)
    search = _Search(workspace, id_forms(user_id, pseudonym_id, table_keys), exclude)
    for path in search.files():
        if path.is_symlink() and not path.exists():
            search.notes.append(f"dangling symlink: {search.name(path)}")
            continue
        search.scan_bytes(path)
        if path.suffix == ".parquet":
            search.scan_parquet(path)
        elif path.suffix in TORCH_SUFFIXES:
            search.scan_torch_file(path)
        elif path.suffix == ".delta":
            search.scan_delta(path)
        elif path.name == ".metadata":
            search.scan_checkpoint(path.parent)
        elif is_sqlite(path):
            store = sqlite_path(workspace.feature_store_url)
            kind = "feature_store" if store is not None and path.resolve() == store.resolve() else "sqlite"
            search.scan_sqlite(path, kind)
    search.scan_event_log(workspace.event_log_url)
    log_file = sqlite_path(workspace.event_log_url)
    if log_file is not None and log_file.exists() and workspace.root not in log_file.resolve().parents:
        search.scan_sqlite(log_file)
    search.scan_feature_store(workspace.feature_store_url)
    return search


def verify_report(
    workspace: Workspace | str | Path,
    user_id: int,
    pseudonym_id: int | None = None,
    table_keys: Sequence[int] = (),
    exclude: Sequence[Path] = (),
) -> dict[str, Any]:
    """The verifier's result as JSON-able data: `verdict` (True: no trace, nothing unreadable), the
    traces (ids redacted), how many artifacts of each kind were searched, and notes (what was absent,
    excluded or not followed)."""
    search = _run(workspace, user_id, pseudonym_id, table_keys, exclude)
    traces = search.traces()
    return {
        "verdict": not traces,
        "verified": not traces,  # the same verdict, under the name `gpurec forget` reads
        "workspace": str(search.ws.root),
        "forms_searched": sorted(set(search.forms.values())),
        "traces": [t.to_dict() for t in traces],
        "unreadable": sum(t.kind == "unreadable" for t in traces),
        "searched": dict(sorted(search.searched.items())),
        "notes": sorted(set(search.notes)),
    }


__all__ = ["SMALL", "Trace", "find_traces", "id_forms", "verify_report"]
