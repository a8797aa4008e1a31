"""The serving contract and config generation, without a server (fast; the server tests are in test_serve.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gpurec.serve.contract import (
    PAD_ID,
    ContractError,
    ServingContract,
    assemble_rows,
    hash_raw_features,
    pad_id_lists,
)
from gpurec.serve.model_config import BatchingConfig, ranker_config, recommend_config

CONTRACT = ServingContract(
    dense_features=("a", "b", "c"),
    sparse_features=("user_id", "item_id"),
    multi_valued_features=("hashtags",),
    tasks=("like", "finish"),
    score_weights={"like": 1.0, "finish": 0.5},
    max_batch_size=16,
)


def _rows(n: int = 4) -> dict[str, np.ndarray]:
    return {
        "dense": np.zeros((n, 3), np.float32),
        "user_id": np.arange(n, dtype=np.int64).reshape(n, 1),
        "item_id": np.arange(n, dtype=np.int64).reshape(n, 1),
        "hashtags": np.full((n, 2), PAD_ID, np.int64),
    }


def test_contract_round_trips_through_json(tmp_path):
    assert ServingContract.load(CONTRACT.save(tmp_path / "contract.json")) == CONTRACT
    assert ServingContract.load(tmp_path) == CONTRACT


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dense": np.zeros((4, 3), np.float64)}, "dtype float32"),
        ({"dense": np.zeros((4, 4), np.float32)}, "shape"),
        ({"user_id": np.zeros((3, 1), np.int64)}, "rows"),
        ({"dense": np.full((4, 3), np.inf, np.float32)}, "NaN or infinite"),
        ({"extra": np.zeros(4)}, "unknown"),
    ],
)
def test_validate_rows_names_the_problem(change, message):
    assert CONTRACT.validate_rows(_rows()) == 4
    with pytest.raises(ContractError, match=message):
        CONTRACT.validate_rows({**_rows(), **change})


def test_validate_rows_bounds_the_row_count():
    with pytest.raises(ContractError, match="at least one"):
        CONTRACT.validate_rows(_rows(0))
    with pytest.raises(ContractError, match="max_batch_size"):
        CONTRACT.validate_rows(_rows(17))


def test_pad_and_hash_raw_values():
    padded = pad_id_lists([[5], [], [1, 2, 3]])
    assert padded.tolist() == [[5, -1, -1], [-1, -1, -1], [1, 2, 3]]
    with pytest.raises(ContractError, match="width"):
        pad_id_lists([[1, 2, 3]], width=2)
    hashed = hash_raw_features(CONTRACT, {"user_id": [7, 8], "item_id": [7, 7], "hashtags": [["a", "b"], []]})
    assert hashed["user_id"].shape == (2, 1) and hashed["user_id"][0, 0] != hashed["item_id"][0, 0]  # salted per feature
    assert (hashed["hashtags"][1] == PAD_ID).all() and (hashed["hashtags"][0] != PAD_ID).all()
    with pytest.raises(ContractError, match="strings"):
        hash_raw_features(CONTRACT, {"user_id": [7], "item_id": [7], "hashtags": [[3]]})


def test_generated_configs():
    ranker = ranker_config(CONTRACT, "KIND_GPU", BatchingConfig(max_queue_delay_us=100, preferred_batch_sizes=(8, 16)))
    for expected in ("max_batch_size: 16", "kind: KIND_GPU", "max_queue_delay_microseconds: 100", "preferred_batch_size: [ 8, 16 ]", "dims: [ 3 ]", "dims: [ -1 ]"):
        assert expected in ranker
    recommend = recommend_config(CONTRACT)
    assert "max_batch_size: 0" in recommend and "dims: [ -1, 3 ]" in recommend and 'name: "candidate_ids"' in recommend


def test_contract_module_does_not_import_torch():
    """Clients import the contract without the training stack."""
    code = "import sys, gpurec.serve.contract; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_assemble_rows_broadcasts_the_user_context():
    rows = assemble_rows(
        CONTRACT,
        context={"a": 1.5, "user_id": 42},
        candidates={"b": [1, 2, 3], "c": [0, 0, 1], "item_id": [7, 8, 9], "hashtags": [[1], [], [2, 3]]},
    )
    assert CONTRACT.validate_rows(rows) == 3
    assert rows["dense"][:, 0].tolist() == [1.5] * 3 and rows["user_id"].ravel().tolist() == [42] * 3
    assert rows["hashtags"].tolist() == [[1, -1], [-1, -1], [2, 3]]
    with pytest.raises(ContractError, match="missing \\['a'\\]"):
        assemble_rows(CONTRACT, {"user_id": 1}, {"b": [1], "c": [1], "item_id": [1], "hashtags": [[]]})
