"""A Kafka-protocol broker for tests, benchmarks and the demo: noida-db's binary, run by us.

noida-db (PyPI `noida-db`, pinned in requirements/stream.txt) is a single binary that speaks the
Kafka protocol with topics, consumer groups, idempotent producers, transactions, compaction and
retention. It is NOT a durable production broker: it snapshots its whole state about every 3 s, so
a kill -9 of the broker loses up to ~3 s of acknowledged writes. Stop it with `stop()` (Ctrl-C,
which saves), never kill -9 it where durability matters.

Its Python entry point runs the binary as a child and hides that child's PID, so this module runs
the binary itself: the PID is ours, and `stop()` (also on `with` exit) always ends it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from gpurec.errors import GpurecError, InputNotFound


def noida_binary() -> Path:
    """The noida-db executable inside the installed `noida_db` package."""
    spec = importlib.util.find_spec("noida_db")
    if spec is None or not spec.submodule_search_locations:
        raise InputNotFound("noida-db is not installed: pip install -r requirements/stream.txt")
    binary = Path(spec.submodule_search_locations[0]) / "noida-db"
    if not binary.is_file():
        raise InputNotFound(f"noida-db binary missing at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)  # wheels may drop the execute bit; the package's own wrapper does the same
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the broker binds it right after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class KafkaBroker:
    """One noida-db Kafka broker on 127.0.0.1, data under `data_dir`.

    >>> with KafkaBroker(tmp / "kafka") as broker:
    ...     log = open_event_log(broker.url)
    """

    def __init__(self, data_dir: str | Path, port: int | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The `open_event_log` URL of this broker."""
        return f"kafka://{self.bootstrap}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout_s: float = 30.0) -> KafkaBroker:
        """Start the broker and wait until it answers a metadata request."""
        from confluent_kafka.admin import AdminClient

        if self.process is not None:
            raise GpurecError(f"broker already running (pid {self.process.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.data_dir / "broker.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(noida_binary()),
                    "start",
                    "--only",
                    "kafka",
                    "--kafka-port",
                    str(self.port),
                    "--host",
                    self.host,
                    "--data-dir",
                    str(self.data_dir / "data"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise GpurecError(f"noida-db exited with code {code} at start: {_tail(log_path)}")
            try:
                admin.list_topics(timeout=0.5)
                return self
            except Exception:  # not listening yet: KafkaException or a transport error
                if time.monotonic() > deadline:
                    self.stop()
                    raise GpurecError(
                        f"noida-db did not answer on {self.bootstrap} in {timeout_s} s: {_tail(log_path)}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """Stop the broker the way Ctrl-C does (it saves its state), escalating to SIGKILL only if it
        hangs; returns its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            process.send_signal(sig)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
        return process.returncode

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"
