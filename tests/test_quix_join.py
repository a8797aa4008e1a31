"""`gpurec join --engine quix`: the joiner as a Quix Streams app on a real Kafka-protocol broker
(noida-db): the embedded runner's outputs, exactly once across kill -9, partitions split over two
processes, and a non-Kafka log refused.

Where the watermark falls among the records decides a few outputs (see gpurec/stream/joiner.py):
the embedded runner advances it once per step, the Quix engine after every record, so an action
that arrives after its row's window closed is "late" in one and may still join in the other when
it comes within about a step of the close. `_stream` leaves out the late actions of rows that close
near the end of the stream (the only place make_stream puts late actions near a close), so both
engines must give the same bytes.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("quixstreams")

from test_join import BASE_MS, SETTINGS, WINDOW_MS, fill_log, make_stream, read_topic

from gpurec.stream.broker import KafkaBroker
from gpurec.stream.join import ACTIONS, DEAD_LETTER, EXAMPLES, SERVED, ensure_topics, run_join
from gpurec.stream.kafka import KafkaEventLog
from gpurec.stream.log import open_event_log
from gpurec.stream.quix_join import Ticker, run_quix_join
from gpurec.stream.records import DeadLetter, Example, decode

ROOT = Path(__file__).parents[1]
CLI = [
    sys.executable,
    "-m",
    "gpurec.cli",
    "join",
    "--engine",
    "quix",
    "--json",
    "--window-s",
    str(WINDOW_MS / 1000),
    "--grace-s",
    str(100 * WINDOW_MS / 1000),
    "--out-of-order-s",
    "1",
    "--idle-s",
    "1e9",
]  # fmt: skip  (SETTINGS, on the command line)


def _stream(requests: int, seed: int):
    rows, actions = make_stream(requests, seed)
    last = max(r.ts_ms for r in rows)
    # A late action on a row closing within 3 min of the end could be judged either way (see above).
    kept = [
        (a, late)
        for a, late in actions
        if not (late and BASE_MS + a.request_id * 2_000 + WINDOW_MS + 180_000 > last)
    ]
    return rows, kept


def _reference(tmp_path: Path, rows, actions) -> tuple[collections.Counter, collections.Counter]:
    """Examples and dead letters of the embedded runner on a SQLite log of the same records."""
    url = f"sqlite:///{tmp_path}/reference.db"
    fill_log(url, rows, actions)
    with open_event_log(url) as log:
        run_join(log, SETTINGS, drain=True)
    return collections.Counter(read_topic(url, EXAMPLES)), collections.Counter(read_topic(url, DEAD_LETTER))


def _consenting(rows) -> set[tuple[int, int]]:
    return {(r.request_id, r.item_id) for r in rows if r.consent_training}


def test_quix_engine_gives_the_embedded_runners_outputs(tmp_path):
    rows, actions = _stream(500, seed=21)  # 3,000 served rows, ~1,700 actions
    examples, letters = _reference(tmp_path, rows, actions)
    with KafkaBroker(tmp_path / "kafka") as broker:
        fill_log(broker.url, rows, actions)
        report = run_quix_join(broker.url, SETTINGS, member="m0", state_dir=tmp_path / "state", drain=True)
        got_examples = collections.Counter(read_topic(broker.url, EXAMPLES))
        got_letters = collections.Counter(read_topic(broker.url, DEAD_LETTER))
    assert got_examples == examples and got_letters == letters  # the same bytes, each as often
    decoded = [decode(v, Example) for v in got_examples.elements()]
    assert collections.Counter((e.served.request_id, e.served.item_id) for e in decoded) == dict.fromkeys(
        _consenting(rows), 1
    )
    assert {decode(v, DeadLetter).reason for v in got_letters} == {"late", "no served row"}
    assert report["records_in"][SERVED] == len(rows) and report["records_in"][ACTIONS] == len(actions)
    assert report["examples"] == report["counters"]["examples"] == len(decoded)
    assert report["dead_letters"] == sum(letters.values())


def _committed(url: str) -> int:
    with open_event_log(url) as log:
        return sum(log.committed("joiner", SERVED).values()) + sum(log.committed("joiner", ACTIONS).values())


def test_exactly_once_across_kill_9(tmp_path):
    """The engine killed with SIGKILL while it works, restarted under the same member name each time
    (static membership: its partitions come back at once), once with its local state deleted, ends
    with exactly the reference output."""
    rows, actions = _stream(1_500, seed=22)  # 9,000 served rows
    examples, letters = _reference(tmp_path, rows, actions)
    with KafkaBroker(tmp_path / "kafka") as broker:
        fill_log(broker.url, rows, actions)
        command = [
            *CLI,
            "--log",
            broker.url,
            "--drain",
            "--member",
            "m0",
            "--state-dir",
            str(tmp_path / "state"),
        ]
        rng = random.Random(5)
        kills = 0
        for _attempt in range(10):
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
            try:
                before = _committed(broker.url)
                deadline = time.monotonic() + 60
                while (
                    proc.poll() is None and _committed(broker.url) == before and time.monotonic() < deadline
                ):
                    time.sleep(0.05)  # until this run commits, then kill it somewhere in its work
                time.sleep(rng.uniform(0, 0.8))
                if proc.poll() is None and kills < 3:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    if kills == 2:  # a lost disk: the next run rebuilds RocksDB from the changelog topic
                        shutil.rmtree(tmp_path / "state")
                    continue
                out, _ = proc.communicate(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 0
            report = json.loads(out.decode().strip().splitlines()[-1])
            break
        else:
            pytest.fail("the joiner never finished")
        got_examples = collections.Counter(read_topic(broker.url, EXAMPLES))  # read_committed
        got_letters = collections.Counter(read_topic(broker.url, DEAD_LETTER))
    assert kills == 3, "the kills never landed while the joiner was running"
    keys = collections.Counter(
        (e.served.request_id, e.served.item_id)
        for e in map(lambda v: decode(v, Example), got_examples.elements())
    )
    assert keys == dict.fromkeys(_consenting(rows), 1)  # every consenting served row exactly once
    assert got_examples == examples and got_letters == letters
    assert report["counters"]["examples"] == sum(got_examples.values())  # the counters survived the kills
    assert report["records_in"][SERVED] < len(rows)  # the last run resumed from committed offsets and state


class _Member:
    """A `gpurec join --engine quix` process whose stderr lines are collected as they come."""

    def __init__(self, url: str, member: str, state_dir: Path) -> None:
        command = [*CLI, "--log", url, "--member", member, "--state-dir", str(state_dir)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def assigned(self, since: int = 0) -> list[int]:
        """The partitions it reported as assigned (a line per partition after each rebalance)."""
        return [int(line.split()[2]) for line in self.lines[since:] if line.startswith("join: partition")]

    def check(self, deadline: float) -> None:
        assert self.proc.poll() is None, f"exited early: {self.lines[-5:]}"
        assert time.monotonic() < deadline, f"no rebalance within the timeout: {self.lines[-5:]}"
        time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_two_processes_split_the_partitions(tmp_path):
    """Two members of one group each join the partition Kafka gives them; end ticks stop both, and
    together they emit the reference output once."""
    rows, actions = _stream(600, seed=23)
    examples, letters = _reference(tmp_path, rows, actions)
    with KafkaBroker(tmp_path / "kafka") as broker:
        with open_event_log(broker.url) as log:
            ensure_topics(log, 2)
        first = _Member(broker.url, "a", tmp_path / "state")
        second = None
        try:
            deadline = time.monotonic() + 60
            while 1 not in first.assigned():  # alone in the group: it holds both partitions
                first.check(deadline)
            mark = len(first.lines)
            second = _Member(broker.url, "b", tmp_path / "state")
            # Settled once both report a partition after b joined, and not the same one (a report of the
            # first means the rebalance is complete: every member revoked before it was assigned).
            while not (
                first.assigned(mark)
                and second.assigned()
                and first.assigned(mark)[-1] != second.assigned()[-1]
            ):
                first.check(deadline)
                second.check(deadline)
            fill_log(broker.url, rows, actions)
            with KafkaEventLog(broker.bootstrap) as log:
                Ticker(broker.bootstrap, 2, 1.0).send_end(log, [SERVED, ACTIONS])  # the inputs are over
            outs = [json.loads(m.proc.stdout.read().strip().splitlines()[-1]) for m in (first, second)]
            assert [m.proc.wait(timeout=60) for m in (first, second)] == [0, 0]
        finally:
            for member in (first, second):
                if member is not None:
                    member.stop()
        got_examples = collections.Counter(read_topic(broker.url, EXAMPLES))
        got_letters = collections.Counter(read_topic(broker.url, DEAD_LETTER))
    assert sorted(p for out in outs for p in out["partitions"]) == [0, 1]  # one partition each
    assert sum(out["records_in"][SERVED] for out in outs) == len(rows)
    assert sum(out["examples"] for out in outs) == sum(got_examples.values())
    assert got_examples == examples and got_letters == letters


def test_idle_partitions_flush_on_ticks(tmp_path):
    """Without drain, Quix has no timer to close the last windows: the ticks' processing time (x
    time_scale) advances the idle inputs, so every example comes out although nothing newer arrives."""
    rows, actions = make_stream(20, seed=24)
    want = len(_consenting(rows))
    with KafkaBroker(tmp_path / "kafka") as broker:
        fill_log(broker.url, rows, actions)
        command = [sys.executable, "-m", "gpurec.cli", "join", "--engine", "quix", "--json", "--log", broker.url,
                   "--window-s", "60", "--grace-s", "0.001", "--idle-s", "1", "--time-scale", "600",
                   "--state-dir", str(tmp_path / "state")]  # fmt: skip
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT, text=True
        )
        try:
            deadline = time.monotonic() + 60
            while len(read_topic(broker.url, EXAMPLES)) < want and time.monotonic() < deadline:
                assert proc.poll() is None
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)  # a graceful stop: Quix commits and exits
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
        assert len(read_topic(broker.url, EXAMPLES)) == want, "idle partitions never flushed"
    report = json.loads(out.strip().splitlines()[-1])
    assert report["ticks"] > 0 and report["counters"]["examples"] == want


def test_quix_engine_needs_a_kafka_log(tmp_path):
    result = subprocess.run(
        [*CLI, "--log", f"sqlite:///{tmp_path}/log.db"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpurec join: the quix engine runs on Kafka: --log must be kafka://host:port, got 'sqlite:///{tmp_path}/log.db'"
    ]
    assert not (tmp_path / "log.db").exists()
