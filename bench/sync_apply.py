"""What applying parameter deltas in place costs the serving path: ranking latency with and without.

In one process, the served TorchScript ranker of a trained run (default `runs/demo/train`, from
`make demo`) scores batches of ``--candidates`` rows from ``--threads`` threads, each call under
the lock a Triton `execute` holds, exactly like `triton_models/ranker/model.py`. Two paths
alternate over ``--rounds`` rounds of ``--seconds`` each:

- quiet (the baseline): no deltas;
- syncing: a `DeltaApplier` thread (the code the Triton model runs) applies a ``--rows``-row delta
  of the item table plus its id-map slots every ``--every-ms`` (written beforehand, so the cost
  measured is reading, checking and applying it under the lock).

The last stdout line is one JSON object with p50/p99 of both, the p50 difference (the target: a
10k-row delta costs <= 1 ms of p50) and the time one apply takes.

    .venv/bin/python bench/sync_apply.py                      # about 1 minute
    .venv/bin/python bench/sync_apply.py --run runs/demo/train --rows 20000 --every-ms 100
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "demo" / "train")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--every-ms", type=float, default=100.0)
    parser.add_argument("--candidates", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if not (args.run / "checkpoints").is_dir():
        print(f"bench/sync_apply.py: no trained run at {args.run}: run `make demo` first", file=sys.stderr)
        return 2
    torch.set_num_threads(1)

    from gpurec.model.trained import load_trained_model
    from gpurec.serve.artifact import build_serving_ranker
    from gpurec.serve.export import contract_for
    from gpurec.sync.deltafile import DeltaApplier, delta_name, write_delta
    from gpurec.sync.publish import REMAP_PREFIX, table_name

    model, lookup, run = load_trained_model(args.run)
    contract = contract_for(model, run, 1024)
    module = build_serving_ranker(model, lookup, contract)
    rng = np.random.default_rng(0)
    n = args.candidates
    dense = torch.from_numpy(rng.normal(size=(n, run.num_dense)).astype(np.float32))
    single = torch.from_numpy(rng.integers(0, 2**40, size=(n, len(contract.sparse_features)), dtype=np.int64))
    multi = [torch.from_numpy(rng.integers(0, 2**40, size=(n, 3), dtype=np.int64)) for _ in contract.multi_valued_features]
    state = module.state_dict()
    table = table_name("item_id")
    rows = min(args.rows, state[table].shape[0])
    lock = threading.Lock()

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        slots = state[REMAP_PREFIX + "keys"].numel() if REMAP_PREFIX + "keys" in state else 0
        write_delta(directory, 0, "snapshot", [(table, None, state[table].clone())])
        deltas = []  # prepared once; moved into the directory one by one while syncing
        for seq in range(1, 4):
            index = torch.from_numpy(rng.choice(state[table].shape[0], rows, replace=False)).sort().values
            entries = [(table, index, state[table][index] + 1e-4)]
            if slots:
                changed = torch.from_numpy(rng.choice(slots, max(1, rows // 10), replace=False))
                entries.append((REMAP_PREFIX + "keys", changed, state[REMAP_PREFIX + "keys"][changed]))
            deltas.append(write_delta(directory / "staged", seq, "rows", entries))
        applier = DeltaApplier(module, directory, lock)
        applier.poll()

        def score_loop(stop: threading.Event, latencies: list[float]) -> None:
            while not stop.is_set():
                start = time.perf_counter()
                with lock, torch.inference_mode():
                    out = module(dense, single, multi)
                    out["score"].numpy().copy()
                latencies.append((time.perf_counter() - start) * 1e3)

        def measure(syncing: bool) -> tuple[list[float], list[float]]:
            stop, latencies, apply_ms = threading.Event(), [], []
            threads = [threading.Thread(target=score_loop, args=(stop, latencies)) for _ in range(args.threads)]
            for t in threads:
                t.start()
            end = time.monotonic() + args.seconds
            seq = applier.version
            while time.monotonic() < end:
                if syncing:
                    seq += 1
                    staged = deltas[seq % len(deltas)]
                    (directory / delta_name(seq, "rows")).write_bytes(staged.read_bytes().replace(
                        f'"seq": {int(staged.name[:9])}'.encode(), f'"seq": {seq}'.encode(), 1))
                    start = time.perf_counter()
                    applier.poll()
                    apply_ms.append((time.perf_counter() - start) * 1e3)
                time.sleep(args.every_ms / 1e3)
            stop.set()
            for t in threads:
                t.join()
            return latencies, apply_ms

        quiet, syncing, applies = [], [], []
        for _ in range(args.rounds):
            quiet.extend(measure(False)[0])
            lat, ap = measure(True)
            syncing.extend(lat)
            applies.extend(ap)
        assert applier.refused == 0, "a prepared delta was refused"

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 3)

    result = {
        "bench": "sync_apply",
        "rows_per_delta": rows,
        "every_ms": args.every_ms,
        "candidates": n,
        "threads": args.threads,
        "deltas_applied": len(applies),
        "apply_ms_p50": pct(applies, 50),
        "apply_ms_p99": pct(applies, 99),
        "p50_ms": pct(syncing, 50),
        "p99_ms": pct(syncing, 99),
        "baseline": "the same scoring without deltas, alternated in the same run",
        "baseline_p50_ms": pct(quiet, 50),
        "baseline_p99_ms": pct(quiet, 99),
        "p50_cost_ms": round(pct(syncing, 50) - pct(quiet, 50), 3),
        "ratio_p50": round(statistics.median(syncing) / statistics.median(quiet), 3),
        "target_met": pct(syncing, 50) - pct(quiet, 50) <= 1.0,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    print(
        f"{rows:,}-row delta every {args.every_ms:.0f} ms: scoring p50 {result['p50_ms']} ms (quiet {result['baseline_p50_ms']}), "
        f"p99 {result['p99_ms']} (quiet {result['baseline_p99_ms']}); one apply p50 {result['apply_ms_p50']} ms"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
