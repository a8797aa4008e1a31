"""Parameter deltas applied in place on the device, while requests run: part of `make gpu-check`.

`check_delta_apply` builds a served-model stand-in on the device (an embedding table and a linear
layer, as named tensors of a module), writes a snapshot and a run of row deltas with
`gpurec/sync/deltafile.py` (stdlib + torch: runs on a bare GPU machine), and applies them with
`DeltaApplier` while two request threads score under the same lock, as
`triton_models/ranker/model.py` does. Every delta sets its rows, which always include 256 probe
rows, to one value (its seq), so a request that read a half-applied delta would see two values
among the probe rows. Checked: no request saw a mix, the final tensors equal the last delta's values, the version
is the last seq, and a corrupt delta is refused with the tensors unchanged. On CPU (the dry run)
the same check runs with smaller sizes.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import torch

from gpurec.sync.deltafile import DeltaApplier, write_delta


def check_delta_apply(device: torch.device, rows: int = 200_000, dim: int = 64, deltas: int = 40, touched: int = 10_000) -> dict:
    if device.type == "cpu":
        rows, deltas, touched = 20_000, 20, 2_000
    module = torch.nn.Module()
    module.register_buffer("table", torch.zeros(rows, dim, device=device))
    module.register_buffer("dense", torch.zeros(dim, 1, device=device))
    lock = threading.Lock()
    generator = torch.Generator().manual_seed(0)
    # Every delta writes the same 256 probe rows spread over the table (plus others): a request that
    # finds two values among them saw part of a delta.
    probe_cpu = torch.linspace(0, rows - 1, 256).long()
    index_sets = [
        torch.cat([probe_cpu, torch.randperm(rows, generator=generator)[:touched]]).unique() for _ in range(deltas)
    ]
    probe = probe_cpu.to(device)
    mixed, requests = [], [0]
    stop = threading.Event()

    def request_loop() -> None:
        while not stop.is_set():
            with lock, torch.no_grad():
                values = module.table[probe] @ torch.ones(dim, 1, device=device) / dim
                seen = values.flatten().cpu()
            requests[0] += 1
            if not bool((seen == seen[0]).all()):  # every delta writes all probe rows at once
                mixed.append(seen)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        write_delta(directory, 0, "snapshot", [("table", None, torch.zeros(rows, dim)), ("dense", None, torch.zeros(dim, 1))])
        applier = DeltaApplier(module, directory, lock)
        applier.poll()
        threads = [threading.Thread(target=request_loop) for _ in range(2)]
        for thread in threads:
            thread.start()
        expected = torch.zeros(rows, dim)
        for seq in range(1, deltas + 1):
            index = index_sets[seq - 1]
            values = torch.full((index.numel(), dim), float(seq))
            expected[index] = values
            write_delta(directory, seq, "rows", [("table", index, values)])
            applier.poll()
        stop.set()
        for thread in threads:
            thread.join()
        final_ok = torch.equal(module.table.cpu(), expected)
        # A corrupt delta (one flipped payload byte) is refused and changes nothing.
        path = write_delta(directory, deltas + 1, "rows", [("table", index_sets[0], torch.full((index_sets[0].numel(), dim), -1.0))])
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
        applier.poll()
        refused_ok = applier.version == deltas and torch.equal(module.table.cpu(), expected) and applier.refused >= 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    facts = {
        "no_half_applied_delta_seen": not mixed,
        "final_tensors_equal_last_deltas": final_ok,
        "version_is_last_seq": applier.version == deltas,
        "corrupt_delta_refused": refused_ok,
        "requests_ran_during_apply": requests[0] > 0,
    }
    return {"passed": all(facts.values()), "facts": facts, "deltas": deltas, "rows_per_delta": touched, "requests": requests[0]}


CHECKS = {"delta_apply": check_delta_apply}
