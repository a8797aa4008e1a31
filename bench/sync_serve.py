"""Parameter sync under load through a real tritonserver: failed requests and latency while deltas land.

The `make demo` run (``--run``) is exported to a temporary model repository and served by one
tritonserver whose ranker follows a sync directory (`GPUREC_SYNC_DIR`). ``--concurrency`` client
threads (HTTP) send ranking requests of ``--candidates`` rows back to back. Two phases alternate
over ``--rounds`` rounds of ``--seconds``:

- quiet (the baseline): no deltas;
- syncing: every ``--every-ms`` a delta lands: all dense weights (the ``dense`` kind) alternating
  with ``--rows`` rows of the item table (``rows``), each written atomically as the trainer does.

Counted: requests that failed (any error), p50/p99 latency of each phase, deltas the server applied
(its `gpurec_ranker_sync_version`). The target: zero failed requests while dense weights change.
The last stdout line is one JSON object.

    .venv/bin/python bench/sync_serve.py                      # after make demo; about 1.5 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "train")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--every-ms", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if not (args.run / "checkpoints").is_dir():
        print(f"bench/sync_serve.py: no trained run at {args.run}: run `make demo` first", file=sys.stderr)
        return 2

    import tritonclient.http as httpclient

    from gpurec.model.library_warnings import quiet_library_warnings
    from gpurec.serve.export import export_repository
    from gpurec.serve.server import TritonServer
    from gpurec.sync.deltafile import write_delta
    from gpurec.sync.freshness import served_version
    from gpurec.sync.publish import MODEL_PREFIX, table_name

    quiet_library_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result = export_repository(args.run, tmp / "repo")
        contract = result.contract
        import fbgemm_gpu  # noqa: F401  (the scripted ranker's operators)

        module = torch.jit.load(str(tmp / "repo" / "ranker" / str(result.version) / "model.pt"))
        state = {k: v.clone() for k, v in module.state_dict().items()}
        dense_names = [k for k in state if k.startswith(MODEL_PREFIX) and ".embedding_bags." not in k and "_tensor_constant" not in k]
        table = table_name("item_id")
        sync_dir = tmp / "sync"
        write_delta(sync_dir, 0, "snapshot", [(n, None, state[n]) for n in dense_names])
        rng = np.random.default_rng(0)
        n = args.candidates
        arrays = {"dense": rng.normal(size=(n, len(contract.dense_features))).astype(np.float32)}
        arrays.update({f: rng.integers(0, 2**40, size=(n, 1), dtype=np.int64) for f in contract.sparse_features})
        arrays.update({f: rng.integers(0, 2**40, size=(n, 3), dtype=np.int64) for f in contract.multi_valued_features})

        server = TritonServer(tmp / "repo", env={"GPUREC_SYNC_DIR": str(sync_dir)})
        server.start()
        try:
            latencies: dict[str, list[float]] = {"quiet": [], "syncing": []}
            failures: dict[str, int] = {"quiet": 0, "syncing": 0}
            phase = ["quiet"]
            stop = threading.Event()

            def client_loop() -> None:
                client = httpclient.InferenceServerClient(server.http_url)
                inputs = []
                for name, array in arrays.items():
                    tensor = httpclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
                    tensor.set_data_from_numpy(array)
                    inputs.append(tensor)
                try:
                    while not stop.is_set():
                        current, start = phase[0], time.perf_counter()
                        try:
                            answer = client.infer("ranker", inputs)
                            if not np.isfinite(answer.as_numpy("score")).all():
                                raise ValueError("non-finite score")
                            latencies[current].append((time.perf_counter() - start) * 1e3)
                        except Exception:  # counted: the target is none
                            failures[current] += 1
                finally:
                    client.close()

            threads = [threading.Thread(target=client_loop) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            seq = 0
            for _ in range(args.rounds):
                phase[0] = "quiet"
                time.sleep(args.seconds)
                phase[0] = "syncing"
                end = time.monotonic() + args.seconds
                while time.monotonic() < end:
                    seq += 1
                    if seq % 2:
                        scale = 1.0 + 1e-3 * (seq % 7)
                        write_delta(sync_dir, seq, "dense", [(name, None, state[name] * scale) for name in dense_names])
                    else:
                        index = torch.from_numpy(rng.choice(state[table].shape[0], args.rows, replace=False)).sort().values
                        write_delta(sync_dir, seq, "rows", [(table, index, state[table][index] * (1.0 + 1e-3 * (seq % 5)))])
                    time.sleep(args.every_ms / 1e3)
            stop.set()
            for thread in threads:
                thread.join()
            time.sleep(0.5)
            applied = served_version(urllib.request.urlopen(server.metrics_url, timeout=5).read().decode())
        finally:
            server.stop()

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)), 2) if values else None

    out = {
        "bench": "sync_serve",
        "concurrency": args.concurrency,
        "candidates": n,
        "deltas_written": seq,
        "deltas_applied": applied,
        "failed_syncing": failures["syncing"],
        "failed_quiet": failures["quiet"],
        "requests_syncing": len(latencies["syncing"]),
        "p50_ms": pct(latencies["syncing"], 50),
        "p99_ms": pct(latencies["syncing"], 99),
        "baseline": "the same load with no deltas, alternated in the same run",
        "baseline_p50_ms": pct(latencies["quiet"], 50),
        "baseline_p99_ms": pct(latencies["quiet"], 99),
        "ratio_p50": round(pct(latencies["syncing"], 50) / pct(latencies["quiet"], 50), 3),
        "target_met": failures["syncing"] == 0 and applied == seq,
    }
    print(
        f"{seq} deltas (dense weights / {args.rows:,} rows, every {args.every_ms:.0f} ms) under {args.concurrency} clients: "
        f"{failures['syncing']} failed, p50 {out['p50_ms']} ms p99 {out['p99_ms']} ms (quiet {out['baseline_p50_ms']} / "
        f"{out['baseline_p99_ms']}); server at version {applied}"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
