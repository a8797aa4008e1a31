"""kill -9 of each live process, at seeded random points, then a restart: the loop's invariants hold.

- the joiner (`gpurec join`), killed while served rows and actions are still being appended: the
  `examples` topic ends with exactly the examples of a never-killed run (none lost, none twice);
- the online trainer with its parameter-sync publisher (`gpurec train --online --sync-dir`), killed
  at random points and while it writes a delta: every checkpoint it can resume from accounts for
  exactly the examples before its offsets (count and digest), the final model equals a never-killed
  run's, the delta sequence only grows, a server following the sync directory never applies an
  older or a half-written delta and ends on the trainer's final model;
- the Triton server following a sync directory: restarted on the same repository and directory it
  serves a version >= the one before the kill (deltas written while it was down included) and
  answers again.

The soak (tests/test_soak.py) runs all of them together with traffic.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import fill_examples
from test_join import make_stream, read_topic

from gpurec.model.checkpoint import latest_checkpoint, read_trainer_state
from gpurec.stream.join import ACTIONS, DEAD_LETTER, EXAMPLES, SERVED, JoinSettings, ensure_topics, run_join
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Example, decode, encode
from gpurec.sync.examples import EXAMPLES_TOPIC
from gpurec.sync.online import examples_digest

ROOT = Path(__file__).resolve().parents[1]
WINDOW_MS = 60_000


def _cli(*argv: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "gpurec.cli", *argv]
    return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=subprocess.DEVNULL, text=True, env=env)


# Runs a gpurec command that SIGKILLs its own process at a chosen point, which a kill at a random time
# lands on only by luck: "write N" just before its Nth write statement to an SQLite file (the event
# log's INSERTs, UPDATEs, DELETEs and COMMITs: inside or between transactions); "replace N SUFFIX"
# just before its Nth os.replace onto a name ending in SUFFIX (a delta or a checkpoint pointer fully
# written under its temporary name, not yet renamed into place).
CRASH_AT = """
import os, signal, sqlite3, sys
mode, left = sys.argv[1], [int(sys.argv[2])]
def hit():
    left[0] -= 1
    if left[0] == 0:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "write":
    class Crashing(sqlite3.Connection):
        def execute(self, sql, *args):
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "COMMIT")):
                hit()
            return super().execute(sql, *args)
        def executemany(self, sql, *args):
            if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "COMMIT")):
                hit()
            return super().executemany(sql, *args)
    connect = sqlite3.connect
    sqlite3.connect = lambda *a, **k: connect(*a, factory=Crashing, **k)
    argv = sys.argv[3:]
else:
    suffix, replace = sys.argv[3], os.replace
    def crashing_replace(src, dst, **kw):
        if str(dst).endswith(suffix):
            hit()
        return replace(src, dst, **kw)
    os.replace = crashing_replace
    argv = sys.argv[4:]
from gpurec.cli import main
sys.exit(main(argv))
"""


def _cli_crashing(at: tuple, *argv: str, stdout=subprocess.DEVNULL) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", CRASH_AT, *map(str, at), *argv]
    return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=subprocess.DEVNULL, text=True, env=env)


def _kill(process: subprocess.Popen) -> bool:
    """SIGKILL by PID; True when it was still running (the kill landed)."""
    if process.poll() is not None:
        return False
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return True


# ---- the joiner ----------------------------------------------------------------------------------


def _events_in_time_order(seed: int) -> list[tuple[str, Record]]:
    """Served rows and actions as one stream in event-time order (each topic partition is appended
    in order, so no action is late and the outcome does not depend on how the joiner's steps fall)."""
    rows, actions = make_stream(700, seed=seed)
    events = [(r.ts_ms, 0, SERVED, Record(r.user_id, encode(r), r.ts_ms)) for r in rows]
    events += [(a.ts_ms, 1, ACTIONS, Record(a.user_id, encode(a), a.ts_ms)) for a, _ in actions]
    events.sort(key=lambda e: (e[0], e[1]))
    return [(topic, record) for _, _, topic, record in events]


def _append(url: str, events: list[tuple[str, Record]]) -> None:
    with open_event_log(url) as log:
        for topic in (SERVED, ACTIONS):
            records = [record for t, record in events if t == topic]
            if records:
                log.append(topic, records)


JOIN_ARGS = ("--window-s", str(WINDOW_MS / 1000), "--grace-s", "6000", "--out-of-order-s", "1", "--idle-s", "1e9", "--batch", "40")


def test_joiner_killed_while_rows_and_actions_arrive_emits_each_example_once(tmp_path):
    """The log grows while `gpurec join` runs; the joiner is SIGKILLed at seeded random points (each
    after it committed at least once) and restarted, then drained once the appends are over. The
    examples and dead letters equal, record for record, a never-killed drain of the whole log."""
    events = _events_in_time_order(seed=5)
    reference, url = f"sqlite:///{tmp_path}/reference.db", f"sqlite:///{tmp_path}/killed.db"
    for target in (reference, url):
        with open_event_log(target) as log:
            ensure_topics(log, 2)
    _append(reference, events)
    with open_event_log(reference) as log:
        settings = JoinSettings(window_ms=WINDOW_MS, grace_ms=6_000_000, out_of_order_ms=1_000, idle_ms=10**12, batch=40, poll_s=0)
        run_join(log, settings, drain=True)

    rng = random.Random(11)
    appending = threading.Event()
    appending.set()

    def appender() -> None:  # about 15 s of traffic in small ordered chunks
        try:
            for start in range(0, len(events), 60):
                _append(url, events[start : start + 60])
                time.sleep(0.1)
        finally:
            appending.clear()

    thread = threading.Thread(target=appender, daemon=True)
    thread.start()
    kills_while_appending = kills = crashes = 0
    attempt = 0
    while appending.is_set() or kills < 3:
        attempt += 1
        if attempt % 2 == 0:  # the process kills itself just before a random write statement of its own
            process = _cli_crashing(("write", rng.randint(1, 30)), "join", "--log", url, *JOIN_ARGS)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)  # no write left to crash at (caught up): killed below instead
            crashes += process.returncode == -signal.SIGKILL
        else:
            process = _cli("join", "--log", url, *JOIN_ARGS)
            before = _committed(url)
            deadline = time.monotonic() + 60
            while process.poll() is None and _committed(url) == before and time.monotonic() < deadline:
                time.sleep(0.01)  # it has started and committed: kill it somewhere in its stream of commits
            time.sleep(rng.uniform(0.0, 0.3))
        was_appending = appending.is_set()
        if _kill(process):
            kills += 1
            kills_while_appending += was_appending
        assert process.returncode == -signal.SIGKILL, "the joiner stopped on its own"
    thread.join(60)
    # Drain (close every window: a burst of examples), crashing at random writes until a run completes.
    for tries in range(30):  # the crash point moves later each time: the last runs finish
        final = _cli_crashing(("write", rng.randint(1, 16 << tries)), "join", "--log", url, *JOIN_ARGS, "--drain", "--json", stdout=subprocess.PIPE)
        out, _ = final.communicate(timeout=300)
        if final.returncode != -signal.SIGKILL:
            break
        crashes += 1
    assert final.returncode == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert kills_while_appending >= 2, f"only {kills_while_appending} of {kills} kills landed while the log grew"
    assert crashes >= 5, f"only {crashes} runs crashed at a write"

    got, expected = collections.Counter(read_topic(url, EXAMPLES)), collections.Counter(read_topic(reference, EXAMPLES))
    assert got == expected  # identical examples, each exactly once
    keys = collections.Counter((e.served.request_id, e.served.item_id) for e in (decode(v, Example) for v in got.elements()))
    assert max(keys.values()) == 1 and len(keys) > 2_000
    assert collections.Counter(read_topic(url, DEAD_LETTER)) == collections.Counter(read_topic(reference, DEAD_LETTER))
    assert report["counters"]["examples"] == sum(got.values())  # the restored counters continued too


def _committed(url: str) -> int:
    with open_event_log(url) as log:
        return sum(log.committed("joiner", SERVED).values()) + sum(log.committed("joiner", ACTIONS).values())


# ---- the online trainer and its sync publisher ---------------------------------------------------

TRAIN_ARGS = ("--batch-size", "16", "--checkpoint-every-s", "0.3", "--sync-every-s", "0.1", "--dense-every-s", "0.4",
              "--snapshot-every", "8", "--drain", "--json")  # fmt: skip


class _Follower:
    """A served ranker following the sync directory the way the Triton model does (DeltaApplier
    polling every few ms), recording every version it serves."""

    def __init__(self, module, directory: Path) -> None:
        from gpurec.sync.deltafile import DeltaApplier

        self.applier = DeltaApplier(module, directory)
        self.versions: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:
                self.applier.poll()
            except Exception as error:
                self.errors.append(error)
            if not self.versions or self.versions[-1] != self.applier.version:
                self.versions.append(self.applier.version)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _prefix_account(url: str, offsets: dict[str, int]) -> tuple[int, int]:
    """(count, digest) of the examples below the given offsets ("examples/p" -> next offset)."""
    examples = []
    with open_event_log(url) as log:
        for key, end in offsets.items():
            partition = int(key.rsplit("/", 1)[1])
            offset = log.start_offsets(EXAMPLES_TOPIC)[partition]
            while offset < end:
                batch = log.read(EXAMPLES_TOPIC, partition, offset, min(1000, end - offset))
                examples.extend(decode(r.value, Example) for r in batch)
                offset = batch[-1].offset + 1
    return len(examples), examples_digest(examples)


def test_trainer_and_publisher_killed_anywhere_train_each_example_once_and_never_serve_backwards(tmp_path, batch_run, valid_examples):
    """`gpurec train --online --sync-dir` SIGKILLed at a random time, just before a delta is renamed
    into place and just before a checkpoint becomes `latest`, restarted each time, then drained.
    Every checkpoint it resumed from accounts for exactly the examples before its offsets; the final
    model equals a never-killed run's; delta seqs grow across restarts; a follower never went back a
    version, never applied a torn delta, and ends on the trainer's final model exactly."""
    from test_sync import served_module

    from gpurec.sync.deltafile import list_deltas, read_delta
    from gpurec.sync.online import OnlineSettings, train_online
    from gpurec.sync.progressive import load_progressive
    from gpurec.sync.publish import SYNC_TOPIC

    examples = valid_examples
    url, out, deltas = f"sqlite:///{tmp_path}/log.db", tmp_path / "online", tmp_path / "deltas"
    fill_examples(url, examples)
    follower = _Follower(served_module(batch_run)[0], deltas)
    args = ("train", "--online", "--from", url, "--out", str(out), "--init", str(batch_run), "--sync-dir", str(deltas), *TRAIN_ARGS)
    rng = random.Random(3)
    resumed_from, seqs_before_kill = [], []
    try:
        for at in (None, ("replace", rng.randint(3, 10), ".delta"), ("replace", rng.randint(1, 3), "latest")):
            newest = list_deltas(deltas)[-1][0] if list_deltas(deltas) else -1
            if at is None:  # at a random time once it published past its start-up snapshot
                process = _cli(*args)
                deadline = time.monotonic() + 120
                while process.poll() is None and time.monotonic() < deadline:
                    if list_deltas(deltas) and list_deltas(deltas)[-1][0] > newest + 1:
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.5))
                _kill(process)
            else:
                process = _cli_crashing(at, *args)
                process.wait(timeout=180)
            assert process.returncode == -signal.SIGKILL, f"the trainer was not killed ({at}): exit {process.returncode}"
            if at is not None and at[2] == ".delta":  # a whole delta under its temporary name, never listed
                assert list(deltas.glob(".*.delta.*.tmp")) and all(read_delta(p) for _, _, p in list_deltas(deltas))
            seqs_before_kill.append(max((seq for seq, _, _ in list_deltas(deltas)), default=-1))
            checkpoint = latest_checkpoint(out)
            if checkpoint is not None:  # what the restart resumes from: whole, and true to the log
                state = read_trainer_state(checkpoint)
                assert _prefix_account(url, state.offsets) == (state.samples, state.digest)
                resumed_from.append(state.samples)
        final = _cli(*args, stdout=subprocess.PIPE)
        report = json.loads(final.communicate(timeout=300)[0].strip().splitlines()[-1])
        assert final.returncode == 0
        deadline = time.monotonic() + 30
        while follower.applier.version < report["sync_seq"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        follower.stop()
    assert 0 < max(resumed_from) < len(examples), resumed_from  # kills landed mid-stream, after a checkpoint
    state = read_trainer_state(latest_checkpoint(out))
    assert state.samples == report["examples_total"] == len(examples)
    assert state.digest == report["digest"] == examples_digest(examples)
    scored = load_progressive(out)["where"]  # each example's pre-update score was kept once too
    assert len(scored) == len({tuple(w) for w in scored.tolist()}) == len(examples)

    reference = tmp_path / "reference"
    with open_event_log(url) as log:
        train_online(log, reference, OnlineSettings(batch_size=16), init=batch_run, drain=True, progress=False)
    final_model = served_module(out)[0].state_dict()
    whole = served_module(reference)[0].state_dict()
    assert all(torch.equal(final_model[k], whole[k]) for k in whole)  # no example lost or trained twice

    # The delta sequence only grew: each restart published above everything before its kill ...
    with open_event_log(url) as log:
        announced = [r.key for r in log.read(SYNC_TOPIC, 0, 0, 100_000)]
    assert announced == sorted(set(announced)) and announced[-1] == report["sync_seq"]
    assert all(any(seq > before for seq in announced) for before in seqs_before_kill)
    # ... no delta on disk is torn, no temporary file of a killed writer is left, and the follower
    # only moved forward, applied nothing it refused, and serves exactly the final model.
    assert all(read_delta(path) for _, _, path in list_deltas(deltas))
    assert not list(deltas.glob(".*.tmp"))
    assert not follower.errors and follower.applier.refused == 0
    assert follower.versions == sorted(follower.versions) and follower.versions[-1] == report["sync_seq"]
    served = follower.applier.tensors
    assert all(torch.equal(served[k], final_model[k]) for k in final_model)


# ---- the Triton server ---------------------------------------------------------------------------


def _served_version(server, timeout_s: float = 30.0) -> list[float]:
    """The ranker instances' applied delta versions. Triton's metrics endpoint can come up a moment
    after the server reports ready (seen once in CI: connection refused), so a refused connection or a
    page without the gauge yet is retried, for at most `timeout_s`."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
            versions = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gpurec_ranker_sync_version{")]
            if versions or time.monotonic() > deadline:
                return versions
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    """PIDs still alive in a process group (the server's python-backend stubs are in its group)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def test_triton_killed_restarts_on_the_same_sync_dir_at_a_version_no_older(tmp_path, batch_run, valid_examples):
    """SIGKILL of tritonserver while its ranker follows a sync directory; deltas keep coming while it
    is down (and a killed trainer's temporary file lies there). Restarted on the same repository,
    directory and ports, it serves a version >= the one before the kill (the newest), with exactly
    the scores of an in-process ranker at that version, and answers again."""
    import numpy as np
    from conftest import serve_for_tests
    from test_sync import scores, served_inputs, served_module

    from gpurec.serve.export import export_repository
    from gpurec.serve.server import TritonServer
    from gpurec.sync.deltafile import DeltaApplier, write_delta
    from gpurec.sync.publish import table_name

    httpclient = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException
    repo = export_repository(batch_run, tmp_path / "repo").repo
    deltas = tmp_path / "deltas"
    module, contract = served_module(batch_run)
    name = table_name("item_id")
    write_delta(deltas, 0, "snapshot", [(k, None, v.clone()) for k, v in module.state_dict().items()], {})

    def publish(seq: int) -> None:  # a rows delta moving the item rows every example uses
        table = module.state_dict()[name]
        rows = torch.arange(table.shape[0])
        write_delta(deltas, seq, "rows", [(name, rows, table[rows] + 0.01 * seq)], {})

    inputs = served_inputs(valid_examples[:32], contract)

    def expected_at(seq: int) -> np.ndarray:
        reference = served_module(batch_run)[0]
        applier = DeltaApplier(reference, deltas)
        applier.poll()
        assert applier.version == seq
        return scores(reference, inputs).numpy()

    def served_scores(server) -> np.ndarray:
        dense, single, multi = inputs
        arrays = {"dense": dense.numpy()}
        arrays.update({n: single[:, i : i + 1].numpy() for i, n in enumerate(contract.sparse_features)})
        arrays.update({n: m.numpy() for n, m in zip(contract.multi_valued_features, multi, strict=True)})
        request = []
        for n, array in arrays.items():
            tensor = httpclient.InferInput(n, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        with httpclient.InferenceServerClient(server.http_url) as client:
            return client.infer("ranker", request).as_numpy("score").reshape(-1)

    def wait_version(server, seq: int) -> None:
        deadline = time.monotonic() + 30
        while min(_served_version(server)) < seq and time.monotonic() < deadline:
            time.sleep(0.05)

    env = {"GPUREC_SYNC_DIR": str(deltas)}
    for seq in (1, 2):
        publish(seq)
    first = TritonServer(repo, env=env)
    try:
        first.start()
        wait_version(first, 2)
        publish(3)
        wait_version(first, 3)
        before_kill = min(_served_version(first))
        assert before_kill == 3
        np.testing.assert_allclose(served_scores(first), expected_at(3), rtol=0, atol=1e-6)
        ports = dict(first.ports)
        os.kill(first.pid, signal.SIGKILL)  # the server only: its stubs are left to notice
        first.process.wait()
        with pytest.raises((OSError, InferenceServerException)):  # nobody listens
            served_scores(first)
        publish(4)  # the trainer goes on while the server is down ...
        (deltas / ".000000005.rows.delta.999999.tmp").write_bytes(b"half a delta")  # ... and is killed mid-write
        deadline = time.monotonic() + 30
        while _group_members(first.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        # Its python-backend stubs saw their parent die and exited on their own, the ranker's too, though
        # a delta came after the kill (its follower thread must not call the dead server).
        assert not _group_members(first.pid)
    finally:
        code = first.stop()  # what `gpurec serve` does on exit: leftovers of the group and shared memory go
    assert code == -signal.SIGKILL and not first.remove_shared_memory()

    for restarted in serve_for_tests(repo, env=env, http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"]):
        assert min(_served_version(restarted)) == 4 >= before_kill  # caught up at load, before ready
        np.testing.assert_allclose(served_scores(restarted), expected_at(4), rtol=0, atol=1e-6)
