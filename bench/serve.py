"""Serving latency: `rank(user, 500 candidates)` through Triton (HTTP, gRPC) against the same model in-process.

In one run: trains a tiny ranker on a small generated world (or takes ``--checkpoint RUN``),
exports it (dynamic batching on), starts Triton on free 127.0.0.1 ports with
`gpurec.serve.server.TritonServer`, and times, for 1 and ``--concurrency`` concurrent callers:

- in-process: the exported TorchScript artifact (`torch.jit.load(model.pt)`, what the ranker's
  python backend runs) called from this process, numpy in, numpy out;
- http / grpc: `gpurec.client.RankerClient.rank` against the server (one client per long-lived caller
  thread, so the concurrent callers' requests can meet in the ranker's dynamic batcher).

The same 500-candidate request is used throughout. The paths alternate over ``--rounds`` rounds;
p50/p99 are over every timed call of a path, throughput (requests/s) is the median round's. The
last stdout line is one JSON object with the figures, ``ratio`` = Triton p50 / in-process p50 at
concurrency 1 and ``added_ms`` = the difference, per protocol.

    .venv/bin/python bench/serve.py                      # about a minute on 2 cores
    .venv/bin/python bench/serve.py --checkpoint runs/demo/train --requests 200

perf_analyzer (Triton's own load generator; not on PyPI as a working package): the
`tritonclient==2.51.0` wheel carries `tritonclient-2.51.0.data/data/bin/perf_analyzer`, which
needs `libb64.so.0d` and `libcudart.so.12` from the `nvidia_pytriton.libs` directory of the
nvidia-pytriton wheel. With a server running (`gpurec serve --repo REPO --http-port 8000
--grpc-port 8001`):

    pip download --no-deps tritonclient==2.51.0 -d /tmp/pa && cd /tmp/pa && unzip -q tritonclient-2.51.0-*.whl
    mkdir -p /tmp/pa/lib && for l in libb64.so.0d libcudart.so.12; do
        ln -sf $(ls $VENV/lib/python3.11/site-packages/nvidia_pytriton.libs/$l* | head -1) /tmp/pa/lib/$l; done
    LD_LIBRARY_PATH=/tmp/pa/lib /tmp/pa/tritonclient-2.51.0.data/data/bin/perf_analyzer \\
        -m ranker -u 127.0.0.1:8001 -i grpc -b 500 --shape hashtags:4 \\
        --concurrency-range 1:8:7 --stability-percentage 25

(``-b 500``: 500 rows per request = 500 candidates; ``--shape`` fixes the one variable dim.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpurec.client import RankerClient, load_contract
from gpurec.serve.artifact import to_tensors
from gpurec.serve.contract import ServingContract
from gpurec.serve.export import export_repository, sample_rows
from gpurec.serve.model_config import BatchingConfig
from gpurec.serve.server import TritonServer


def train_tiny(root: Path) -> Path:
    """A small world, its features and a 30-step ranker with the default config (about 20 s)."""
    from gpurec.data.generate import generate_synthetic
    from gpurec.data.world import WorldConfig
    from gpurec.preprocess.run import preprocess
    from gpurec.train.config import load_configs
    from gpurec.train.recipe import train

    generate_synthetic(WorldConfig(users=400, items=800, days=4, seed=3), root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    model_config, train_config = load_configs(None, max_steps=30)
    train(root / "features", root / "run", model_config, train_config, progress=False)
    return root / "run"


class Callers:
    """`size` long-lived caller threads. A sync tritonclient HTTP client (gevent) works only on the
    thread that made it, so each thread owns its clients, made on first use and closed on its thread."""

    def __init__(self, size: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=size)
        self.size = size
        self.local = threading.local()

    def own(self, key: str, make: Callable[[], Any]) -> Any:
        objects = self.local.__dict__.setdefault("objects", {})
        if key not in objects:
            objects[key] = make()
        return objects[key]

    def run(self, call: Callable[[], None], callers: int, requests: int) -> tuple[list[float], float]:
        """`requests` calls spread over `callers` threads; (per-call latencies in s, requests/s)."""
        per_caller = max(1, requests // callers)
        barrier = threading.Barrier(callers)

        def loop() -> list[float]:
            barrier.wait()  # every caller on its own thread before the clock matters
            latencies = []
            for _ in range(per_caller):
                start = time.perf_counter()
                call()
                latencies.append(time.perf_counter() - start)
            return latencies

        started = time.perf_counter()
        futures = [self.pool.submit(loop) for _ in range(callers)]
        latencies = [x for f in futures for x in f.result()]
        return latencies, per_caller * callers / (time.perf_counter() - started)

    def close(self) -> None:
        barrier = threading.Barrier(self.size)

        def close_mine() -> None:
            barrier.wait(timeout=30)
            for obj in self.local.__dict__.get("objects", {}).values():
                obj.close()

        for f in [self.pool.submit(close_mine) for _ in range(self.size)]:
            f.result()
        self.pool.shutdown()


def in_process_caller(scripted: torch.jit.ScriptModule, contract: ServingContract, rows: dict) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            out = scripted(*to_tensors(rows, contract))
        {k: v.numpy() for k, v in out.items()}

    return call


def client_caller(callers: Callers, url: str, protocol: str, contract: ServingContract, rows: dict) -> Callable[[], None]:
    """Each caller thread ranks through its own RankerClient, kept open across rounds."""

    def call() -> None:
        client = callers.own(protocol, lambda: RankerClient(url, contract, protocol=protocol, retries=0))
        client.rank(None, rows)

    return call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained run to export (default: train a tiny one)")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--requests", type=int, default=120, help="timed requests per path, concurrency level and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-queue-delay-us", type=int, default=1000, help="dynamic batching window of the exported ranker")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gpurec-bench-serve-") as tmp:
        root = Path(tmp)
        run = args.checkpoint or train_tiny(root)
        export_repository(run, root / "repo", max_batch_size=max(1024, args.candidates), batching=BatchingConfig(max_queue_delay_us=args.max_queue_delay_us))
        contract = load_contract(root / "repo")
        rows = sample_rows(contract, rows=args.candidates, seed=0)
        scripted = torch.jit.load(str(root / "repo" / "ranker" / "1" / "model.pt"))
        timings: dict[str, dict[int, list[list[float]]]] = {}
        throughputs: dict[str, dict[int, list[float]]] = {}
        with TritonServer(root / "repo") as server:
            callers = Callers(args.concurrency)
            try:
                paths = {
                    "in_process": in_process_caller(scripted, contract, rows),
                    "http": client_caller(callers, server.http_url, "http", contract, rows),
                    "grpc": client_caller(callers, server.grpc_url, "grpc", contract, rows),
                }
                levels = (1, args.concurrency)
                for call in paths.values():  # warm up every path and connection
                    callers.run(call, args.concurrency, args.warmup * args.concurrency)
                for _ in range(args.rounds):
                    for name, call in paths.items():
                        for level in levels:
                            lat, rps = callers.run(call, level, args.requests)
                            timings.setdefault(name, {}).setdefault(level, []).append(lat)
                            throughputs.setdefault(name, {}).setdefault(level, []).append(rps)
            finally:  # open keep-alive connections would hold the server's shutdown
                callers.close()

    figures: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_level in timings.items():
        for level, rounds in by_level.items():
            lat = np.array([x for r in rounds for x in r]) * 1e3
            figures.setdefault(name, {})[f"c{level}"] = {
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "rps": round(statistics.median(throughputs[name][level]), 1),
            }
    base = figures["in_process"]["c1"]["p50_ms"]
    result = {
        "bench": "serve",
        "candidates": args.candidates,
        "concurrency": args.concurrency,
        "max_queue_delay_us": args.max_queue_delay_us,
        "figures": figures,
        "ratio": {p: round(figures[p]["c1"]["p50_ms"] / base, 2) for p in ("http", "grpc")},
        "added_ms": {p: round(figures[p]["c1"]["p50_ms"] - base, 3) for p in ("http", "grpc")},
        "batching_speedup": {
            p: round(figures[p][f"c{args.concurrency}"]["rps"] / figures[p]["c1"]["rps"], 2) for p in ("in_process", "http", "grpc")
        },
    }
    for name, fig in figures.items():
        print(f"{name:>10}: " + "  ".join(f"{lvl}: p50 {f['p50_ms']:.2f} ms p99 {f['p99_ms']:.2f} ms {f['rps']:.0f} req/s" for lvl, f in fig.items()), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
