"""Proves every GPU path of gpurec in one run: `make gpu-check`.

    python3 bench/gpu_check.py [--out DIR]      # on a GPU node: about 3-5 minutes
    python3 bench/gpu_check.py --dry-run        # no GPU: TRITON_INTERPRET=1, tiny sizes (CI)

Needs only python3 with CUDA torch, Triton and numpy (a bare GPU machine: no fbgemm, torchrec,
polars or venv), run from the repository root. In order:

1. the kernels against their torch reference on the GPU (compiled, not interpreted), millions of
   ids, loads up to 0.95 (`bench/kernel_checks.py`);
2. the insert kernel under contention: many CTAs inserting at once, colliding in a tiny table,
   in batches, from two streams at once, repeated; every invariant checked after each;
3. benchmarks at HierarchicalKV's published setting (64M-key capacity, value dim 64, 1M keys per
   op, load 0.5 and 0.75): lookups/s, lookups + value gather/s, inserts/s, segmented lookups/s,
   with bytes/s against the device's memory bandwidth (its specification and a measured copy);
4. `compute-sanitizer` (memcheck, racecheck, synccheck) on a small run of every kernel;
5. parameter deltas applied in place on the GPU while requests score under the same lock
   (`bench/sync_checks.py`): no request sees half a delta, a corrupt one is refused;
6. an `ncu` profile of each kernel at benchmark size: DRAM throughput %, achieved and theoretical
   occupancy, registers; the report is kept.

Everything lands in one directory (``--out``, default ``$OUT`` or ``runs/gpu-check``):
``summary.json`` (device, versions, each check's pass/fail and facts, each figure), ``gpu_check.log``
(sanitizer and ncu output), ``cuckoo.ncu-rep`` and ``ncu_metrics.csv``. A short table is printed and
the last line is one JSON object. Exit 0 when every check passed, 1 otherwise, 2 on bad usage.

The dry run executes the same checks and benchmarks on CPU tensors under Triton's interpreter
(sizes in the thousands), so this script cannot rot between GPU sessions; it skips the sanitizer
and ncu and says so. Its timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_REGEX = "_lookup_kernel|_lookup_segmented_kernel|_insert_kernel"
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")
NCU_METRICS = {
    "gpu__time_duration.sum": "duration_ns",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "launch__registers_per_thread": "registers",
    "dram__bytes_read.sum": "dram_bytes_read",
    "dram__bytes_write.sum": "dram_bytes_written",
    "lts__t_sector_hit_rate.pct": "l2_hit_pct",
}
# Bytes one query moves, counted in 32-byte sectors where access is random: 2 buckets x 64 B of
# keys, one sector for the hit's int32 row, the 8 B query id and 8 B output streamed.
LOOKUP_BYTES = 2 * 64 + 32 + 8 + 8
SEGMENTED_EXTRA_BYTES = 8  # the per-query table index (per-table arrays stay in cache)


@dataclass(frozen=True)
class BenchSizes:
    capacity: int  # table slots (keys)
    batch: int  # keys per operation
    dim: int  # float32 values per key (the gathered/assigned embedding row)
    loads: tuple[float, ...]
    iters: int
    warmup: int
    tables: int  # of the segmented lookup


# HierarchicalKV's README benchmark (dim 64: 64M-key capacity, 1M keys per op, load 0.5/0.75/1.0).
GPU_BENCH = BenchSizes(
    capacity=1 << 26, batch=1 << 20, dim=64, loads=(0.5, 0.75), iters=10, warmup=3, tables=9
)
DRY_BENCH = BenchSizes(capacity=1 << 12, batch=1 << 9, dim=64, loads=(0.5, 0.75), iters=1, warmup=0, tables=3)
PROFILE_BENCH = BenchSizes(
    capacity=1 << 24, batch=1 << 20, dim=64, loads=(0.75,), iters=1, warmup=0, tables=9
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default $OUT or runs/gpu-check)"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["sanitizer", "ncu", "bench"], help="stages to skip"
    )
    # Internal: what compute-sanitizer and ncu run in a child process.
    parser.add_argument("--target", choices=["sanitize", "profile"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when kernels are decorated: before importing them
    elif os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        return fail_usage("TRITON_INTERPRET is set: unset it to run on the GPU, or pass --dry-run")
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        return fail_usage("no CUDA GPU visible (torch.cuda.is_available() is False); --dry-run runs on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.target == "sanitize":
        return sanitize_target(device)
    if args.target == "profile":
        return profile_target(device)

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    started = time.perf_counter()
    summary: dict = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "dry_run": args.dry_run}
    summary.update(environment(device))
    log.line(
        f"gpu_check on {summary['device_name']} (torch {summary['versions']['torch']}, "
        f"triton {summary['versions']['triton']}){' DRY RUN: interpreter on CPU' if args.dry_run else ''}"
    )

    import kernel_checks

    sizes = kernel_checks.DRY_SIZES if args.dry_run else kernel_checks.GPU_SIZES
    summary["checks"] = {}
    for name, check in kernel_checks.CHECKS.items():
        summary["checks"][name] = run_check(log, name, lambda check=check: check(device, sizes))
    import sync_checks  # parameter deltas applied in place on the device while requests run

    for name, check in sync_checks.CHECKS.items():
        summary["checks"][name] = run_check(log, name, lambda check=check: check(device))

    skipped = {}
    if "bench" in args.skip:
        skipped["bench"] = "--skip bench"
    else:
        bench_sizes = DRY_BENCH if args.dry_run else GPU_BENCH
        peak = summary.get("peak_bandwidth_bytes_per_s")
        summary["bench"] = run_check(log, "bench", lambda: bench(device, bench_sizes, peak))
    for stage, runner in (("sanitizer", run_sanitizers), ("ncu", run_ncu)):
        why = (
            ("dry run: no GPU" if args.dry_run else "--skip " + stage)
            if args.dry_run or stage in args.skip
            else None
        )
        why = why or missing_tool(stage)
        if why:
            skipped[stage] = why
            log.line(f"SKIP {stage}: {why}")
        else:
            summary[stage] = runner(args.out, log)
    summary["skipped"] = skipped
    summary["passed"] = all(part["passed"] for part in parts(summary))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary, log)
    print(json.dumps(headline(summary)))
    return 0 if summary["passed"] else 1


def fail_usage(message: str) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return 2


class Log:
    """Prints and appends to the log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def line(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as handle:
            handle.write(text + "\n")


def run_check(log: Log, name: str, fn: Callable[[], dict]) -> dict:
    """Run one check; an exception is a failed check with its message, never the end of the run."""
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as error:  # reported as a failed check: the run goes on
        result = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    failed = [k for k, ok in result.get("facts", {}).items() if not ok]
    status = "PASS" if result["passed"] else "FAIL"
    log.line(
        f"{status} {name} ({result['seconds']} s){': ' + ', '.join(failed) if failed else ''}"
        f"{': ' + result['error'] if 'error' in result else ''}"
    )
    return result


def parts(summary: dict) -> list[dict]:
    found = list(summary["checks"].values())
    found += [summary[k] for k in ("bench", "ncu") if k in summary]
    found += list(summary.get("sanitizer", {}).values())
    return found


# --- environment -------------------------------------------------------------------------------


def environment(device) -> dict:
    import numpy
    import torch
    import triton

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }
    info: dict = {"device": device.type, "versions": versions}
    if device.type != "cuda":
        info["device_name"] = f"CPU ({platform.machine()}), Triton interpreter"
        return info
    props = torch.cuda.get_device_properties(device)
    info["device_name"] = props.name
    info["capability"] = f"sm_{props.major}{props.minor}"
    info["sm_count"] = props.multi_processor_count
    info["memory_gib"] = round(props.total_memory / 2**30, 1)
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        versions["driver"] = out.stdout.strip() or None
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    # Double data rate: two transfers per memory clock over the bus.
    info["peak_bandwidth_bytes_per_s"] = (
        2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None
    )
    info["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device)
    return info


def copy_bandwidth(device) -> float:
    """Device-to-device copy of 1 GiB (read + write counted): what streaming code reaches."""
    import torch

    from kernels.bench_cuckoo import timed

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = [timed(lambda: dst.copy_(src), device) for _ in range(8)][2:]
    return 2 * src.numel() * 4 / (statistics.median(ms) / 1e3)


# --- benchmark ----------------------------------------------------------------------------------


def bench(device, sizes: BenchSizes, peak: float | None) -> dict:
    """Throughput of each kernel at HierarchicalKV's setting per load factor, and the bytes/s it
    moves against the memory's peak (``peak``: bytes/s, None when unknown)."""
    from cuckoo_hkv import bench_load

    from kernels.bench_cuckoo import timed

    results = {}
    for load in sizes.loads:
        figures = bench_load(device, sizes, load, timed)
        moved = {
            "lookup": LOOKUP_BYTES,
            "segmented_lookup": LOOKUP_BYTES + SEGMENTED_EXTRA_BYTES,
            "find_values": LOOKUP_BYTES + 2 * 4 * sizes.dim,  # the row read and written once more
        }
        for name, per_query in moved.items():
            rate = figures[f"{name}s_per_s" if name != "find_values" else "find_values_per_s"]
            figures[f"{name}_bytes_per_s"] = rate * per_query
            figures[f"{name}_fraction_of_peak"] = round(rate * per_query / peak, 3) if peak else None
        results[f"load_{load}"] = figures
    return {"passed": all(r["checked"] for r in results.values()), "sizes": sizes.__dict__, **results}


def sanitize_target(device) -> int:
    """Every kernel once at a small size (what compute-sanitizer watches)."""
    import kernel_checks

    sizes = kernel_checks.CheckSizes(
        hash_ids=4096,
        table_slots=1 << 14,
        stress_slots=1 << 14,
        hot_buckets=64,
        hot_rounds=1024,
        batch=1024,
        repeats=1,
        segmented_tables=3,
    )
    results = [check(device, sizes) for check in kernel_checks.CHECKS.values()]
    failed = [name for name, r in zip(kernel_checks.CHECKS, results, strict=True) if not r["passed"]]
    print(f"sanitize target: {len(results) - len(failed)}/{len(results)} checks passed {failed}")
    return 1 if failed else 0


def profile_target(device) -> int:
    """The benchmark's launches once at a profiling size (ncu replays each kernel many times)."""
    from cuckoo_hkv import bench_load

    from kernels.bench_cuckoo import timed

    figures = bench_load(device, PROFILE_BENCH, PROFILE_BENCH.loads[0], timed, profile=True)
    return 0 if figures["checked"] else 1


TOOLS = {"sanitizer": "compute-sanitizer", "ncu": "ncu"}


def find_tool(name: str) -> str | None:
    """A CUDA tool on PATH, or where the CUDA toolkit installs it."""
    found = shutil.which(name)
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if found or not base:
            continue
        for candidate in (Path(base) / "bin" / name, Path(base) / "compute-sanitizer" / name):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found = str(candidate)
                break
    return found


def missing_tool(stage: str) -> str | None:
    tool = TOOLS[stage]
    return None if find_tool(tool) else f"{tool} not on PATH, CUDA_HOME or /usr/local/cuda"


def _child(args: list[str], log: Log, timeout: int) -> tuple[int, str]:
    """Run a child process, log its output; (returncode, output). 124 on timeout."""
    log.line(f"$ {' '.join(args)}")
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as error:
        rc, out = 124, f"{error.stdout or ''}{error.stderr or ''}\n(timed out after {timeout} s)"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    with log.path.open("a") as handle:
        handle.write(out + "\n")
    return rc, out


def run_sanitizers(out_dir: Path, log: Log) -> dict:
    results = {}
    script = [sys.executable, str(Path(__file__).resolve()), "--target", "sanitize"]
    for tool in SANITIZER_TOOLS:
        extra = ["--racecheck-report", "all"] if tool == "racecheck" else []
        start = time.perf_counter()
        rc, out = _child(
            [find_tool("compute-sanitizer"), "--tool", tool, *extra, "--error-exitcode", "99", *script],
            log,
            150,
        )
        found = re.findall(r"ERROR SUMMARY: (\d+) error", out)
        errors = int(found[-1]) if found else None
        results[tool] = {
            "passed": rc == 0 and errors == 0,
            "errors": errors,
            "returncode": rc,
            "seconds": round(time.perf_counter() - start, 1),
            "tail": out.strip().splitlines()[-6:],
        }
        log.line(
            f"{'PASS' if results[tool]['passed'] else 'FAIL'} compute-sanitizer {tool}: "
            f"{errors} errors (rc {rc})"
        )
    return results


def run_ncu(out_dir: Path, log: Log) -> dict:
    """Profile the benchmark's lookup, segmented lookup and insert launches (the table fills before
    them are skipped: one insert launch for the table, one per segmented table)."""
    report = out_dir / "cuckoo"
    script = [sys.executable, str(Path(__file__).resolve()), "--target", "profile"]
    skip = 1 + PROFILE_BENCH.tables
    options = f"--set full -k regex:{KERNEL_REGEX} --launch-skip {skip} --launch-count 3 --force-overwrite"
    rc, out = _child([find_tool("ncu"), *options.split(), "--export", str(report), *script], log, 240)
    if rc != 0 or not report.with_suffix(".ncu-rep").exists():
        log.line(f"FAIL ncu (rc {rc})")
        return {"passed": False, "returncode": rc, "tail": out.strip().splitlines()[-8:]}
    imported = ["--import", str(report.with_suffix(".ncu-rep")), "--csv", "--page", "raw"]
    rc, raw = _child([find_tool("ncu"), *imported, "--metrics", ",".join(NCU_METRICS)], log, 120)
    (out_dir / "ncu_metrics.csv").write_text(raw)
    kernels = parse_ncu_csv(raw)
    log.line(f"{'PASS' if kernels else 'FAIL'} ncu: {len(kernels)} kernels profiled")
    return {"passed": bool(kernels), "kernels": kernels, "report": "cuckoo.ncu-rep"}


def parse_ncu_csv(text: str) -> dict[str, dict[str, float]]:
    """Kernel name -> the metrics of `NCU_METRICS` from ``ncu --import ... --csv --page raw``."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if len(rows) < 3:
        return {}
    header, data = rows[0], rows[2:]  # rows[1]: units
    kernels = {}
    for row in data:
        record = dict(zip(header, row, strict=False))
        name = record.get("Kernel Name", "?")
        metrics = {}
        for metric, label in NCU_METRICS.items():
            try:
                metrics[label] = float(record[metric].replace(",", ""))
            except (KeyError, ValueError):
                continue
        kernels[name] = metrics
    return kernels


# --- report -------------------------------------------------------------------------------------


def headline(summary: dict) -> dict:
    """The figures people quote, for the last line."""
    line = {
        "gpu_check": "passed" if summary["passed"] else "FAILED",
        "device": summary["device_name"],
        "triton": summary["versions"]["triton"],
        "dry_run": summary["dry_run"],
    }
    for key, figures in summary.get("bench", {}).items():
        if key.startswith("load_"):
            for name in ("lookups_per_s", "inserts_per_s", "segmented_lookups_per_s", "find_values_per_s"):
                line[f"{name}@{key[5:]}"] = round(figures[name], -3)
            if figures.get("lookup_fraction_of_peak") is not None:
                line[f"lookup_fraction_of_peak@{key[5:]}"] = figures["lookup_fraction_of_peak"]
    line["failed"] = [name for name, r in summary["checks"].items() if not r["passed"]]
    line["seconds"] = summary["seconds"]
    return line


def print_table(summary: dict, log: Log) -> None:
    log.line("")
    log.line(f"{'check':<34} result")
    for name, result in summary["checks"].items():
        log.line(f"{name:<34} {'pass' if result['passed'] else 'FAIL'}")
    for tool, result in summary.get("sanitizer", {}).items():
        log.line(
            f"{'compute-sanitizer ' + tool:<34} {'pass' if result['passed'] else 'FAIL'} "
            f"({result['errors']} errors)"
        )
    for stage, why in summary["skipped"].items():
        log.line(f"{stage:<34} skipped: {why}")
    for key, figures in summary.get("bench", {}).items():
        if not key.startswith("load_"):
            continue
        log.line(
            f"load {key[5:]}: lookups {figures['lookups_per_s']:.3g}/s, with dim-{figures['dim']} values "
            f"{figures['find_values_per_s']:.3g}/s, segmented {figures['segmented_lookups_per_s']:.3g}/s, "
            f"inserts {figures['inserts_per_s']:.3g}/s; lookup {figures['lookup_bytes_per_s'] / 1e9:.0f} GB/s"
            + (
                f" ({figures['lookup_fraction_of_peak']:.0%} of peak)"
                if figures.get("lookup_fraction_of_peak")
                else ""
            )
        )
    for name, metrics in summary.get("ncu", {}).get("kernels", {}).items():
        log.line(f"ncu {name}: " + ", ".join(f"{k}={v:g}" for k, v in metrics.items()))


if __name__ == "__main__":
    sys.exit(main())
