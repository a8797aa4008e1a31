"""Shared fixtures: a small generated world and its features, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpurec.data.generate import generate_synthetic
from gpurec.data.world import WorldConfig
from gpurec.preprocess.run import preprocess

SMALL_WORLD = WorldConfig(users=400, items=800, days=4, seed=21)


@pytest.fixture(scope="session")
def small_features(tmp_path_factory) -> Path:
    """Features of a 4-day, 400-user world (about 30k rows): train/valid/test = 2/1/1 days."""
    root = tmp_path_factory.mktemp("small")
    generate_synthetic(SMALL_WORLD, root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    return root / "features"
