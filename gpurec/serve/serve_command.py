"""`gpurec serve`: run Triton Inference Server on a model repository until Ctrl-C or SIGTERM.

    gpurec serve --repo runs/demo/repo                       # free loopback ports
    gpurec serve --repo runs/demo/repo --http-port 8000 --grpc-port 8001 --metrics-port 8002
    gpurec serve --repo runs/demo/repo --feature-store redis://127.0.0.1:6379/0 --event-log kafka://127.0.0.1:9092

`--feature-store` / `--event-log` override, for the `feed` model, the URLs export wrote into
`feed/config.pbtxt` (through GPUREC_FEATURE_STORE / GPUREC_EVENT_LOG in the server's environment).

    gpurec serve --repo REPO --production --admin-key-file /run/secrets/gpurec_admin_key

`--production`: no model control, gRPC only with `--grpc-port`, and the admin APIs (repository,
config, statistics, shared memory, trace, logging) only for requests with the header
`gpurec-admin-key` (the key from `--admin-key-file`, a file only its owner may read, or
GPUREC_ADMIN_KEY; with neither, a random key nobody knows). See gpurec/serve/server.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from gpurec.checks import port, positive_float, require_dir, require_file
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.serve.server import ADMIN_HEADER, ADMIN_KEY_ENV


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, type=Path, help="model repository written by `gpurec export`")
    parser.add_argument("--http-port", type=port, default=None, help="HTTP port (default: a free one)")
    parser.add_argument("--grpc-port", type=port, default=None, help="gRPC port (default: a free one)")
    parser.add_argument("--metrics-port", type=port, default=None, help="Prometheus metrics port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind all endpoints to (default: loopback only)")
    parser.add_argument("--log", type=Path, default=None, help="server log file (default: a temporary file, printed)")
    parser.add_argument("--timeout", type=positive_float, default=180.0, help="seconds to wait for the server to be ready")
    parser.add_argument("--feature-store", default=None, help="the feed's feature store, overriding feed/config.pbtxt")
    parser.add_argument("--event-log", default=None, help="the feed's event log, overriding feed/config.pbtxt")
    parser.add_argument("--sync-dir", type=Path, default=None, help="parameter deltas the ranker follows in place (gpurec train --online --sync-dir)")
    parser.add_argument("--verbose", action="store_true", help="verbose server log")
    parser.add_argument(
        "--production",
        action="store_true",
        help="least privilege: no model control, admin APIs need the admin key, gRPC only with --grpc-port",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help=f"file holding the admin key (mode 600; default: ${{{ADMIN_KEY_ENV}}}, else a random key); needs --production",
    )
    parser.add_argument("--json", action="store_true", help="print the endpoints as one JSON object once ready")


def require_model_repository(repo: Path) -> Path:
    """`repo` if it is a directory holding at least one model (`<model>/config.pbtxt`)."""
    require_dir(repo, "--repo")
    if not any(model.is_dir() and (model / "config.pbtxt").is_file() for model in repo.iterdir()):
        raise InputNotFound(f"--repo {repo} holds no model (no <model>/config.pbtxt); write one with `gpurec export --repo {repo}`")
    return repo


def read_admin_key(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """The admin key from `path` (readable by its owner only) or the environment; None for neither."""
    from gpurec.serve.server import check_admin_key

    if path is not None:
        require_file(path, "--admin-key-file")
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InvalidInput(f"--admin-key-file {path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        key, what = path.read_text().strip(), f"--admin-key-file {path}"
    elif environ.get(ADMIN_KEY_ENV):
        key, what = environ[ADMIN_KEY_ENV].strip(), ADMIN_KEY_ENV
    else:
        return None
    try:
        return check_admin_key(key)
    except ValueError as err:
        raise InvalidInput(f"{what}: {err}") from None


def run(args: argparse.Namespace) -> int:
    from gpurec.serve.feed_settings import EVENT_LOG_ENV, FEATURE_STORE_ENV, SYNC_DIR_ENV, normalise_url
    from gpurec.serve.server import TritonServer, TritonServerError

    require_model_repository(args.repo)
    ports = [p for p in (args.http_port, args.grpc_port, args.metrics_port) if p is not None]
    if len(set(ports)) < len(ports):
        raise InvalidInput(f"--http-port, --grpc-port and --metrics-port must differ, got {ports}")
    if args.log is not None and args.log.is_dir():
        raise InvalidInput(f"--log {args.log} is a directory; give a file name")
    if args.admin_key_file is not None and not args.production:
        raise InvalidInput("--admin-key-file needs --production (without it every API is open on the bound address)")
    admin_key = read_admin_key(args.admin_key_file, os.environ) if args.production else None
    grpc = not args.production or args.grpc_port is not None
    env = {}
    if args.feature_store is not None:
        env[FEATURE_STORE_ENV] = normalise_url(args.feature_store, "--feature-store")
    if args.event_log is not None:
        env[EVENT_LOG_ENV] = normalise_url(args.event_log, "--event-log")
    if args.sync_dir is not None:
        if args.sync_dir.exists() and not args.sync_dir.is_dir():
            raise InvalidInput(f"--sync-dir {args.sync_dir} is a file, not a directory")
        env[SYNC_DIR_ENV] = str(args.sync_dir.resolve())

    server = TritonServer(
        args.repo,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        host=args.host,
        log_path=args.log,
        startup_timeout=args.timeout,
        verbose=args.verbose,
        env=env,
        production=args.production,
        admin_key=admin_key,
        grpc=grpc,
    )

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT too: a server started in the background of a script inherits SIGINT ignored.
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        grpc_url = server.grpc_url if grpc else None
        endpoints = {
            "http": server.http_url,
            "grpc": grpc_url,
            "metrics": server.metrics_url,
            "log": str(server.log_path),
            "pid": server.pid,
            "production": args.production,
        }
        if args.json:
            print(json.dumps(endpoints), flush=True)
        else:
            guarded = f"\nproduction: model control off, admin APIs need the header {ADMIN_HEADER}" if args.production else ""
            print(
                f"tritonserver ready on {args.repo}: HTTP {server.http_url}  gRPC {grpc_url or 'off'}  "
                f"metrics {server.metrics_url}{guarded}\nlog: {server.log_path}   (Ctrl-C to stop)",
                flush=True,
            )
        assert server.process is not None
        code = server.process.wait()  # returns when the server dies on its own
        print(f"gpurec serve: tritonserver exited with code {code}; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except TritonServerError as err:
        print(f"gpurec serve: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gpurec serve: stopping tritonserver", file=sys.stderr)
        code = server.stop()
        if code != 0:
            print(f"gpurec serve: tritonserver did not stop cleanly (exit code {code}); log tail:\n{server.log_tail()}", file=sys.stderr)
        return 0 if code == 0 else 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()
