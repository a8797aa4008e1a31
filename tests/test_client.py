"""`gpurec.client` against a real Triton server (the one bundled in nvidia-pytriton; no mocks).

One tiny model is trained, exported and served once for the module (the fixture stops the server
even when a test fails); every test then goes through the client: HTTP and gRPC, sync and
asyncio, scores against the TorchScript artifact run in-process, top-k, many users per call, and
each kind of failure as its typed error.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import serve_for_tests, train_small

from gpurec.client import (
    AsyncRankerClient,
    InvalidRequest,
    NonFiniteInput,
    NonFiniteOutput,
    RankerClient,
    RankRequest,
    RecommendRequest,
    ServerError,
    ServerUnavailable,
    UnknownModel,
    hash_raw,
    load_contract,
)
from gpurec.preprocess.features import raw_hashing_rules
from gpurec.preprocess.manifest import load_manifest
from gpurec.serve.artifact import to_tensors
from gpurec.serve.contract import ServingContract, assemble_rows, hash_raw_features, rows_from_features
from gpurec.serve.export import export_repository
from gpurec.serve.model_config import BatchingConfig
from gpurec.serve.server import TritonServer, free_ports

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("tritonclient.http")

TOLERANCE = 1e-5
PROTOCOLS = ("http", "grpc")
USERS = 4
CANDIDATES = 16
USER_FEATURES = ("user_id", "user_region", "device", "user_language", "hour", "user_impressions", "user_like_rate", "user_finish_rate")


@pytest.fixture(scope="module")
def repo(small_features, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client")
    train_small(small_features, root / "run", max_steps=10)
    export_repository(root / "run", root / "repo", batching=BatchingConfig(max_queue_delay_us=2000))
    return root / "repo"


@pytest.fixture(scope="module")
def contract(repo) -> ServingContract:
    return load_contract(repo)


@pytest.fixture(scope="module")
def server(repo) -> Iterator[TritonServer]:
    yield from serve_for_tests(repo)


@pytest.fixture(scope="module")
def scripted(repo):
    return torch.jit.load(str(repo / "ranker" / "1" / "model.pt"))


def in_process(scripted, contract: ServingContract, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy().reshape(-1) for k, v in scripted(*to_tensors(rows, contract)).items()}


@pytest.fixture(scope="module")
def frame(small_features) -> pl.DataFrame:
    manifest = load_manifest(small_features)
    return pl.read_parquet(manifest.split_files("test", small_features)[0]).head(USERS * CANDIDATES)


def features_by_name(contract: ServingContract, frame: pl.DataFrame) -> dict[str, list]:
    """Feature-file columns renamed to the contract's feature names (one list per feature)."""
    columns = {n: frame[f"dense_{n}"].to_list() for n in contract.dense_features}
    columns |= {n: frame[f"sparse_{n}"].to_list() for n in (*contract.sparse_features, *contract.multi_valued_features)}
    return columns


@pytest.fixture(scope="module")
def requests(contract, frame) -> list[RankRequest]:
    """USERS requests: the user's context from their first row, CANDIDATES items each."""
    columns = features_by_name(contract, frame)
    out = []
    for u in range(USERS):
        block = slice(u * CANDIDATES, (u + 1) * CANDIDATES)
        user = {n: columns[n][u * CANDIDATES] for n in USER_FEATURES}
        candidates = {n: v[block] for n, v in columns.items() if n not in USER_FEATURES}
        out.append(RankRequest(user, candidates))
    return out


def client(server, contract, protocol: str, **kwargs) -> RankerClient:
    url = server.http_url if protocol == "http" else server.grpc_url
    return RankerClient(url, contract, protocol=protocol, **kwargs)


def async_client(server, contract, protocol: str, **kwargs) -> AsyncRankerClient:
    url = server.http_url if protocol == "http" else server.grpc_url
    return AsyncRankerClient(url, contract, protocol=protocol, **kwargs)


def test_importing_the_client_needs_no_torch_or_polars(repo):
    code = (
        "import sys, gpurec.client as c\n"
        f"for p in ('http', 'grpc'): c.RankerClient('127.0.0.1:1', {str(repo)!r}, protocol=p).close()\n"
        "print([m for m in ('torch', 'polars', 'pyarrow') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_sync_rank_equals_in_process(server, contract, scripted, requests, protocol):
    with client(server, contract, protocol) as ranker:
        for request in requests[:2]:
            got = ranker.rank(request.user, request.candidates)
            expected = in_process(scripted, contract, assemble_rows(contract, request.user, request.candidates))
            assert len(got) == CANDIDATES
            np.testing.assert_allclose(got.score, expected["score"], atol=TOLERANCE, rtol=0)
            for task in contract.tasks:
                np.testing.assert_allclose(got.tasks[task], expected[task], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_rows_from_feature_files_rank_like_in_process(server, contract, scripted, frame, protocol):
    rows = rows_from_features(contract, frame)
    with client(server, contract, protocol) as ranker:
        got = ranker.rank(None, rows)
    np.testing.assert_allclose(got.score, in_process(scripted, contract, rows)["score"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_users_per_call_sync_and_async(server, contract, scripted, requests, protocol):
    expected = [in_process(scripted, contract, assemble_rows(contract, r.user, r.candidates))["score"] for r in requests]
    with client(server, contract, protocol, max_concurrency=4) as ranker:
        results = ranker.rank_many(requests)

    async def run_async():
        async with async_client(server, contract, protocol, max_concurrency=4) as ranker:
            return await ranker.rank_many([(r.user, r.candidates) for r in requests])

    for got in (results, asyncio.run(run_async())):
        assert len(got) == USERS
        for result, score in zip(got, expected, strict=True):
            np.testing.assert_allclose(result.score, score, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_recommend_top_k_sync_and_async(server, contract, scripted, requests, protocol):
    own_ids = [np.arange(CANDIDATES, dtype=np.int64) + 1000 * u for u in range(USERS)]
    asks = [RecommendRequest(r.user, r.candidates, k=5, item_ids=ids) for r, ids in zip(requests, own_ids, strict=True)]
    orders = [np.argsort(-in_process(scripted, contract, assemble_rows(contract, r.user, r.candidates))["score"], kind="stable") for r in requests]
    with client(server, contract, protocol) as ranker:
        one = ranker.recommend(asks[0].user, 5, asks[0].candidates, item_ids=own_ids[0])
        many = ranker.recommend_many(asks)
        everything = ranker.recommend(asks[0].user, 10_000, asks[0].candidates)  # k > N: all, ranked

    async def run_async():
        async with async_client(server, contract, protocol) as ranker:
            return await ranker.recommend_many(asks)

    np.testing.assert_array_equal(one.indices, orders[0][:5])
    np.testing.assert_array_equal(one.item_ids, own_ids[0][orders[0][:5]])
    np.testing.assert_array_equal(everything.indices, orders[0])
    np.testing.assert_array_equal(everything.item_ids, np.asarray(asks[0].candidates["item_id"])[orders[0]])
    for got in (many, asyncio.run(run_async())):
        for rec, order, ids in zip(got, orders, own_ids, strict=True):
            assert len(rec) == 5 and np.all(np.diff(rec.scores) <= 0)
            np.testing.assert_array_equal(rec.indices, order[:5])
            np.testing.assert_array_equal(rec.item_ids, ids[order[:5]])


def _bad_requests(contract: ServingContract, request: RankRequest) -> dict[str, tuple[dict, dict, str]]:
    """case -> (user, candidates, expected message), each refused before it is sent."""
    rows = assemble_rows(contract, request.user, request.candidates)
    too_many = {k: np.repeat(v[:1], contract.max_batch_size + 1, axis=0) for k, v in rows.items()}
    empty = {k: v[:0] for k, v in rows.items()}
    user, cands = dict(request.user), dict(request.candidates)
    return {
        "wrong dtype": ({}, {**rows, "dense": rows["dense"].astype(np.float64)}, "expected dtype float32, got float64"),
        "wrong shape": ({}, {**rows, "dense": rows["dense"][:, :3]}, "expected shape"),
        "empty candidates": ({}, empty, "at least one row"),
        "no candidate features": (user, {}, "no candidates"),
        "too many candidates": ({}, too_many, f"exceed max_batch_size {contract.max_batch_size}"),
        "NaN": ({**user, "user_like_rate": float("nan")}, cands, "NaN"),
        "float id": ({**user, "user_id": 1.5}, cands, "'user_id' takes hashed ids"),
        "string dense": (user, {**cands, "item_age_hours": ["old"] * CANDIDATES}, "'item_age_hours' takes numbers"),
        "missing feature": ({k: v for k, v in user.items() if k != "device"}, cands, "missing ['device']"),
        "unknown feature": ({**user, "colour": 1}, cands, "unknown ['colour']"),
        "ragged candidates": (user, {**cands, "item_id": cands["item_id"][:3]}, "differ in length"),
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_input_raises_invalid_request_and_is_not_retried(server, contract, requests, protocol):
    cases = _bad_requests(contract, requests[0])
    with client(server, contract, protocol, retries=5, backoff=1.0) as ranker:
        for case, (user, candidates, message) in cases.items():
            started = time.monotonic()
            with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
                ranker.rank(user, candidates)
            assert time.monotonic() - started < 0.5, f"{case}: an invalid request must not be retried"
        with pytest.raises(InvalidRequest, match="k must be a positive integer"):
            ranker.recommend(requests[0].user, 0, requests[0].candidates)
        with pytest.raises(InvalidRequest, match="item_ids must be"):
            ranker.recommend(requests[0].user, 3, requests[0].candidates, item_ids=[1, 2])
        assert ranker.is_ready()  # the server is still serving

    async def run_async():
        async with async_client(server, contract, protocol) as ranker:
            for user, candidates, message in cases.values():
                with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
                    await ranker.rank(user, candidates)

    asyncio.run(run_async())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_finite_values_raise_their_own_typed_errors(server, contract, scripted, requests, protocol):
    """NaN/inf in: NonFiniteInput (an InvalidRequest, refused before sending). Finite 1e38 dense
    values that overflow the model: the server refuses the NaN scores and the client raises
    NonFiniteOutput (a ServerError), for rank and recommend, not retried; the next call is exact."""
    request = requests[0]
    rows = assemble_rows(contract, request.user, request.candidates)
    huge = {**rows, "dense": rows["dense"].copy()}
    huge["dense"][2, :] = 1e38
    with client(server, contract, protocol, retries=5, backoff=1.0) as ranker:
        with pytest.raises(NonFiniteInput, match="NaN or infinite"):
            ranker.rank({**request.user, "user_like_rate": float("inf")}, request.candidates)
        started = time.monotonic()
        with pytest.raises(NonFiniteOutput, match="non_finite_output") as raised:
            ranker.rank(None, huge)
        assert isinstance(raised.value, ServerError) and not isinstance(raised.value, InvalidRequest)
        assert time.monotonic() - started < 0.5, "a NaN/inf answer must not be retried"
        with pytest.raises(NonFiniteOutput):
            ranker.recommend(None, 3, huge, item_ids=list(range(CANDIDATES)))
        result = ranker.rank(request.user, request.candidates)
        np.testing.assert_allclose(result.score, in_process(scripted, contract, rows)["score"], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unknown_model_raises_unknown_model(server, contract, requests, protocol):
    request = requests[0]
    with client(server, contract, protocol, ranker_model="no_such_model") as ranker, pytest.raises(UnknownModel, match="no_such_model") as raised:
        ranker.rank(request.user, request.candidates)
    assert raised.value.__cause__ is not None  # the tritonclient error is kept, not shown as the error

    async def run_async():
        async with async_client(server, contract, protocol, model_version="99") as ranker:
            await ranker.rank(request.user, request.candidates)

    with pytest.raises(UnknownModel, match="ranker"):
        asyncio.run(run_async())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_raises_server_unavailable_after_retries(contract, requests, protocol):
    (port,) = free_ports(1)  # nobody listens there
    request = requests[0]
    with RankerClient(f"127.0.0.1:{port}", contract, protocol=protocol, retries=2, backoff=0.05, timeout=2) as ranker:
        started = time.monotonic()
        with pytest.raises(ServerUnavailable, match=r"unreachable.*after 3 attempts") as raised:
            ranker.rank(request.user, request.candidates)
        assert time.monotonic() - started >= 0.05 + 0.1  # backed off twice
        assert raised.value.__cause__ is not None
        with pytest.raises(ServerUnavailable):
            ranker.rank_many([request, request])
        assert not ranker.is_ready()

    async def run_async():
        async with AsyncRankerClient(f"127.0.0.1:{port}", contract, protocol=protocol, retries=1, backoff=0.01) as ranker:
            await ranker.rank(request.user, request.candidates)

    with pytest.raises(ServerUnavailable, match="after 2 attempts"):
        asyncio.run(run_async())


def test_raw_values_hash_like_the_contract(contract):
    # the exported contract's rules are the feature list's, not a copy kept beside it
    assert contract.raw_hashing == raw_hashing_rules([*contract.sparse_features, *contract.multi_valued_features])
    assert set(contract.raw_hashing) == {*contract.sparse_features, *contract.multi_valued_features}
    user = {"user_id": 7, "user_region": "EU", "device": "ios", "user_language": "en", "hour": 13, "user_like_rate": 0.1}
    candidates = {"item_id": [1, 2], "author_id": [3, 4], "item_language": ["en", "de"], "hashtags": [["cats"], ["dogs", "cats"]]}
    hashed_user, hashed_items = hash_raw(contract, user, per_candidate=False), hash_raw(contract, candidates, per_candidate=True)
    raw_rows = {**{k: [v, v] for k, v in user.items()}, **candidates}
    expected = hash_raw_features(contract, raw_rows)
    assert hashed_user["user_like_rate"] == 0.1
    for name in ("user_id", "user_region", "device", "user_language", "hour"):
        assert hashed_user[name] == expected[name][0, 0]
    for name in ("item_id", "author_id", "item_language"):
        assert hashed_items[name] == list(expected[name][:, 0])
    assert hashed_items["hashtags"][1] == list(expected["hashtags"][1])
    with pytest.raises(InvalidRequest, match="takes strings"):
        hash_raw(contract, {"device": 3}, per_candidate=False)


def test_a_stopped_server_gives_the_unreachable_error(repo, contract, requests):
    """A server that answered a moment ago and was then stopped: ServerUnavailable, not a traceback."""
    request = requests[0]
    own = TritonServer(repo)
    try:
        own.start()
        ranker = RankerClient(own.grpc_url, contract, protocol="grpc", retries=1, backoff=0.01, timeout=2)
        ranker.rank(request.user, request.candidates)
    finally:
        own.stop()
    with ranker, pytest.raises(ServerUnavailable, match="after 2 attempts"):
        ranker.rank(request.user, request.candidates)
