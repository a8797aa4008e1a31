"""`gpurec simulate`: live traffic from the synthetic world's users, through the real feed.

    gpurec simulate --repo runs/demo/repo --log sqlite:///runs/demo/log.db \\
        --feature-store sqlite:///runs/demo/features.db --world runs/demo/raw --users 200 --rate 20 --duration 60
    gpurec simulate ... --url 127.0.0.1:8001          # a server already serving the repo's feed

Simulated users (a sample of the world's) open sessions, ask the `feed` model for pages through
`gpurec.client` with each request's event time, scroll through what they were shown and react as
the world's model says; their actions go to the log's `actions` topic, keyed by user, after their
watch time (likes and shares a little later, a few late), new uploads to `items` and the feature
store. Event time runs `--speedup` times faster than wall time. The world is the one `gpurec
generate` wrote to `--world` (its world.json), or `WorldConfig` defaults with `--seed`.

Without `--url` it starts tritonserver on `--repo` itself, with the feed pointed at `--log` and
`--feature-store`, and always stops it (Ctrl-C and SIGTERM too: the first one ends the run
cleanly, with its report; exit code 130). With `--url`, that server's feed must log to `--log`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gpurec.checks import non_negative_int, positive_float, positive_int, require_dir, require_file
from gpurec.client.recommend_command import _contract, _host_port
from gpurec.data.pseudonym import add_key_file_argument
from gpurec.errors import InputNotFound, InvalidInput

EXIT_INTERRUPTED = 130
DEFAULT_USERS = 1000
SERVED_CHECK_S = 5.0  # how long to wait for the feed's own writer to log the last served rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repo",
        required=True,
        type=Path,
        help="model repository with the feed (its contract; served if no --url)",
    )
    parser.add_argument("--log", required=True, help="event log URL (sqlite:///path or kafka://host:port)")
    parser.add_argument(
        "--feature-store", required=True, help="feature store URL (sqlite:///path or redis://host:port/db)"
    )
    parser.add_argument(
        "--url",
        type=_host_port,
        default=None,
        help="host:port of a running server (default: start one on --repo)",
    )
    parser.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    parser.add_argument(
        "--world",
        type=Path,
        default=None,
        help="logs written by `gpurec generate` (its world.json; default: a default world)",
    )
    parser.add_argument(
        "--users",
        type=positive_int,
        default=None,
        help="simulated users, sampled from the world's (default: 1000, or all of a smaller world)",
    )
    parser.add_argument(
        "--rate", type=positive_float, default=20.0, help="feed requests per second to aim for (default: 20)"
    )
    parser.add_argument(
        "--duration", type=positive_float, default=60.0, help="seconds of traffic (default: 60)"
    )
    parser.add_argument(
        "--speedup",
        type=positive_float,
        default=1440.0,
        help="event-time speed, x wall time (default: 1440, a day a minute)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the simulation (and of the default world)"
    )
    parser.add_argument(
        "--start-day",
        type=non_negative_int,
        default=0,
        help="world day event time starts at (default: 0; later if the log has newer events)",
    )
    parser.add_argument(
        "--partitions", type=positive_int, default=4, help="partitions of the topics it creates (default: 4)"
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=10.0, help="seconds per feed request (default: 10)"
    )
    parser.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=16,
        help="feed requests outstanding at once (default: 16)",
    )
    parser.add_argument(
        "--sync-dir",
        type=Path,
        default=None,
        help="parameter deltas the started server's ranker follows; also measures freshness (action -> served score)",
    )
    add_key_file_argument(parser, "send the world's users as pseudonyms of this key, as `gpurec generate` did")
    parser.add_argument("--json", action="store_true", help="no progress bar; end with one JSON object")


def _world_config(args: argparse.Namespace) -> Any:
    from gpurec.data.generate import WORLD_FILE, load_world_config
    from gpurec.data.world import WorldConfig

    if args.world is None:
        return WorldConfig(seed=args.seed)
    require_dir(args.world, "--world")
    require_file(args.world / WORLD_FILE, "--world")
    try:
        return load_world_config(args.world)
    except (ValueError, TypeError, KeyError) as err:
        raise InvalidInput(f"--world {args.world}: unreadable {WORLD_FILE}: {err}") from None


def _pseudonymizer(args: argparse.Namespace) -> Any:
    """The key's pseudonymizer (None: raw ids); refuses a key other than the one --world was written with."""
    from gpurec.data.pseudonym import check_key_id, load_pseudonymizer, read_key_id

    pseudonymizer = load_pseudonymizer(args.pseudonym_key_file)
    if args.world is not None:
        key_id = pseudonymizer.key_id if pseudonymizer is not None else None
        check_key_id((f"--world {args.world}", read_key_id(args.world)), ("--pseudonym-key-file", key_id))
    return pseudonymizer


def _check_repo(repo: Path) -> Any:
    from gpurec.serve.feed_contract import FEED_MODEL

    contract = _contract(repo)
    if not (repo / FEED_MODEL / "config.pbtxt").is_file():
        raise InputNotFound(
            f"--repo {repo} has no {FEED_MODEL!r} model; export it with `gpurec export` (it writes the feed)"
        )
    return contract


def run(args: argparse.Namespace) -> int:
    from gpurec.client.simulate import LiveWorld
    from gpurec.client.simulate_log import prepare
    from gpurec.client.simulate_run import Simulation, SimulationSettings
    from gpurec.features import open_feature_store
    from gpurec.serve.feed_settings import EVENT_LOG_ENV, FEATURE_STORE_ENV, SYNC_DIR_ENV, normalise_url
    from gpurec.serve.server import TritonServer, TritonServerError
    from gpurec.stream.log import open_event_log
    from gpurec.sync.freshness import FreshnessProbe

    if args.sync_dir is not None and args.url is not None:
        raise InvalidInput("--sync-dir is given to the server simulate starts: leave out --url")
    if args.sync_dir is not None and args.sync_dir.exists() and not args.sync_dir.is_dir():
        raise InvalidInput(f"--sync-dir {args.sync_dir} is a file, not a directory")

    contract = _check_repo(args.repo)
    log_url, store_url = (
        normalise_url(args.log, "--log"),
        normalise_url(args.feature_store, "--feature-store"),
    )
    settings = SimulationSettings(
        rate=args.rate,
        duration_s=args.duration,
        speedup=args.speedup,
        seed=args.seed,
        start_day=args.start_day,
        partitions=args.partitions,
        protocol=args.protocol,
        timeout_s=args.timeout,
        max_in_flight=args.max_in_flight,
    )
    config = _world_config(args)
    users = min(DEFAULT_USERS, config.users) if args.users is None else args.users
    if users > config.users:
        raise InvalidInput(f"--users {users} is more than the world's {config.users} users")
    live = LiveWorld(config, users, args.seed, pseudonymizer=_pseudonymizer(args))
    stop, traffic = threading.Event(), threading.Event()
    server = probe = None
    unlogged = 0
    previous = _install_stop_handlers(stop, traffic)
    try:
        with open_event_log(log_url) as log, open_feature_store(store_url) as store:
            start_ms, catalogue = prepare(
                log, store, live, partitions=settings.partitions, start_day=settings.start_day
            )
            served_before = _served_end(log)
            url = args.url
            if url is None:
                env = {EVENT_LOG_ENV: log_url, FEATURE_STORE_ENV: store_url}
                if args.sync_dir is not None:
                    env[SYNC_DIR_ENV] = str(args.sync_dir.resolve())
                server = TritonServer(args.repo, env=env)
                print(f"gpurec simulate: starting tritonserver on {args.repo} ...", file=sys.stderr)
                server.start()
                if args.sync_dir is not None:
                    probe = FreshnessProbe(server.metrics_url, args.sync_dir).start()
                url = server.grpc_url if args.protocol == "grpc" else server.http_url
                print(
                    f"gpurec simulate: started tritonserver (pid {server.pid}, {args.protocol}://{url})",
                    file=sys.stderr,
                )
            traffic.set()
            if not args.json:
                print(
                    f"gpurec simulate: {users} users, {catalogue} items live, "
                    f"event time from {_iso(start_ms)} at x{args.speedup:g}",
                    file=sys.stderr,
                )
            report = Simulation(live, log, url, contract, settings, stop=stop, progress=not args.json).run(
                start_ms, store, catalogue
            )
            if report.served_rows and _wait_served(log, served_before) == 0:
                print(
                    f"gpurec simulate: warning: the feed answered {report.served_rows} items but logged none to {log_url}; "
                    "is the server's feed configured with this log?",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        print("gpurec simulate: interrupted before the traffic started", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TritonServerError as err:  # no server binary, not ready
        print(f"gpurec simulate: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if probe is not None:
            probe.stop()
        if server is not None:
            unlogged = _scraped_total(server.metrics_url, "gpurec_feed_rows_unlogged_total")
            code = server.stop()
            print(f"gpurec simulate: stopped tritonserver (exit code {code})", file=sys.stderr)
        _restore_handlers(previous)
    result = report.to_json()
    result["unlogged_rows"] = unlogged  # rows of forgotten users: answered, deliberately not logged
    if probe is not None:
        speedup = args.speedup

        def wall_at(event_ms: int) -> float:
            return report.wall_start + (event_ms - report.start_ms) / (1000.0 * speedup)

        result.update(probe.report(wall_at))
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    if report.fatal:
        print(f"gpurec simulate: stopped early: {report.fatal}", file=sys.stderr)
        return 1
    if report.requests == 0 and report.errors:
        print(f"gpurec simulate: no feed request succeeded ({dict(report.errors)})", file=sys.stderr)
        return 1
    return EXIT_INTERRUPTED if report.interrupted else 0


def _scraped_total(metrics_url: str, name: str) -> int:
    """A counter's total over its labels from a Prometheus text page (0 when absent or unreachable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _install_stop_handlers(stop: threading.Event, traffic: threading.Event) -> dict:
    """SIGINT/SIGTERM: during traffic the first one ends the run cleanly (its report printed, the
    server stopped); before traffic, or a second time, KeyboardInterrupt (the server still stopped)."""

    def handle(signum: int, _frame: object) -> None:
        if not traffic.is_set() or stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    return {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _served_end(log: Any) -> int:
    return sum(log.end_offsets("served").values())


def _wait_served(log: Any, before: int) -> int:
    """Served rows appended since `before`, waiting a little for the feed's background writer."""
    deadline = time.monotonic() + SERVED_CHECK_S
    while True:
        grown = _served_end(log) - before
        if grown > 0 or time.monotonic() >= deadline:
            return grown
        time.sleep(0.1)


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _print_summary(r: dict) -> None:
    errors = (
        "".join(f"\n  {k}: {v} ({r['error_examples'].get(k, '')})" for k, v in r["errors"].items()) or " none"
    )
    p50, p99 = r["feed_p50_ms"], r["feed_p99_ms"]
    print(
        f"{r['requests']} feed requests in {r['wall_s']:.1f} s ({r['achieved_rate']:.1f}/s), "
        f"p50 {'-' if p50 is None else f'{p50:.1f}'} ms, p99 {'-' if p99 is None else f'{p99:.1f}'} ms\n"
        f"{r['served_rows']} served rows, {r['impressions']} viewed, {r['actions']} actions ({r['late_actions']} late), "
        f"{r['uploads']} uploads, {r['sessions']} sessions\n"
        f"event time {_iso(r['start_ms'])} -> {_iso(r['end_ms'])} ({r['event_time_span_ms'] / 3_600_000:.1f} h); "
        f"join lag: {'-' if r['join_lag'] is None else r['join_lag']}; errors:{errors}"
    )
