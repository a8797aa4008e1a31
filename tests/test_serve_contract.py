"""The serving contract and config generation, without a server (fast; the server tests are in test_serve.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from gpurec.client import InvalidRequest, hash_raw
from gpurec.data import hashing_core, logs
from gpurec.data.generate import generate_synthetic
from gpurec.data.hashing import hash_string
from gpurec.data.world import WorldConfig
from gpurec.preprocess import features as feature_list
from gpurec.preprocess.dims import build_dimensions
from gpurec.preprocess.features import SPARSE_FEATURES, dimension_feature, raw_hashing_rules
from gpurec.preprocess.run import preprocess
from gpurec.serve import contract as contract_module
from gpurec.serve.contract import (
    PAD_ID,
    ContractError,
    ServingContract,
    assemble_rows,
    hash_raw_features,
    pad_id_lists,
    rows_from_features,
)
from gpurec.serve.model_config import BatchingConfig, ranker_config, recommend_config

CONTRACT = ServingContract(
    dense_features=("a", "b", "c"),
    sparse_features=("user_id", "item_id"),
    multi_valued_features=("hashtags",),
    tasks=("like", "finish"),
    score_weights={"like": 1.0, "finish": 0.5},
    max_batch_size=16,
    raw_hashing=raw_hashing_rules(("user_id", "item_id", "hashtags")),
)


def contract_of_the_feature_list(max_batch_size: int = 4096) -> ServingContract:
    """The contract export writes for a model of every feature in the list (in list order)."""
    sparse = feature_list.SPARSE_FEATURES  # at call time: a test may have added a feature
    return ServingContract(
        dense_features=tuple(f.name for f in feature_list.DENSE_FEATURES),
        sparse_features=tuple(f.name for f in sparse if not f.multi_valued),
        multi_valued_features=tuple(f.name for f in sparse if f.multi_valued),
        tasks=("like", "finish"),
        score_weights={"like": 1.0, "finish": 1.0},
        max_batch_size=max_batch_size,
        raw_hashing=raw_hashing_rules(),
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
    empty = hash_raw_features(CONTRACT, {"user_id": [], "item_id": [], "hashtags": []})
    assert empty["user_id"].shape == (0, 1) and empty["hashtags"].shape == (0, 1)
    with pytest.raises(ContractError, match="integer ids"):
        hash_raw_features(CONTRACT, {"user_id": ["7"], "item_id": [7], "hashtags": [[]]})
    with pytest.raises(ContractError, match="a list of values"):
        hash_raw_features(CONTRACT, {"user_id": 7, "item_id": [7], "hashtags": [[]]})


def test_a_contract_without_a_rule_refuses_raw_values():
    bare = ServingContract(("a",), ("user_id",), (), ("like",), {"like": 1.0}, 4)
    with pytest.raises(ContractError, match="no raw hashing rule for 'user_id'"):
        hash_raw_features(bare, {"user_id": [7]})
    with pytest.raises(ValueError, match="raw_hashing"):
        ServingContract(("a",), ("user_id",), (), ("like",), {"like": 1.0}, 4, raw_hashing={"user_id": "float"})


# ---- one source: the feature list -----------------------------------------------------------


def test_contract_rules_are_what_the_feature_list_declares():
    assert raw_hashing_rules() == {f.name: f.raw for f in SPARSE_FEATURES}
    assert list(raw_hashing_rules()) == [f.name for f in SPARSE_FEATURES]
    assert raw_hashing_rules(["hour", "hashtags", "not_a_feature"]) == {"hour": "hour", "hashtags": "string"}
    assert not hasattr(contract_module, "RAW_HASHING")  # no hand-kept copy beside the list
    # the one padding id, defined with the hashing that never yields it
    assert contract_module.PAD_ID is hashing_core.PAD_ID == contract_of_the_feature_list().pad_id


def test_contract_json_carries_the_rules(tmp_path):
    contract = contract_of_the_feature_list()
    loaded = ServingContract.load(contract.save(tmp_path / "contract.json"))
    assert loaded.raw_hashing == raw_hashing_rules() and loaded.raw_hashing["hour"] == "hour"


def test_adding_a_feature_to_the_list_changes_the_rules_dims_and_contract(monkeypatch, tmp_path):
    """One entry in the list is all it takes: items carry a region no feature uses yet."""
    item_region = dimension_feature("item_region", "items.region", "string", "item's region")
    monkeypatch.setattr(feature_list, "SPARSE_FEATURES", (*SPARSE_FEATURES, item_region))
    assert raw_hashing_rules()["item_region"] == "string"
    contract = contract_of_the_feature_list()
    assert "item_region" in contract.sparse_features and contract.raw_hashing["item_region"] == "string"

    generate_synthetic(WorldConfig(users=20, items=30, days=1, seed=5), tmp_path)
    items = logs.read(tmp_path, "items")
    dims = build_dimensions(logs.read(tmp_path, "users"), items)
    assert "sparse_item_region" in dims.item_feature_columns and dims.cardinality["items.region"] >= 1
    by_item = dict(zip(dims.items["item_id"].to_list(), dims.items["sparse_item_region"].to_list(), strict=True))
    raw = dict(zip(items["item_id"].to_pylist(), items["region"].to_pylist(), strict=True))
    some = sorted(by_item)[:5]
    hashed = hash_raw_features(contract, {"item_region": [raw[i] for i in some]}, all_features=False)
    assert hashed["item_region"][:, 0].tolist() == [by_item[i] for i in some] == [hash_string(raw[i], "item_region") for i in some]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> tuple[Path, pl.DataFrame]:
    """A 2-day world of 60 users, preprocessed: (raw log root, every feature row)."""
    root = tmp_path_factory.mktemp("tiny")
    generate_synthetic(WorldConfig(users=60, items=120, days=2, seed=3), root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    frame = pl.concat([pl.read_parquet(f) for f in sorted((root / "features").rglob("*.parquet")) if "dead_letter" not in f.parts])
    return root / "raw", frame


def raw_values(raw_root: Path, frame: pl.DataFrame) -> dict[str, list]:
    """Each sparse feature's raw value for every feature row, found the way the list says: the
    `source` column of the impression's user or item, or the hour of the impression's timestamp."""
    tables = {
        "users": pl.from_arrow(logs.read(raw_root, "users")).unique("user_id", keep="last"),
        "items": pl.from_arrow(logs.read(raw_root, "items")).unique("item_id", keep="last"),
    }
    keys = {"users": "user_id", "items": "item_id"}
    out: dict[str, list] = {}
    for f in SPARSE_FEATURES:
        if f.raw == "hour":
            out[f.name] = [ts.hour for ts in frame["ts"].to_list()]  # ts is UTC
            continue
        table, column, key = f.source_table, f.source_column, keys[str(f.source_table)]
        source = tables[str(table)].select(key, pl.col(str(column)).alias("_raw"))
        out[f.name] = frame.select(key).join(source, on=key, how="left", maintain_order="left")["_raw"].to_list()
    return out


def test_raw_hasher_gives_the_ids_preprocess_wrote(tiny_world):
    """Serving (`hash_raw_features`) and the client (`hash_raw`) hash raw rows to exactly the ids
    of the feature files, for every sparse feature of the list, hashtags and hour included."""
    raw_root, frame = tiny_world
    contract = contract_of_the_feature_list(max_batch_size=frame.height)
    raw = raw_values(raw_root, frame)
    assert set(raw) == set(contract.raw_hashing) == {f.name for f in SPARSE_FEATURES}
    expected = rows_from_features(contract, frame)
    hashed = hash_raw_features(contract, raw)
    assert set(hashed) == set(expected) - {"dense"}
    for name, ids in hashed.items():
        np.testing.assert_array_equal(ids, expected[name], err_msg=name)
    assert len(set(raw["hour"])) > 1 and max(len(tags) for tags in raw["hashtags"]) > 1

    # the client: one user's context and their candidates, hashed separately
    first = frame["user_id"][0]
    rows = [i for i, u in enumerate(frame["user_id"].to_list()) if u == first][:8]
    users = {f.name for f in SPARSE_FEATURES if f.source_table == "users"}
    user = hash_raw(contract, {n: raw[n][rows[0]] for n in users}, per_candidate=False)
    candidates = hash_raw(contract, {n: [raw[n][i] for i in rows] for n in raw if n not in users}, per_candidate=True)
    written = {name: frame[f"sparse_{name}"].to_list() for name in raw}
    for name in users:
        assert user[name] == written[name][rows[0]], name
    for name, ids in candidates.items():
        assert ids == [written[name][i] for i in rows], name
    with pytest.raises(InvalidRequest, match="hour of day"):
        hash_raw(contract, {"hour": 24}, per_candidate=False)


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
