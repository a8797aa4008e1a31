"""Storage faults, injected for real: torn writes after kill -9, truncated and altered files, a full disk.

- The event log (SQLite in WAL mode): a writer killed with kill -9 mid-stream, then the WAL's last
  frame torn (cut in half, or overwritten with garbage): the reopened log holds whole committed
  transactions only, and appends continue at the next offset.
- Checkpoints: a writer killed mid-save leaves `latest` on a whole checkpoint; a file of the newest
  checkpoint torn afterwards is detected by its manifest and the run rolls back to the previous one.
- Deltas and snapshots: a torn newest snapshot is skipped (the previous snapshot and its deltas are
  served), never half applied, and taken once whole.
- A full disk, without root: a child process under RLIMIT_FSIZE (the kernel answers EFBIG) and, where
  an unprivileged tmpfs can be mounted (`unshare -rm`), a real ENOSPC. The previous checkpoint or
  snapshot stays whole and the error says so in one line.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gpurec.model.checkpoint import (
    MANIFEST_FILE,
    CorruptCheckpoint,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import Record
from gpurec.sync.deltafile import DeltaApplier, list_deltas, write_delta

REPO = Path(__file__).resolve().parents[1]
BATCH = 4  # records per append: one transaction


def run_child(code: str | None, *args: str, limit_bytes: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` (None: `args` are the interpreter's arguments) in a fresh interpreter;
    `limit_bytes` caps the size of any file it writes (the kernel answers EFBIG)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write(2) then fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, *(["-c", textwrap.dedent(code)] if code is not None else []), *args],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, preexec_fn=limit if limit_bytes else None,
    )  # fmt: skip


def value_of(offset: int) -> bytes:
    """A record's value, a function of its offset (a whole record is recognisable), 100-700 bytes."""
    body = random.Random(offset).randbytes(100 + offset * 37 % 600)
    return offset.to_bytes(8, "little") + body


# ---- the event log: a torn WAL frame after kill -9 ----------------------------------------------

APPENDER = f"""
import random, sys, time
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import Record
BATCH = {BATCH}
{inspect.getsource(value_of)}
log = LocalEventLog(sys.argv[1], cleanup_interval_s=None)
for batch in range(150):  # about 400 WAL frames: below the 1000-page autocheckpoint, so the WAL ends with the newest
    log.append("t", [Record(o, value_of(o), o) for o in range(batch * BATCH, (batch + 1) * BATCH)])
    print(batch + 1, flush=True)
    time.sleep(0.002)
time.sleep(600)
"""


def tear_last_wal_frame(wal: Path, how: str) -> int:
    """Damage the last frame of a SQLite WAL file; returns the frames it held whole before."""
    data = bytearray(wal.read_bytes())
    page_size = int.from_bytes(data[8:12], "big")
    frame = 24 + page_size
    frames = (len(data) - 32) // frame
    assert frames >= 2, f"the WAL holds {frames} frames"
    last = 32 + (frames - 1) * frame
    if how == "truncated":  # the write stopped half-way through the frame
        del data[last + frame // 2 :]
    else:  # the frame's page holds garbage (a sector that never got its new contents)
        data[last + 24 + 100 : last + 24 + 600] = random.Random(7).randbytes(500)
    wal.write_bytes(bytes(data))
    return frames


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_torn_wal_frame_after_kill_9_loses_only_whole_transactions(tmp_path, how):
    path = tmp_path / "log.db"
    with LocalEventLog(path) as log:
        log.create_topic("t", 1)
    child = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        target, acked = random.Random(how).randint(30, 120), 0
        while acked < target:
            acked = int(child.stdout.readline())
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: appending, or between two appends
    finally:
        child.kill()
        child.wait()
    acked = max([acked, *(int(line) for line in child.stdout.read().split())])
    untorn = tmp_path / "untorn"  # the log as the crash left it, for comparison
    untorn.mkdir()
    for name in ("log.db", "log.db-wal"):
        shutil.copy(tmp_path / name, untorn / name)
    with LocalEventLog(untorn / "log.db", cleanup_interval_s=None) as log:
        committed = log.end_offsets("t")[0]
    tear_last_wal_frame(path.with_name("log.db-wal"), how)

    with LocalEventLog(path, cleanup_interval_s=None) as log:
        end = log.end_offsets("t")[0]
        records = log.read("t", 0, 0, 100_000)
        # Whole transactions only, each record whole and in its place; at most the torn one is gone.
        assert [r.offset for r in records] == list(range(len(records))) and len(records) == end
        assert len(records) % BATCH == 0, "a torn transaction was read as data"
        assert all(r.value == value_of(r.offset) for r in records)
        assert (acked - 1) * BATCH <= len(records) <= committed <= (acked + 1) * BATCH
        # The torn frame was the last transaction's commit (lost whole) or an uncommitted one (nothing lost).
        assert len(records) in (committed - BATCH, committed)
        # Appends continue at the next offset, and read back.
        log.append("t", [Record(o, value_of(o), o) for o in range(end, end + BATCH)])
        assert [r.offset for r in log.read("t", 0, end, 100)] == list(range(end, end + BATCH))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---- checkpoints: kill -9 mid-save, a torn file, a full disk ------------------------------------

SAVER = """
import sys, torch
from gpurec.model.checkpoint import TrainerState, save_checkpoint
model = torch.nn.Linear(512, 1024)  # 2 MiB of weights: a save takes long enough to be killed in
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
for step in range(1, 10_000):
    with torch.no_grad():
        model.weight.fill_(step)
        model.bias.fill_(step)
    save_checkpoint(sys.argv[1], model, optimizer, TrainerState(step=step))
    print(step, flush=True)
"""


def loaded_step(checkpoint: Path) -> int:
    """Load a checkpoint of SAVER's model; its weights say which step wrote them."""
    model = torch.nn.Linear(512, 1024)
    state = load_checkpoint(checkpoint, model)
    values = torch.unique(torch.cat([model.weight.flatten(), model.bias]))
    assert values.numel() == 1, "weights of two saves mixed"
    assert int(values) == state.step
    return state.step


def test_a_checkpoint_killed_mid_save_or_torn_later_is_never_read(tmp_path, caplog):
    out = tmp_path / "run"
    for round_ in range(1):  # killed at a random point of a save
        child = subprocess.Popen([sys.executable, "-c", SAVER, str(out)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            saved = 0
            while saved < 3 + round_:
                saved = int(child.stdout.readline())
            time.sleep(random.Random(round_).uniform(0.0, 0.05))
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
        latest = latest_checkpoint(out)
        assert latest is not None and loaded_step(latest) >= saved
    current = latest_checkpoint(out)
    others = sorted(p for p in (out / "checkpoints").glob("step-*") if p != current)
    assert others, "keep=2: another checkpoint to roll back to"
    # A file of the checkpoint `latest` names, torn afterwards (a lost page): detected, rolled back, warned.
    shard = current / "__0_0.distcp"
    whole = shard.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:4096] + bytes(len(whole) - 4096)):  # truncated; zeroed, same size
        shard.write_bytes(damaged)
        assert verify_checkpoint(current) is not None
        with caplog.at_level(logging.WARNING, logger="gpurec.model.checkpoint"):
            caplog.clear()
            previous = latest_checkpoint(out)
        assert previous == others[-1] and loaded_step(previous) == int(previous.name.removeprefix("step-"))
        assert f"rolled back to {previous.name}" in caplog.text and current.name in caplog.text
        with pytest.raises(CorruptCheckpoint, match="not whole"):
            load_checkpoint(current, torch.nn.Linear(512, 1024))
    shard.write_bytes(whole)
    assert latest_checkpoint(out) == current and loaded_step(current) >= saved
    # What a killed save left under its hidden name is never read, and the next save removes it.
    leftover = out / "checkpoints" / ".step-00000077.partial"
    leftover.mkdir(exist_ok=True)
    (leftover / "__0_0.distcp").write_bytes(b"torn")
    assert latest_checkpoint(out) == current
    model = torch.nn.Linear(512, 1024)
    with torch.no_grad():
        model.weight.fill_(9_000)
        model.bias.fill_(9_000)
    resumed = save_checkpoint(out, model, torch.optim.SGD(model.parameters(), lr=0.1), TrainerState(step=9_000))
    assert latest_checkpoint(out) == resumed and loaded_step(resumed) == 9_000
    assert not list((out / "checkpoints").glob(".*partial")), "a killed save's files were left"
    current = resumed
    others = sorted(p for p in (out / "checkpoints").glob("step-*") if p != current)
    # `latest` itself unreadable (torn pointer): the newest whole checkpoint, with a warning.
    newest = max(current, others[-1])
    (out / "checkpoints" / "latest").write_bytes(b"\x00\x00")
    assert latest_checkpoint(out) == newest
    # A checkpoint written before manifests existed is still read.
    (newest / MANIFEST_FILE).unlink()
    assert verify_checkpoint(newest) is None and loaded_step(newest) == int(newest.name.removeprefix("step-"))


DISK_FULL_SAVER = """
import json, os, resource, signal, sys, torch
from gpurec.model.checkpoint import CheckpointNotWritten, TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
out, limit = sys.argv[1], int(sys.argv[2])
model = torch.nn.Linear(256, 256)  # 257 KiB per checkpoint
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with torch.no_grad():
    model.weight.fill_(1)
if latest_checkpoint(out) is None:
    save_checkpoint(out, model, optimizer, TrainerState(step=1))
with torch.no_grad():
    model.weight.fill_(2)
if limit:  # from here on every file written is capped: write(2) fails with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
report = {}
try:
    save_checkpoint(out, model, optimizer, TrainerState(step=2))
except CheckpointNotWritten as error:
    report["error"] = str(error)
latest = latest_checkpoint(out)
fresh = torch.nn.Linear(256, 256)
report["latest"] = latest.name
report["step"] = load_checkpoint(latest, fresh).step
report["weights"] = torch.unique(fresh.weight).tolist()
report["files"] = sorted(os.listdir(os.path.join(out, "checkpoints")))
print(json.dumps(report))
"""


def check_disk_full_report(report: dict, reason: str) -> None:
    assert reason in report["error"] and "\n" not in report["error"]
    assert "checkpoint step-00000002 not written" in report["error"]
    assert "the previous checkpoint step-00000001 is intact" in report["error"]
    assert report["latest"] == "step-00000001" and report["step"] == 1 and report["weights"] == [1.0]
    assert report["files"] == ["latest", "step-00000001"], "the failed save left files behind"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    result = run_child(DISK_FULL_SAVER, str(out), str(64 * 1024))  # step 1 saved, then files capped at 64 KiB
    assert result.returncode == 0, result.stderr
    check_disk_full_report(json.loads(result.stdout.splitlines()[-1]), "File too large")
    assert verify_checkpoint(out / "checkpoints" / "step-00000001") is None


def _unshare_tmpfs_works(directory: Path) -> bool:
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {directory}"], capture_output=True, timeout=10
    )
    return probe.returncode == 0


def test_enospc_on_a_tiny_tmpfs_keeps_the_previous_checkpoint(tmp_path):
    """A real ENOSPC: a 400 KiB tmpfs in a user+mount namespace (no root needed where the kernel
    allows unprivileged user namespaces); skipped where it does not."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    try:
        if not _unshare_tmpfs_works(mount):
            pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    except FileNotFoundError:
        pytest.skip("no unshare here")
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(DISK_FULL_SAVER))
    command = f"mount -t tmpfs -o size=400k none {mount} && exec {sys.executable} {script} {mount / 'run'} 0"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    check_disk_full_report(json.loads(result.stdout.splitlines()[-1]), "No space left on device")


def test_gpurec_train_stops_cleanly_on_a_full_disk_and_resumes_from_the_intact_checkpoint(small_features, tmp_path):
    """The batch trainer stops (one line, exit 2) rather than train on without a way to resume."""
    from conftest import SMALL_CONFIG, train_small

    out = tmp_path / "run"
    train_small(small_features, out, max_steps=4, validate=False)
    command = [
        "-m", "gpurec.cli", "train", "--data", str(small_features), "--out", str(out),
        "--config", str(SMALL_CONFIG), "--max-steps", "8", "--no-validate",
    ]  # fmt: skip
    result = run_child(None, *command, limit_bytes=1 << 20)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("gpurec train: checkpoint step-00000008 not written") and "File too large" in line, line
    assert "the previous checkpoint step-00000004 is intact" in line
    assert latest_checkpoint(out).name == "step-00000004" and verify_checkpoint(latest_checkpoint(out)) is None
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "a partial save was left"
    # Space freed (no limit): the rerun resumes from the intact checkpoint.
    assert train_small(small_features, out, max_steps=8, validate=False)["steps"] == 8
    resumed = read_trainer_state(latest_checkpoint(out))
    assert resumed.step == 8 and resumed.run.resumed_from.endswith("step-00000004")


# ---- deltas and snapshots: torn newest snapshot, full disk -----------------------------------------


def _module() -> torch.nn.Module:
    return torch.nn.Linear(64, 64)


def _entries(value: float) -> list:
    return [("weight", None, torch.full((64, 64), value)), ("bias", None, torch.full((64,), value))]


def test_a_torn_newest_snapshot_is_skipped_never_half_applied_and_taken_once_whole(tmp_path):
    write_delta(tmp_path, 0, "snapshot", _entries(1.0))
    write_delta(tmp_path, 1, "rows", [("weight", torch.tensor([3]), torch.full((1, 64), 5.0))])
    whole = write_delta(tmp_path, 2, "snapshot", _entries(2.0)).read_bytes()
    torn = tmp_path / "000000002.snapshot.delta"
    for damaged in (whole[: len(whole) // 2], whole[:-100]):
        torn.write_bytes(damaged)
        module = _module()
        applier = DeltaApplier(module, tmp_path)
        applier.poll()
        # The older snapshot and its delta, nothing of the torn one.
        assert applier.version == 1 and applier.refused >= 1
        expected = torch.full((64, 64), 1.0)
        expected[3] = 5.0
        assert torch.equal(module.weight, expected) and torch.equal(module.bias, torch.full((64,), 1.0))
    torn.write_bytes(whole)  # written again whole (the publisher's next snapshot): taken
    applier.poll()
    assert applier.version == 2 and torch.equal(module.weight, torch.full((64, 64), 2.0))


DISK_FULL_SNAPSHOT = """
import json, os, sys, torch
from gpurec.sync.deltafile import DeltaNotWritten, write_delta
directory = sys.argv[1]
try:
    write_delta(directory, 1, "snapshot", [("weight", None, torch.full((256, 256), 2.0))])
    print(json.dumps({"error": None}))
except DeltaNotWritten as error:
    print(json.dumps({"error": str(error), "errno": error.errno}))
"""


def test_a_full_disk_during_a_snapshot_keeps_the_previous_one(tmp_path):
    write_delta(tmp_path, 0, "snapshot", [("weight", None, torch.full((256, 256), 1.0))])
    result = run_child(DISK_FULL_SNAPSHOT, str(tmp_path), limit_bytes=64 * 1024)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert "delta 000000001.snapshot.delta not written" in report["error"] and "File too large" in report["error"]
    assert "the deltas before it are intact" in report["error"] and report["errno"] == 27  # EFBIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000000.snapshot.delta"], "the partial file was left"
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(256, 256))
    applier = DeltaApplier(module, tmp_path)
    applier.poll()
    assert applier.version == 0 and torch.equal(module.weight, torch.full((256, 256), 1.0))
    assert [seq for seq, _, _ in list_deltas(tmp_path)] == [0]
