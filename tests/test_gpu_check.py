"""`make gpu-check` (bench/gpu_check.py): its CPU dry run, and that its checks can fail.

On a GPU node the same script runs the compiled kernels at millions of ids, compute-sanitizer and
ncu; here the dry run runs every check and benchmark under Triton's interpreter with tiny sizes so
the kit cannot rot between GPU sessions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    return env | extra


def test_dry_run_passes_and_reports_every_part(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert headline["gpu_check"] == "passed" and headline["dry_run"] is True and headline["failed"] == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["versions"]["triton"] and summary["versions"]["torch"]
    assert set(summary["checks"]) == {"hash", "lookup", "insert", "segmented_lookup", "insert_stress", "delta_apply"}
    for name, check in summary["checks"].items():
        assert check["passed"] and check["facts"] and all(check["facts"].values()), name
    stress = summary["checks"]["insert_stress"]
    assert stress["repeats"] >= 2 and stress["homeless_hot"] > 0  # the overfull table really overflowed
    assert stress["facts"]["hot_buckets_nothing_lost"] and stress["facts"]["batches_locks_released"]
    for load in ("0.5", "0.75"):
        figures = summary["bench"][f"load_{load}"]
        assert figures["checked"] and figures["dim"] == 64
        assert figures["lookups_per_s"] > 0 and figures["inserts_per_s"] > 0
        assert figures["segmented_lookups_per_s"] > 0 and figures["find_values_per_s"] > 0
    # the parts that need a GPU are skipped, and it says so
    assert summary["skipped"]["sanitizer"].startswith("dry run")
    assert summary["skipped"]["ncu"].startswith("dry run")
    assert "sanitizer" in proc.stdout and "skipped" in proc.stdout
    assert (tmp_path / "gpu_check.log").read_text().count("PASS") >= 6


def test_refuses_without_a_gpu_unless_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():  # pragma: no cover - GPU nodes run the real thing
        pytest.skip("a GPU is present: make gpu-check runs for real")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); --dry-run runs on CPU"
    ]


FACTS_PROBE = """
import sys, torch
sys.path[:0] = [{root!r}, {bench!r}]
import kernel_checks as kcheck
from kernels import cuckoo as kc
from kernels.cuckoo_layout import EMPTY_KEY, SLOTS, bucket_pair, empty_storage

def fresh():
    table = empty_storage(64, "cpu")
    ids = kcheck.distinct_ids(400, 5, torch.device("cpu"))
    rows = torch.arange(400, dtype=torch.int32)
    h_ids, h_rows = kc.cuckoo_insert(table, ids, rows)
    return table, ids, rows, h_ids, h_rows

def failed(table, ids, rows, h_ids, h_rows, locks=None):
    return sorted(k for k, ok in kcheck.table_facts(table, ids, rows, h_ids, h_rows, locks).items() if not ok)

table, ids, rows, h_ids, h_rows = fresh()
print("clean", failed(table, ids, rows, h_ids, h_rows, torch.zeros(64, dtype=torch.int32)))
used = torch.nonzero(table.keys != EMPTY_KEY).squeeze(1)
free = torch.nonzero(table.keys == EMPTY_KEY).squeeze(1)
# lost: a stored pair vanishes
t = fresh(); t[0].keys[used[0]] = EMPTY_KEY; t[0].slot_rows[used[0]] = -1
print("lost", failed(*t))
# duplicated: a stored pair copied into a free slot of its other bucket
t = fresh(); key = int(t[0].keys[used[3]])
first, second = (int(b) for b in bucket_pair(torch.tensor([key]), 64))
home = int(used[3]) // SLOTS
other = second if home == first else first
slot = next(s for s in range(other * SLOTS, other * SLOTS + SLOTS) if int(t[0].keys[s]) == EMPTY_KEY)
t[0].keys[slot] = key; t[0].slot_rows[slot] = t[0].slot_rows[used[3]]
print("duplicated", failed(*t))
# row changed
t = fresh(); t[0].slot_rows[used[5]] = 10_000
print("row_changed", failed(*t))
# a lock left taken
t = fresh(); locks = torch.zeros(64, dtype=torch.int32); locks[7] = 1
print("lock", failed(*t, locks))
"""


def test_invariant_checks_catch_broken_tables(tmp_path):
    """The facts that gpu-check asserts on a GPU fail when a table is corrupted in each way the
    insert kernel could break it (so a pass there means something)."""
    script = FACTS_PROBE.format(root=str(ROOT), bench=str(ROOT / "bench"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(TRITON_INTERPRET="1"),
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.strip().splitlines()}
    assert result["clean"] == "[]"
    assert "'nothing_lost'" in result["lost"]
    assert "'no_id_twice'" in result["duplicated"] and "'nothing_lost'" in result["duplicated"]
    assert "'stored_pairs_as_given'" in result["row_changed"]
    assert result["lock"] == "['locks_released']"


def test_ncu_csv_is_parsed_per_kernel():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import parse_ncu_csv
    finally:
        sys.path.remove(str(ROOT / "bench"))
    text = "\n".join(
        [
            "==PROF== Connected to process 1",
            '"ID","Kernel Name","gpu__time_duration.sum",'
            '"dram__throughput.avg.pct_of_peak_sustained_elapsed",'
            '"launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active"',
            '"","","nsecond","%","register/thread","%"',
            '"0","_lookup_kernel","1,234","81.5","58","70.2"',
            '"1","_insert_kernel","9,876","40.1","72","35.0"',
        ]
    )
    kernels = parse_ncu_csv(text)
    assert kernels["_lookup_kernel"] == {
        "duration_ns": 1234.0,
        "dram_throughput_pct": 81.5,
        "registers": 58.0,
        "achieved_occupancy_pct": 70.2,
    }
    assert kernels["_insert_kernel"]["registers"] == 72.0
    assert parse_ncu_csv("==ERROR== no kernels were profiled") == {}


def test_delta_apply_check_catches_a_delta_applied_without_the_request_lock(monkeypatch):
    """The GPU kit's delta check fails when deltas are written outside the lock requests hold."""
    import threading

    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sync_checks
    finally:
        sys.path.remove(str(ROOT / "bench"))
    unlocked = sync_checks.DeltaApplier

    class OwnLock(unlocked):
        def __init__(self, module, directory, lock=None):
            super().__init__(module, directory, threading.Lock())  # not the lock requests take

    assert sync_checks.check_delta_apply(torch.device("cpu"))["passed"]
    monkeypatch.setattr(sync_checks, "DeltaApplier", OwnLock)
    facts = sync_checks.check_delta_apply(torch.device("cpu"))["facts"]
    assert not facts["no_half_applied_delta_seen"] and facts["final_tensors_equal_last_deltas"]
