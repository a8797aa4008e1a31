"""Start, watch and stop a Triton Inference Server on a model repository.

`TritonServer` is a context manager used by `gpurec serve`, the tests and the benchmark:

    with TritonServer("runs/demo/repo") as server:   # free loopback ports when none are given
        print(server.http_url, server.grpc_url, server.metrics_url)

Which binary: `tritonserver` on PATH if there is one (an NGC container, whose environment is
already right), otherwise the real tritonserver 2.51 bundled in the `nvidia-pytriton` wheel
(python backend only), which needs an environment made for it (measured on these machines):
- LD_LIBRARY_PATH: the interpreter's own LIBDIR first (else the python-backend stub picks the
  system's older libpython and breaks), then the wheel's `nvidia_pytriton.libs` (libcudart and
  friends the binary links against even on CPU);
- a backend directory holding `libtriton_python.so` *and* the stub for this Python version next
  to it: the wheel keeps the stubs elsewhere, so the backend is copied once into a cache directory
  we own (`~/.cache/gpurec/triton/...`, `GPUREC_CACHE` overrides), never into site-packages;
- PATH with this interpreter's bin directory first: that is how the stub finds the venv's
  packages (torch, fbgemm); PYTHONPATH is ignored by it.

Threads: each model instance is its own process, so the server sets `OMP_NUM_THREADS` (one
intra-op thread per instance, `intra_op_threads`) unless the caller's environment names it.
torch's OpenMP pool spin-waits between ops; with a ranker, BLS models and their neighbours on a few
cores the spinning threads starve everyone (measured on the 2-core machine, 300-row ranker
requests: 52-57 ms of ranker CPU per request with the default pool, 6.4 ms with one thread; feed
p99 408 -> 52 ms in the same closed loop). Parallelism comes from instances and the batcher.

Clean shutdown: the server runs in its own process group (its python-backend stubs are its
children), SIGTERM lets it unload models and remove its shared memory, SIGKILL of the whole group
follows after a timeout, and the shared-memory files of this server (its own prefix, passed with
`--backend-config=python,shm-region-prefix-name=...`) are removed if a crash left them.

Production mode (`production=True`, `gpurec serve --production`): least privilege, every flag
checked against the bundled tritonserver 2.51 (tests/test_serve_security.py):
- `--model-control-mode=none`: the repository is loaded once at start; load/unload calls fail;
- only HTTP (inference, health, metadata) and metrics listen; gRPC only when a gRPC port is
  given; SageMaker and Vertex AI are off explicitly (Vertex turns itself on under AIP_MODE);
- the admin APIs (`RESTRICTED_APIS`: model repository, model config, shared memory, statistics,
  trace, logging) answer only requests carrying the header `gpurec-admin-key: <key>` (HTTP,
  `--http-restricted-api`; over gRPC the metadata key is `triton-grpc-protocol-gpurec-admin-key`,
  `--grpc-restricted-protocol`). A refused call is HTTP 403, gRPC UNAVAILABLE. Triton takes the key only on its
  command line (no file or environment option in 2.51), so the key is visible in /proc/PID/cmdline
  to users of the same host who can list processes: run the server as its own user or in a
  container, and rotate the key. It is never printed or logged by gpurec. Without a key a random
  one is drawn, which locks the admin APIs for everyone.
Default mode keeps Triton's defaults (every API open on loopback), which the tests rely on.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOCALHOST = "127.0.0.1"
SHM_DIR = Path("/dev/shm")
ADMIN_HEADER = "gpurec-admin-key"  # lower case: gRPC metadata keys must be
# Triton 2.51 looks for the gRPC one under this prefix (measured: its refusal names it).
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
ADMIN_KEY_ENV = "GPUREC_ADMIN_KEY"
# Every API but inference, health and metadata: what a client of the models never needs.
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
_KEY = re.compile(r"[A-Za-z0-9._~-]{16,256}")  # no ':', ',' or '=' (Triton's flag syntax) and no spaces


def check_admin_key(key: str) -> str:
    """`key` if Triton can take it as a header value; ValueError (never quoting the key) if not."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"the admin key must be 16-256 characters of A-Z a-z 0-9 . _ ~ - (got {len(key)} characters)")
    return key


class TritonServerError(RuntimeError):
    """The server could not be found, did not become ready, or died; the message has its log tail."""


@dataclass(frozen=True)
class ServerCommand:
    """The binary to run, the environment it needs and the flags that go with that binary."""

    binary: Path
    env: dict[str, str]
    args: list[str] = field(default_factory=list)
    bundled: bool = False


def cache_root() -> Path:
    return Path(os.environ.get("GPUREC_CACHE", Path.home() / ".cache" / "gpurec"))


def find_server() -> ServerCommand:
    """`tritonserver` on PATH, else the one in the nvidia-pytriton wheel with its environment."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return ServerCommand(Path(on_path), dict(os.environ))
    spec = importlib.util.find_spec("pytriton")  # located, not imported (importing it is slow)
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(
            "no tritonserver on PATH and nvidia-pytriton is not installed: "
            "`make setup` (requirements/serve.txt) or run inside an NGC tritonserver container"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    binary = root / "bin" / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    if not binary.is_file() or not libs.is_dir():
        raise TritonServerError(f"the nvidia-pytriton wheel at {package} has no {binary} or {libs}")
    backends = prepare_backends(root)
    env = dict(os.environ)
    lib_path = [sysconfig.get_config_var("LIBDIR") or "", str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in lib_path if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    args = [f"--backend-directory={backends}", f"--cache-directory={root / 'caches'}", "--allow-gpu-metrics=false"]
    return ServerCommand(binary, env, args, bundled=True)


def prepare_backends(triton_root: Path) -> Path:
    """A backend directory with the python backend plus this interpreter's stub, in our cache.

    Built once per wheel version and Python version, in a temporary directory renamed into place,
    so concurrent first runs (parallel tests) never see a half-copied backend.
    """
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"the nvidia-pytriton wheel has no python-backend stub for Python {python} ({stub})")
    source = triton_root / "backends" / "python"
    stamp = f"{int(source.joinpath('libtriton_python.so').stat().st_mtime)}-{stub.stat().st_size}"
    target = cache_root() / "triton" / f"backends-py{python}-{stamp}"
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=target.parent))
    try:
        shutil.copytree(source, staging / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / stub.name)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` distinct ports free on `host` now (held together while choosing, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the launching process dies (no orphaned server)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_LIVE: weakref.WeakSet[TritonServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class TritonServer:
    """A tritonserver process on a model repository, bound to `host` (loopback by default).

    On stop, Triton waits up to `drain_timeout` seconds for open client connections and in-flight
    requests (its `--exit-timeout-secs`; a client that keeps an idle HTTP connection open holds it
    that long), then unloads the models; after `stop_timeout` seconds the process group is killed.
    """

    def __init__(
        self,
        repo: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = LOCALHOST,
        log_path: str | Path | None = None,
        startup_timeout: float = 180.0,
        drain_timeout: int = 5,
        stop_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
        verbose: bool = False,
        env: Mapping[str, str] | None = None,
        intra_op_threads: int | None = 1,
        production: bool = False,
        admin_key: str | None = None,
        grpc: bool = True,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.drain_timeout = drain_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self.verbose = verbose
        self.env = dict(env or {})  # added to the server's environment (its models read it)
        self.intra_op_threads = intra_op_threads
        self.production = production
        if admin_key is not None and not production:
            raise ValueError("an admin key only applies in production mode")
        # Not an attribute a repr or a traceback's locals would show by name: kept private.
        self._admin_key = check_admin_key(admin_key) if admin_key is not None else secrets.token_urlsafe(32)
        self.grpc = grpc
        if not grpc:
            self.ports["grpc"] = None
        self.shm_prefix = f"gpurec_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._own_log_dir: Path | None = None

    # ---- endpoints --------------------------------------------------------------------------

    @property
    def client_host(self) -> str:
        return LOCALHOST if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        if not self.grpc:
            raise TritonServerError("this server runs without gRPC (production mode with no gRPC port)")
        return f"{self.client_host}:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.ports['metrics']}/metrics"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ---- lifecycle --------------------------------------------------------------------------

    def command(self, server: ServerCommand) -> list[str]:
        """The server's command line (in production mode it holds the admin key: never log it)."""
        grpc = [f"--grpc-address={self.host}", f"--grpc-port={self.ports['grpc']}"] if self.grpc else ["--allow-grpc=false"]
        return [
            str(server.binary),
            f"--model-repository={self.repo}",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            *grpc,
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--exit-timeout-secs={self.drain_timeout}",
            *server.args,
            *(self.production_args() if self.production else []),
            *(["--log-verbose=1"] if self.verbose else []),
            *self.extra_args,
        ]

    def production_args(self) -> list[str]:
        """Least-privilege flags (see the module docstring); the last two carry the admin key."""
        guarded = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self._admin_key}"
        return [
            "--model-control-mode=none",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            f"--http-restricted-api={guarded}",
            *([f"--grpc-restricted-protocol={guarded}"] if self.grpc else []),
        ]

    def start(self) -> TritonServer:
        """Launch and wait until /v2/health/ready answers 200 (every model loaded)."""
        if self.running():
            return self
        if not self.repo.is_dir():
            raise TritonServerError(f"model repository {self.repo} does not exist (run `gpurec export` first)")
        server = find_server()
        missing = [k for k, v in self.ports.items() if v is None and (k != "grpc" or self.grpc)]
        for name, port in zip(missing, free_ports(len(missing), self.client_host), strict=True):
            self.ports[name] = port
        if self.log_path is None:
            self._own_log_dir = Path(tempfile.mkdtemp(prefix="gpurec-triton-"))
            self.log_path = self._own_log_dir / "tritonserver.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**server.env, **self.env}
        if self.intra_op_threads is not None:
            env.setdefault("OMP_NUM_THREADS", str(self.intra_op_threads))
        self._log_file = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command(server),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stubs included in stop(), no Ctrl-C race
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise TritonServerError(
            f"tritonserver was not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL the process group if needed; remove leftover shared memory. Idempotent."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=self.stop_timeout)
            # Anything left in the group (the server after a timeout, or orphaned stubs) is killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            _LIVE.discard(self)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.remove_shared_memory()
        if code == 0 and self._own_log_dir is not None:  # a failed run keeps its log for inspection
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
            self._own_log_dir, self.log_path = None, None
        return code

    def remove_shared_memory(self) -> list[Path]:
        """Delete /dev/shm files with this server's prefix (left only if the server was killed)."""
        leftovers = sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return leftovers

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running() else "stopped"
        grpc = self.grpc_url if self.grpc else "off"
        mode = ", production" if self.production else ""
        return f"TritonServer({self.repo}, http={self.http_url}, grpc={grpc}{mode}, {state})"
