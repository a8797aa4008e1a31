"""The manifest: what a preprocessing run wrote, and the contract the trainer reads it by.

A single run writes `manifest.json`; shard i of N writes `manifest.shard-<i>-of-<N>.json`, and
`load_manifest(dir)` merges the N shard manifests once all are there (and says which are missing
otherwise), so shards never coordinate while running. Paths of output files are stored relative to
the output directory, so a features directory can be moved or copied as a whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpurec.errors import InputNotFound, InvalidInput

MANIFEST_VERSION = 1
SINGLE_NAME = "manifest.json"
_SHARD_FILE = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.json$")


def shard_manifest_name(index: int, count: int) -> str:
    return f"manifest.shard-{index}-of-{count}.json"


@dataclass
class SplitInfo:
    """One split's rows, days, time range (ISO-8601 UTC, None when empty) and files (relative)."""

    rows: int = 0
    days: list[str] = field(default_factory=list)
    ts_min: str | None = None
    ts_max: str | None = None
    files: list[str] = field(default_factory=list)
    # Per dense column [count, sum, sum of squares]: mergeable across days and shards, and what the
    # model's fixed input normalisation is computed from (train split).
    dense_moments: dict[str, list[float]] = field(default_factory=dict)

    def add_day(
        self,
        day: str,
        rows: int,
        ts_min: str | None,
        ts_max: str | None,
        file: str,
        moments: dict[str, list[float]] | None = None,
    ) -> None:
        self.rows += rows
        self.days.append(day)
        self.files.append(file)
        self.dense_moments = _add_moments(self.dense_moments, moments or {})
        if ts_min is not None:
            self.ts_min = ts_min if self.ts_min is None else min(self.ts_min, ts_min)
        if ts_max is not None:
            self.ts_max = ts_max if self.ts_max is None else max(self.ts_max, ts_max)

    def merged(self, other: SplitInfo) -> SplitInfo:
        """This split plus another shard's part of it (days and files kept in day order)."""
        days, files = self.days + other.days, self.files + other.files
        order = sorted(range(len(days)), key=days.__getitem__)
        lows = [t for t in (self.ts_min, other.ts_min) if t is not None]
        highs = [t for t in (self.ts_max, other.ts_max) if t is not None]
        return SplitInfo(
            rows=self.rows + other.rows,
            days=[days[i] for i in order],
            ts_min=min(lows) if lows else None,
            ts_max=max(highs) if highs else None,
            files=[files[i] for i in order],
            dense_moments=_add_moments(self.dense_moments, other.dense_moments),
        )


def _add_moments(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    return {c: [x + y for x, y in zip(a.get(c, [0.0] * 3), b.get(c, [0.0] * 3), strict=True)] for c in {*a, *b}}


@dataclass
class FeatureInfo:
    name: str
    kind: str  # "dense" | "sparse"
    column: str
    dtype: str
    multi_valued: bool = False
    cardinality_estimate: int | None = None  # sparse only


@dataclass
class Manifest:
    """Everything a consumer needs to read the features; `to_json`/`from_json` round-trip exactly."""

    version: int
    created_at: str
    engine: str
    source: dict[str, Any]
    labels: list[str]
    meta_columns: list[str]
    features: list[FeatureInfo]
    dense_order: list[str]
    splits: dict[str, SplitInfo]
    counts: dict[str, Any]
    hashing: str
    constants: dict[str, Any] = field(default_factory=dict)
    shard: dict[str, int] | None = None  # {"index", "count"} for a shard manifest; None when whole
    seconds: float = 0.0

    # ---- typed accessors for the trainer ----------------------------------------------------

    @property
    def sparse_features(self) -> list[FeatureInfo]:
        return [f for f in self.features if f.kind == "sparse"]

    @property
    def dense_features(self) -> list[FeatureInfo]:
        """Dense features in the model's input order."""
        by_column = {f.column: f for f in self.features if f.kind == "dense"}
        return [by_column[c] for c in self.dense_order]

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    def dense_normalization(self, split: str = "train") -> tuple[list[float], list[float]]:
        """Mean and standard deviation of each dense feature over `split`, in model input order.

        The model subtracts and divides by these as fixed buffers, so serving scales its inputs
        exactly like training did. A constant feature gets std 1 (it is only centred).
        """
        moments = self.splits[split].dense_moments if split in self.splits else {}
        means, stds = [], []
        for column in self.dense_order:
            count, total, total_sq = moments.get(column, [0.0, 0.0, 0.0])
            mean = total / count if count else 0.0
            variance = max(total_sq / count - mean * mean, 0.0) if count else 1.0
            means.append(mean)
            stds.append(variance**0.5 if variance > 1e-12 else 1.0)
        return means, stds

    def split_files(self, split: str, root: str | Path) -> list[Path]:
        """Absolute paths of a split's files, in day order (root: the directory holding the manifest).

        Raises InvalidInput for a split the manifest does not have.
        """
        if split not in self.splits:
            raise InvalidInput(f"no split {split!r} in the manifest of {root}; have {sorted(self.splits)}")
        return [Path(root) / f for f in self.splits[split].files]

    def require_rows(self, split: str, root: str | Path) -> list[Path]:
        """`split_files`, but InvalidInput when the split has no rows (nothing to train or score on)."""
        files = self.split_files(split, root)
        if self.splits[split].rows == 0:
            days = len(self.source.get("days", [])) if isinstance(self.source, dict) else 0
            raise InvalidInput(
                f"the {split!r} split of {root} has no rows (splits: "
                + ", ".join(f"{name} {info.rows:,}" for name, info in self.splits.items())
                + f"; {days} day(s) of input); preprocess more days, or check the dead letter under {Path(root) / 'dead_letter'}"
            )
        return files

    # ---- JSON --------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse a manifest; InvalidInput (naming what is wrong) for anything that is not one."""
        try:
            data = json.loads(text)
            data["features"] = [FeatureInfo(**f) for f in data["features"]]
            data["splits"] = {name: SplitInfo(**s) for name, s in data["splits"].items()}
            return cls(**data)
        except json.JSONDecodeError as err:
            raise InvalidInput(f"not JSON: {err}") from None
        except KeyError as err:
            raise InvalidInput(f"not a manifest: no {err} key") from None
        except (TypeError, AttributeError) as err:  # wrong shape, unknown or missing fields
            raise InvalidInput(f"not a manifest: {err}") from None

    def write(self, directory: str | Path) -> Path:
        name = SINGLE_NAME if self.shard is None else shard_manifest_name(self.shard["index"], self.shard["count"])
        path = Path(directory) / name
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)  # readers never see a half-written manifest
        return path


def _sum_counts(a: Any, b: Any) -> Any:
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _sum_counts(a.get(k, 0), b.get(k, 0)) for k in sorted(set(a) | set(b))}
    return a + b


def merge_manifests(parts: list[Manifest]) -> Manifest:
    """One manifest for the whole run from the manifests of shards 0..N-1 (any order)."""
    if not parts:
        raise InvalidInput("no shard manifests to merge")
    parts = sorted(parts, key=lambda m: m.shard["index"] if m.shard else 0)
    first = parts[0]
    splits = {name: SplitInfo() for name in first.splits}
    counts: dict[str, Any] = {}
    for part in parts:
        if [asdict(f) for f in part.features] != [asdict(f) for f in first.features] or part.dense_order != first.dense_order:
            raise InvalidInput("shard manifests disagree on the feature list; were they written by different versions?")
        for name, info in part.splits.items():
            splits[name] = splits.setdefault(name, SplitInfo()).merged(info)
        counts = _sum_counts(counts, part.counts) if counts else dict(part.counts)
    engines = sorted({p.engine for p in parts})
    return Manifest(
        version=first.version,
        created_at=max(p.created_at for p in parts),
        engine=engines[0] if len(engines) == 1 else "mixed:" + ",".join(engines),
        source=first.source,
        labels=first.labels,
        meta_columns=first.meta_columns,
        features=first.features,
        dense_order=first.dense_order,
        splits=splits,
        counts=counts,
        hashing=first.hashing,
        constants=first.constants,
        shard=None,
        seconds=max(p.seconds for p in parts),
    )


def load_manifest(directory: str | Path) -> Manifest:
    """The manifest of a features directory: `manifest.json`, or the merge of all shard manifests.

    Raises InputNotFound when the directory or its manifest is missing (naming the missing shards
    when only some of N have finished), InvalidInput when a manifest file is not one.
    """
    directory = Path(directory)
    if not directory.exists():
        raise InputNotFound(f"features directory {directory} does not exist (write it with `gpurec preprocess --out {directory}`)")
    if not directory.is_dir():
        raise InputNotFound(f"features directory {directory} is a file, not a directory")
    single = directory / SINGLE_NAME
    if single.exists():
        return _read(single)
    found: dict[int, dict[int, Path]] = {}
    for path in directory.glob("manifest.shard-*-of-*.json"):
        if match := _SHARD_FILE.match(path.name):
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = path
    if not found:
        raise InputNotFound(
            f"no {SINGLE_NAME} or manifest.shard-*-of-*.json in {directory} "
            f"(not a features directory; write one with `gpurec preprocess --out {directory}`)"
        )
    if len(found) > 1:
        raise InvalidInput(f"{directory} mixes shard manifests of different shard counts {sorted(found)}; remove the stale ones")
    (count, shards), = found.items()
    missing = sorted(set(range(count)) - set(shards))
    if missing:
        names = ", ".join(shard_manifest_name(i, count) for i in missing)
        raise InputNotFound(f"{directory}: {len(missing)} of {count} shards have not finished (missing {names})")
    return merge_manifests([_read(shards[i]) for i in range(count)])


def _read(path: Path) -> Manifest:
    try:
        return Manifest.from_json(path.read_text())
    except InvalidInput as err:
        raise InvalidInput(f"{path}: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"{path}: cannot read it: {err}") from None


__all__ = [
    "MANIFEST_VERSION",
    "SINGLE_NAME",
    "FeatureInfo",
    "Manifest",
    "SplitInfo",
    "load_manifest",
    "merge_manifests",
    "shard_manifest_name",
]
