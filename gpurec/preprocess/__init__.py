"""Preprocessing: day-partitioned logs -> point-in-time features, time splits and a manifest.

Public API (imported lazily, so `from gpurec.preprocess import load_manifest` in the trainer does
not pull in Polars):

- `preprocess(input_dir, out_dir, engine=..., shard=...) -> Summary` (`gpurec preprocess`)
- `Manifest`, `load_manifest(dir)`: what was written and how to read it
- `FEATURES`, `DENSE_FEATURES`, `SPARSE_FEATURES`, `LABELS`: the feature contract
- `Shard`, `split_days`: the day arithmetic shared by every shard
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "preprocess": "gpurec.preprocess.run",
    "Summary": "gpurec.preprocess.run",
    "Manifest": "gpurec.preprocess.manifest",
    "load_manifest": "gpurec.preprocess.manifest",
    "FEATURES": "gpurec.preprocess.features",
    "DENSE_FEATURES": "gpurec.preprocess.features",
    "SPARSE_FEATURES": "gpurec.preprocess.features",
    "LABELS": "gpurec.preprocess.features",
    "Shard": "gpurec.preprocess.splits",
    "split_days": "gpurec.preprocess.splits",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpurec.preprocess' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
