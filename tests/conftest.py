"""Shared fixtures: a small generated world and its features, built once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpurec.data.generate import generate_synthetic
from gpurec.data.world import WorldConfig
from gpurec.preprocess.run import preprocess
from gpurec.serve.server import TritonServer
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Example, encode
from gpurec.sync.examples import EXAMPLES_TOPIC, examples_from_features
from gpurec.train.config import load_configs
from gpurec.train.recipe import train

SMALL_WORLD = WorldConfig(users=400, items=800, days=4, seed=21)
# A small ranker: the default structure at a fraction of the compute.
SMALL_CONFIG = Path(__file__).parent / "configs" / "small.toml"


@pytest.fixture(scope="session")
def small_features(tmp_path_factory) -> Path:
    """Features of a 4-day, 400-user world (about 30k rows): train/valid/test = 2/1/1 days."""
    root = tmp_path_factory.mktemp("small")
    generate_synthetic(SMALL_WORLD, root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    return root / "features"


def serve_for_tests(repo: Path, **options: Any) -> Iterator[TritonServer]:
    """A real tritonserver on free loopback ports for a fixture to yield from: stopped even when a
    test fails, and the fixture fails if it did not shut down cleanly. `options` go to
    `TritonServer` (env, production, admin_key, ...)."""
    server = TritonServer(repo, **options)
    try:
        server.start()
        yield server
    finally:
        code = server.stop()
    assert code == 0, f"tritonserver did not shut down cleanly (exit code {code})"


def train_small(features: Path, out: Path, **overrides) -> dict:
    """Train the small ranker (tests/configs/small.toml, `[train]` overrides as keywords)."""
    model_config, train_config = load_configs(SMALL_CONFIG, **overrides)
    return train(features, out, model_config, train_config, progress=False)


def fill_examples(url: str, examples: list[Example], partitions: int = 2) -> None:
    with open_event_log(url) as log:
        log.create_topic(EXAMPLES_TOPIC, partitions)
        ordered = sorted(examples, key=lambda e: e.served.ts_ms)
        log.append(EXAMPLES_TOPIC, [Record(e.served.user_id, encode(e), e.served.ts_ms) for e in ordered])


@pytest.fixture(scope="session")
def batch_run(small_features, tmp_path_factory) -> Path:
    """A short batch run of the small ranker: where online training starts."""
    out = tmp_path_factory.mktemp("batch")
    train_small(small_features, out, epochs=1, max_steps=20)
    return out


@pytest.fixture(scope="session")
def valid_examples(small_features) -> list[Example]:
    return examples_from_features(small_features, "valid", limit=3000)
