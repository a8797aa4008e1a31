"""Production mode of the Triton server, against the real tritonserver 2.51 bundled in nvidia-pytriton.

A one-line python-backend model (no torch: the server is ready in about 2 s) is enough to check
every flag `production=True` passes: the admin APIs refuse requests without the admin key (HTTP
403, gRPC an error) and answer with it, model control is off even for the key holder, inference,
health and metadata stay open, gRPC is off unless asked for, and the key never reaches the log or
gpurec's output. `gpurec serve --production` is checked as a subprocess, and its bad input.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import serve_for_tests

from gpurec.cli import main
from gpurec.serve.server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    GRPC_ADMIN_HEADER,
    RESTRICTED_APIS,
    TritonServer,
    find_server,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "test-admin-key_0123456789abcdef"
ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 8
input [{ name: "x", data_type: TYPE_FP32, dims: [1] }]
output [{ name: "y", data_type: TYPE_FP32, dims: [1] }]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]) for r in requests]
"""
INFER = json.dumps({"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [1.5]}]}).encode()
# One call per restricted API (method, path, body), and the open ones a client needs.
ADMIN_CALLS = {
    "model-repository": ("POST", "/v2/repository/index", b"{}"),
    "model-config": ("GET", "/v2/models/echo/config", None),
    "statistics": ("GET", "/v2/models/echo/stats", None),
    "shared-memory": ("GET", "/v2/systemsharedmemory/status", None),
    "trace": ("GET", "/v2/trace/setting", None),
    "logging": ("GET", "/v2/logging", None),
}
OPEN_CALLS = {
    "inference": ("POST", "/v2/models/echo/infer", INFER),
    "health": ("GET", "/v2/health/ready", None),
    "model ready": ("GET", "/v2/models/echo/ready", None),
    "metadata": ("GET", "/v2/models/echo", None),
}


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("security") / "repo"
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return repo


@pytest.fixture(scope="module")
def production(echo_repo) -> Iterator[TritonServer]:
    yield from serve_for_tests(echo_repo, production=True, admin_key=KEY, grpc=True)


def http_call(url: str, method: str, path: str, body: bytes | None, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header(ADMIN_HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_every_restricted_api_is_checked():
    assert set(ADMIN_CALLS) == set(RESTRICTED_APIS)


def test_http_admin_apis_need_the_key_and_inference_does_not(production):
    for api, (method, path, body) in ADMIN_CALLS.items():
        for key in (None, "wrong-key-0123456789abcdef"):
            status, text = http_call(production.http_url, method, path, body, key)
            assert status == 403 and f"expecting header '{ADMIN_HEADER}'" in text, (api, key, status, text)
        status, text = http_call(production.http_url, method, path, body, KEY)
        assert status == 200, (api, status, text)
    for name, (method, path, body) in OPEN_CALLS.items():
        status, text = http_call(production.http_url, method, path, body)
        assert status == 200, (name, status, text)
    status, text = http_call(production.http_url, "POST", "/v2/models/echo/infer", INFER)
    assert json.loads(text)["outputs"][0]["data"] == [1.5]


def test_model_control_is_off_even_with_the_key(production):
    for action in ("load", "unload"):
        path = f"/v2/repository/models/echo/{action}"
        assert http_call(production.http_url, "POST", path, b"{}")[0] == 403
        status, text = http_call(production.http_url, "POST", path, b"{}", KEY)
        assert status == 503 and "explicit model load / unload is not allowed" in text, (status, text)
    status, _ = http_call(production.http_url, "POST", "/v2/models/echo/infer", INFER)
    assert status == 200  # still loaded and serving


def test_grpc_admin_protocols_need_the_key(production):
    client = grpcclient.InferenceServerClient(production.grpc_url)
    try:
        for headers in ({}, {ADMIN_HEADER: KEY}, {GRPC_ADMIN_HEADER: "wrong-key-0123456789abcdef"}):
            with pytest.raises(InferenceServerException, match=f"restricted, expecting header '{GRPC_ADMIN_HEADER}'"):
                client.get_model_repository_index(headers=headers)
            with pytest.raises(InferenceServerException, match="restricted"):
                client.get_inference_statistics("echo", headers=headers)
        admin = {GRPC_ADMIN_HEADER: KEY}
        assert client.get_model_repository_index(headers=admin).models[0].name == "echo"
        assert client.get_inference_statistics("echo", headers=admin).model_stats[0].name == "echo"
        with pytest.raises(InferenceServerException, match="not allowed"):
            client.load_model("echo", headers=admin)
        tensor = grpcclient.InferInput("x", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.array([[2.5]], np.float32))
        assert client.infer("echo", [tensor]).as_numpy("y").tolist() == [[2.5]]
        assert client.is_model_ready("echo")
    finally:
        client.close()


def test_the_key_is_not_logged(production):
    assert production.log_path is not None
    log = production.log_path.read_text()
    assert "MODE_NONE" in log  # the server's own option table: model control is off
    assert KEY not in log and KEY not in repr(production)


def test_default_mode_keeps_every_api_open_and_production_drops_grpc_unless_asked(echo_repo):
    command = TritonServer(echo_repo).command(find_server())
    assert not any(a.startswith(("--http-restricted-api", "--grpc-restricted-protocol", "--model-control-mode")) for a in command)
    quiet = TritonServer(echo_repo, production=True, grpc=False).command(find_server())
    assert "--allow-grpc=false" in quiet and not any(a.startswith("--grpc-restricted-protocol") for a in quiet)
    assert {"--allow-sagemaker=false", "--allow-vertex-ai=false", "--model-control-mode=none"} <= set(quiet)
    with pytest.raises(ValueError, match="16-256 characters"):
        TritonServer(echo_repo, production=True, admin_key="short")
    with pytest.raises(ValueError, match="production"):
        TritonServer(echo_repo, admin_key=KEY)


def _serve(*args: str) -> tuple[int, str]:
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["serve", *args])
    return code, err.getvalue()


def test_serve_command_refuses_bad_key_settings(echo_repo, tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)
    cases = {
        "readable by others": (["--production", "--admin-key-file", str(key_file)], "readable by others"),
        "needs production": (["--admin-key-file", str(key_file)], "needs --production"),
        "missing file": (["--production", "--admin-key-file", str(tmp_path / "nope")], "does not exist"),
    }
    for case, (args, message) in cases.items():
        code, err = _serve("--repo", str(echo_repo), *args)
        assert code == 2 and err.startswith("gpurec serve: ") and message in err and err.count("\n") == 1, (case, err)
        assert KEY not in err
    monkeypatch.setenv(ADMIN_KEY_ENV, "has a space in it, no good")
    code, err = _serve("--repo", str(echo_repo), "--production")
    assert code == 2 and ADMIN_KEY_ENV in err and "has a space" not in err


def test_serve_command_production_end_to_end(echo_repo, tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    process = subprocess.Popen(
        [sys.executable, "-m", "gpurec.cli", "serve", "--repo", str(echo_repo), "--production", "--admin-key-file", str(key_file), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        endpoints = json.loads(line)
        assert endpoints["production"] is True and endpoints["grpc"] is None  # no gRPC port asked for
        assert endpoints["http"].startswith("127.0.0.1:")
        assert http_call(endpoints["http"], "POST", "/v2/repository/index", b"{}")[0] == 403
        assert http_call(endpoints["http"], "POST", "/v2/repository/index", b"{}", KEY)[0] == 200
        assert http_call(endpoints["http"], "POST", "/v2/models/echo/infer", INFER)[0] == 200
        # Triton 2.51 takes the key only as a flag: it is on the server's command line (documented).
        cmdline = Path(f"/proc/{endpoints['pid']}/cmdline").read_bytes().split(b"\0")
        assert any(arg.startswith(b"--http-restricted-api=") and KEY.encode() in arg for arg in cmdline)
        assert not any(arg.startswith(b"--grpc-port") for arg in cmdline)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert KEY not in line + out + err
