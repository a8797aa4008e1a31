"""Serving on a real Triton Inference Server (the one bundled in nvidia-pytriton on CPU; no mocks).

One tiny model is trained, exported twice (versions 1 and 2) and served once for the module;
the fixture stops the server even when a test fails. The last test runs `gpurec serve` as a
subprocess and checks that SIGTERM leaves no process and no shared-memory file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import serve_for_tests, train_small

from gpurec.cli import main
from gpurec.model.trained import load_trained_model
from gpurec.preprocess.manifest import load_manifest
from gpurec.serve.artifact import to_tensors
from gpurec.serve.contract import ContractError, ServingContract, hash_raw_features, rows_from_features
from gpurec.serve.export import eager_scores
from gpurec.serve.server import TritonServer

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOLERANCE = 1e-5
# Long enough that concurrent requests from a Python client (about 1 ms apart on a loaded 2-core
# machine) reliably meet in the batcher; the default (500 µs) is for a fast client.
QUEUE_DELAY_US = 20_000
_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float64): "FP64"}


@pytest.fixture(scope="module")
def run_dir(small_features, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    train_small(small_features, out, max_steps=20)
    return out


@pytest.fixture(scope="module")
def repo(run_dir) -> Path:
    repo = run_dir.parent / "repo"
    for expected_version in (1, 2):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            args = ["export", "--checkpoint", str(run_dir), "--repo", str(repo), "--max-queue-delay-us", str(QUEUE_DELAY_US)]
            assert main([*args, "--json"]) == 0
        assert json.loads(printed.getvalue())["version"] == expected_version
    return repo


@pytest.fixture(scope="module")
def contract(repo) -> ServingContract:
    return ServingContract.load(repo / "ranker" / "2")


@pytest.fixture(scope="module")
def server(repo) -> Iterator[TritonServer]:
    yield from serve_for_tests(repo)


@pytest.fixture(scope="module")
def http(server) -> Iterator:
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()  # an open keep-alive connection would hold the server's shutdown


@pytest.fixture(scope="module")
def grpc(server) -> Iterator:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def rows(small_features, contract) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """64 real test-split rows as contract inputs, with their raw item ids."""
    manifest = load_manifest(small_features)
    frame = pl.read_parquet(manifest.split_files("test", small_features)[0]).head(64)
    return rows_from_features(contract, frame), frame["item_id"].to_numpy().astype(np.int64)


@pytest.fixture(scope="module")
def reference(run_dir, contract, rows) -> dict[str, np.ndarray]:
    model, remap, _ = load_trained_model(run_dir)
    return eager_scores(model, remap, contract, rows[0])


def _inputs(module, arrays: dict[str, np.ndarray]) -> list:
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), _DTYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _rank(client, module, arrays: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    outputs = [module.InferRequestedOutput(n) for n in names]
    result = client.infer("ranker", _inputs(module, arrays), outputs=outputs)
    return {n: result.as_numpy(n).reshape(-1) for n in names}


def test_export_writes_versioned_repository(repo, contract):
    for model in ("ranker", "recommend"):
        assert sorted(p.name for p in (repo / model).iterdir() if p.is_dir()) == ["1", "2"]
        assert (repo / model / "2" / "model.py").is_file()
        assert ServingContract.load(repo / model / "2") == contract
    assert (repo / "ranker" / "2" / "model.pt").is_file()
    config = (repo / "ranker" / "config.pbtxt").read_text()
    kind = "KIND_GPU" if torch.cuda.is_available() else "KIND_CPU"
    for expected in ('backend: "python"', "max_batch_size: 1024", "dynamic_batching {", f"kind: {kind}", 'name: "hashtags"'):
        assert expected in config
    assert contract.tasks == ("like", "finish")
    assert contract.multi_valued_features == ("hashtags",)
    assert len(contract.dense_features) == 8


def test_http_and_grpc_scores_equal_in_process(http, grpc, contract, rows, reference, repo):
    arrays, _ = rows
    names = [*contract.tasks, "score"]
    scripted = torch.jit.load(str(repo / "ranker" / "2" / "model.pt"))
    with torch.no_grad():
        in_process = {k: v.numpy() for k, v in scripted(*to_tensors(arrays, contract)).items()}
    for got in (_rank(http, httpclient, arrays, names), _rank(grpc, grpcclient, arrays, names)):
        for name in names:
            np.testing.assert_allclose(got[name], reference[name], atol=TOLERANCE, rtol=0)
            np.testing.assert_allclose(got[name], in_process[name], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(reference["score"], reference["like"] + reference["finish"], atol=1e-6)


def test_compared_rows_cover_admitted_and_unknown_ids(run_dir, rows):
    """The score comparisons above exercise both paths of the collisionless tables: ids with
    their own rows and ids (new on the test day, or never admitted) that read the default row."""
    _, lookup, _ = load_trained_model(run_dir)
    arrays, _ = rows
    has_row = [
        lookup.rows_of(lookup.features.index(name), torch.from_numpy(arrays[name].reshape(-1))) >= 0
        for name in ("user_id", "item_id")
    ]
    found = torch.cat(has_row)
    assert 0 < int(found.sum()) < found.numel()


def _recommend(client, module, arrays, candidate_ids, k) -> dict[str, np.ndarray]:
    request = {**arrays, "candidate_ids": candidate_ids, "k": np.array([k], dtype=np.int32)}
    result = client.infer("recommend", _inputs(module, request))
    return {n: result.as_numpy(n) for n in ("item_ids", "scores", "indices")}


def test_recommend_returns_top_k_of_in_process_scores(http, grpc, rows, reference):
    arrays, item_ids = rows
    order = np.argsort(-reference["score"], kind="stable")
    for client, module in ((http, httpclient), (grpc, grpcclient)):
        top = _recommend(client, module, arrays, item_ids, 10)
        np.testing.assert_array_equal(top["indices"], order[:10])
        np.testing.assert_array_equal(top["item_ids"], item_ids[order[:10]])
        np.testing.assert_allclose(top["scores"], reference["score"][order[:10]], atol=TOLERANCE, rtol=0)
    everything = _recommend(http, httpclient, arrays, item_ids, 1000)
    np.testing.assert_array_equal(everything["indices"], order)  # k > N: all candidates, ranked


def _ranker_stats(client) -> tuple[int, int, int]:
    """(successful requests, executions, inferences = rows) of the ranker so far."""
    (stats,) = [s for s in client.get_inference_statistics("ranker")["model_stats"] if s["version"] == "2"]
    return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"]), int(stats["inference_count"])


def test_dynamic_batching_merges_concurrent_requests(server, http, rows):
    arrays, _ = rows
    config = http.get_model_config("ranker")
    assert "dynamic_batching" in config and config["max_batch_size"] == 1024
    assert f"max_queue_delay_microseconds: {QUEUE_DELAY_US}" in (server.repo / "ranker" / "config.pbtxt").read_text()
    before = _ranker_stats(http)
    singles = [{name: a[i : i + 2] for name, a in arrays.items()} for i in range(0, 64, 2)]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=16)
    try:
        pending = [client.async_infer("ranker", _inputs(httpclient, one)) for one in singles for _ in range(2)]
        for request in pending:
            request.get_result()
    finally:
        client.close()
    # Triton updates its statistics after sending a response: under load the last few can lag.
    deadline = time.monotonic() + 10
    while True:
        requests, executions, inferred = (a - b for a, b in zip(_ranker_stats(http), before, strict=True))
        if requests >= len(pending) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert requests == len(pending) and inferred == 2 * len(pending)
    assert executions < requests, f"{requests} concurrent requests ran in {executions} executions: not batched"


def test_metrics_endpoint_counts_inferences(server, http):
    _, _, rows_seen = _ranker_stats(http)
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    match = re.search(r'^nv_inference_count\{model="ranker",version="2"\} (\d+)', text, re.MULTILINE)
    assert match, "no nv_inference_count for ranker version 2 in the metrics"
    assert int(match.group(1)) == rows_seen > 0


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, http, contract, rows, reference):
    arrays, item_ids = rows
    client = http
    bad = {
        "wrong dtype": {**arrays, "dense": arrays["dense"].astype(np.float64)},
        "wrong width": {**arrays, "dense": np.zeros((64, len(contract.dense_features) + 1), np.float32)},
        "NaN dense": {**arrays, "dense": np.full_like(arrays["dense"], np.nan)},
        "missing input": {k: v for k, v in arrays.items() if k != "user_id"},
        "rows disagree": {**arrays, "user_id": arrays["user_id"][:10]},
    }
    for case, request in bad.items():
        with pytest.raises(InferenceServerException) as served:
            _rank(client, httpclient, request, ["score"])
        with pytest.raises(ContractError) as checked:  # the client-side check agrees
            contract.validate_rows(request)
        assert served.value.message() and str(checked.value), case
    with pytest.raises(InferenceServerException, match="k must be positive"):
        _recommend(client, httpclient, arrays, item_ids, 0)
    with pytest.raises(InferenceServerException, match="rows for"):
        _recommend(client, httpclient, arrays, item_ids[:5], 3)
    assert contract.validate_rows(arrays) == 64
    np.testing.assert_allclose(_rank(client, httpclient, arrays, ["score"])["score"], reference["score"], atol=TOLERANCE, rtol=0)
    assert server.running()


def test_raw_values_hash_like_preprocessing(contract, small_features):
    """The client-side hashing of raw values gives the ids the training features hold."""
    manifest = load_manifest(small_features)
    frame = pl.read_parquet(manifest.split_files("test", small_features)[0]).head(20)
    raw_root = Path(manifest.source["input"]) if "input" in manifest.source else small_features.parent / "raw"
    items = pl.read_parquet(raw_root / "items").unique("item_id", keep="last")
    users = pl.read_parquet(raw_root / "users").unique("user_id", keep="last")
    joined = frame.join(items, on="item_id", how="left").join(users, on="user_id", how="left", suffix="_user")
    raw = {
        "user_id": joined["user_id"].to_list(),
        "item_id": joined["item_id"].to_list(),
        "author_id": joined["author_id"].to_list(),
        "user_region": joined["region_user"].to_list(),
        "device": joined["device"].to_list(),
        "user_language": joined["language_user"].to_list(),
        "item_language": joined["language"].to_list(),
        "hour": [ts.hour for ts in joined["ts"].to_list()],
        "hashtags": joined["hashtags"].to_list(),
    }
    hashed = hash_raw_features(contract, raw)
    expected = rows_from_features(contract, frame)
    for name, ids in hashed.items():
        np.testing.assert_array_equal(ids, expected[name], err_msg=name)


def _group_alive(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def test_serve_command_stops_cleanly_on_sigterm(repo):
    shm_before = set(Path("/dev/shm").glob("gpurec_*"))
    process = subprocess.Popen(
        [sys.executable, "-m", "gpurec.cli", "serve", "--repo", str(repo), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        endpoints = json.loads(process.stdout.readline())
        assert set(endpoints) >= {"http", "grpc", "metrics", "pid"}
        assert endpoints["http"].startswith("127.0.0.1:")
        client = httpclient.InferenceServerClient(endpoints["http"])
        assert client.is_server_ready()
        client.close()
        assert set(Path("/dev/shm").glob("gpurec_*")) - shm_before, "the python backend made no shared memory"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    deadline = time.monotonic() + 5
    while _group_alive(endpoints["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(endpoints["pid"]), "tritonserver or a stub is still running"
    with pytest.raises(ProcessLookupError):
        os.kill(endpoints["pid"], 0)
    assert set(Path("/dev/shm").glob("gpurec_*")) - shm_before == set()


# ---- hostile inputs: NaN/inf in, NaN/inf out, counted by kind --------------------------------


def _ranker_errors(server) -> dict[str, float]:
    """gpurec_ranker_errors_total of version 2 by kind, read from the metrics endpoint."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    out = {}
    for labels, value in re.findall(r"^gpurec_ranker_errors_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parsed.get("model") == "ranker" and parsed.get("version") == "2":
            out[parsed["kind"]] = float(value)
    return out


def test_huge_dense_value_fails_alone_in_its_batch_and_is_counted(server, http, rows, reference):
    """Finite 1e38 dense values overflow the model (inf - inf in the first layers: NaN scores):
    that request gets an error of kind non_finite_output, the requests batched with it get their
    exact scores, the server stays up and the per-kind counter moves by exactly one."""
    arrays, _ = rows
    before = _ranker_errors(server)
    assert before.keys() >= {"non_finite_input", "non_finite_output", "bad_shape", "missing_input", "scoring_failed"}
    hostile = {name: a[:4].copy() for name, a in arrays.items()}
    hostile["dense"][1, :] = 1e38  # one row of four; a single huge column may only saturate a sigmoid
    goods = [{name: a[i : i + 4] for name, a in arrays.items()} for i in range(8, 64, 8)]
    stats_before = _ranker_stats(http)
    client = httpclient.InferenceServerClient(server.http_url, concurrency=8)
    try:  # sent together: the 20 ms queue delay merges them into one or two executions
        pending = [client.async_infer("ranker", _inputs(httpclient, r)) for r in [goods[0], hostile, *goods[1:]]]
        outcomes = []
        for request in pending:
            try:
                outcomes.append(request.get_result().as_numpy("score").reshape(-1))
            except InferenceServerException as err:
                outcomes.append(err)
    finally:
        client.close()
    refused = outcomes.pop(1)
    assert isinstance(refused, InferenceServerException), "a NaN/inf score was returned with a success status"
    assert "ranker: non_finite_output:" in refused.message() and refused.status() == "500"
    for start, got in zip(range(8, 64, 8), outcomes, strict=True):
        np.testing.assert_allclose(got, reference["score"][start : start + 4], atol=TOLERANCE, rtol=0)
    _, executions, _ = (a - b for a, b in zip(_ranker_stats(http), stats_before, strict=True))
    assert executions < len(pending), "the hostile request was not batched with the others"
    after = _ranker_errors(server)
    assert after["non_finite_output"] - before["non_finite_output"] == 1
    assert after["non_finite_input"] == before["non_finite_input"]
    # The server keeps serving, and a following valid request is exact.
    np.testing.assert_allclose(_rank(http, httpclient, arrays, ["score"])["score"], reference["score"], atol=TOLERANCE, rtol=0)
    assert server.running()


def test_non_finite_inputs_are_refused_up_front_by_kind(server, http, grpc, rows, reference):
    arrays, item_ids = rows
    before = _ranker_errors(server)
    for value in (np.nan, np.inf, -np.inf):
        bad = {**arrays, "dense": arrays["dense"].copy()}
        bad["dense"][3, 2] = value
        for client, module in ((http, httpclient), (grpc, grpcclient)):
            with pytest.raises(InferenceServerException, match="ranker: non_finite_input:") as raised:
                _rank(client, module, bad, ["score"])
            assert raised.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
    after = _ranker_errors(server)
    assert after["non_finite_input"] - before["non_finite_input"] == 6
    assert after["non_finite_output"] == before["non_finite_output"]
    # recommend relays the ranker: a NaN/inf score is its failure (500), not a top-k of NaN.
    huge = {**arrays, "dense": arrays["dense"].copy()}
    huge["dense"][0, :] = 1e38
    with pytest.raises(InferenceServerException, match="non_finite_output") as raised:
        _recommend(http, httpclient, huge, item_ids, 5)
    assert raised.value.status() == "500"
    np.testing.assert_allclose(_rank(grpc, grpcclient, arrays, ["score"])["score"], reference["score"], atol=TOLERANCE, rtol=0)
