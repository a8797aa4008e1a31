"""Contract tests of the event log: the same tests against the local SQLite backend and the Kafka
backend on a real Kafka-protocol broker (noida-db, started once for this module and stopped by
PID), plus a kill -9 durability test per backend."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer
from confluent_kafka import TopicPartition as KafkaTopicPartition

from gpurec.errors import InvalidInput
from gpurec.stream.broker import KafkaBroker
from gpurec.stream.kafka import KafkaEventLog
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import EventLog, Record, open_event_log, partition_for

# Small segments let the test broker roll, compact and expire within seconds (a production
# cluster keeps its defaults: this config is only passed here).
FAST_SEGMENTS = {"segment.ms": "100"}
NOW_MS = int(time.time() * 1000)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[KafkaBroker]:
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as running:
        yield running


def open_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> EventLog:
    if kind == "local":
        return LocalEventLog(tmp_path / "log.db", cleanup_interval_s=None)
    broker = request.getfixturevalue("broker")
    return KafkaEventLog(broker.bootstrap, topic_config=FAST_SEGMENTS)


@pytest.fixture(params=["local", "kafka"])
def log(request, tmp_path) -> Iterator[EventLog]:
    opened = open_backend(request.param, request, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def uniq() -> Callable[[str], str]:
    """Topic and group names unique to the test (the Kafka broker is shared by the module)."""
    suffix = uuid.uuid4().hex[:8]
    return lambda base: f"{base}-{suffix}"


def read_all(log: EventLog, topic: str) -> list:
    out = []
    for partition in range(log.partitions(topic)):
        offset = 0
        while batch := log.read(topic, partition, offset, 500):
            out += batch
            offset = batch[-1].offset + 1
    return out


def wait_until(
    probe: Callable[[], object], done: Callable[[object], bool], timeout_s: float = 30.0
) -> object:
    """Polls a broker's background work (retention, compaction) until `done`; returns the last probe."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def served(n: int, start: int = 0) -> list[Record]:
    return [
        Record(key=1000 + i, value=f"served-{i}".encode() * 20, timestamp_ms=NOW_MS + i)
        for i in range(start, start + n)
    ]


def test_partition_for_is_pinned() -> None:
    # Changing these moves every user to another partition: a migration, not a refactor.
    assert [partition_for(k, n) for k, n in [(0, 8), (1, 8), (-1, 8), (123456789, 12), (42, 3)]] == [
        7,
        1,
        0,
        5,
        1,
    ]
    assert partition_for(2**63 - 1, 16) == 7 and partition_for(-(2**63), 16) == 11


def test_append_read_round_trip(log, uniq) -> None:
    topic = uniq("served")
    log.create_topic(topic, 3)
    records = served(40)
    placed = log.append(topic, records)
    assert [p for p, _ in placed] == [partition_for(r.key, 3) for r in records]
    for partition in range(3):  # offsets 0, 1, 2, ... per partition, in append order
        offsets = [o for p, o in placed if p == partition]
        assert offsets == list(range(len(offsets)))
    by_position = dict(zip(placed, records, strict=True))
    got = read_all(log, topic)
    assert len(got) == 40
    for r in got:
        assert by_position[(r.partition, r.offset)] == (r.key, r.value, r.timestamp_ms)
    assert topic in log.topics() and log.partitions(topic) == 3


def test_partitioning_is_identical_across_backends(request, tmp_path, uniq) -> None:
    topic = uniq("served")
    records = [Record(key, b"x", NOW_MS) for key in range(-50, 150)]
    placements = []
    for kind in ("local", "kafka"):
        with open_backend(kind, request, tmp_path) as log:
            log.create_topic(topic, 7)
            placements.append([p for p, _ in log.append(topic, records)])
            assert sorted(r.key for r in log.read(topic, 3, 0, 500)) == [
                r.key for r in records if partition_for(r.key, 7) == 3
            ]
    assert placements[0] == placements[1] == [partition_for(r.key, 7) for r in records]


def test_read_seeks_to_any_offset(log, uniq) -> None:
    topic = uniq("actions")
    log.create_topic(topic, 1)
    log.append(topic, served(10))
    assert [r.offset for r in log.read(topic, 0, 4, 3)] == [4, 5, 6]
    assert [r.offset for r in log.read(topic, 0, 8, 100)] == [8, 9]
    assert [r.offset for r in log.read(topic, 0, 2, 1)] == [2]  # seeking backwards
    assert log.read(topic, 0, 10) == []  # at the end: nothing yet, poll again
    log.append(topic, served(1, start=10))
    assert [r.offset for r in log.read(topic, 0, 10)] == [10]


def test_end_and_start_offsets(log, uniq) -> None:
    topic = uniq("items")
    log.create_topic(topic, 2)
    assert log.end_offsets(topic) == {0: 0, 1: 0} and log.start_offsets(topic) == {0: 0, 1: 0}
    placed = log.append(topic, served(25))
    counts = {p: sum(1 for q, _ in placed if q == p) for p in (0, 1)}
    assert log.end_offsets(topic) == counts
    assert log.start_offsets(topic) == {0: 0, 1: 0}


def test_committed_offsets_per_group(log, uniq) -> None:
    topic, a, b = uniq("served"), uniq("joiner"), uniq("trainer")
    log.create_topic(topic, 2)
    assert log.committed(a, topic) == {}
    log.commit(a, offsets={(topic, 0): 5})
    log.commit(b, offsets={(topic, 1): 2, (topic, 0): 1})
    log.commit(a, offsets={(topic, 1): 7})
    log.commit(a, offsets={(topic, 0): 6})
    assert log.committed(a, topic) == {0: 6, 1: 7}
    assert log.committed(b, topic) == {0: 1, 1: 2}


def test_commit_is_all_or_nothing(log, uniq) -> None:
    src, out, group = uniq("served"), uniq("examples"), uniq("joiner")
    log.create_topic(src, 2)
    log.create_topic(out, 2)
    log.append(src, served(4))
    examples = [Record(7, b"example-7", NOW_MS), Record(8, b"example-8", NOW_MS)]

    def outputs_then_crash():
        yield from ((out, e) for e in examples)
        raise RuntimeError("joiner crashed mid-step")

    with pytest.raises(RuntimeError, match="mid-step"):
        log.commit(group, {(src, 0): 2}, outputs_then_crash(), {(src, 0): {b"pending": b"row"}})
    # A failure after the outputs and the state changes were written: the offsets are bad.
    with pytest.raises(InvalidInput, match=r"partitions 0\.\.1"):
        log.commit(
            group, {(src, 0): 2, (src, 9): 1}, [(out, e) for e in examples], {(src, 0): {b"pending": b"row"}}
        )
    assert log.committed(group, src) == {}
    assert read_all(log, out) == []
    assert log.load_state(group, src, 0) == {}

    placed = log.commit(group, {(src, 0): 2}, [(out, e) for e in examples], {(src, 0): {b"pending": b"row"}})
    assert log.committed(group, src) == {0: 2}
    assert log.load_state(group, src, 0) == {b"pending": b"row"}
    got = {(r.partition, r.offset): r.value for r in read_all(log, out)}
    assert got == {pos: e.value for pos, e in zip(placed, examples, strict=True)}
    assert [p for p, _ in placed] == [partition_for(e.key, 2) for e in examples]


def test_state_is_restored_by_a_new_instance(log, request, tmp_path, uniq) -> None:
    src, group = uniq("served"), uniq("joiner")
    log.create_topic(src, 2)
    log.commit(
        group, {(src, 0): 3}, state_changes={(src, 0): {b"a": b"1", b"b": b"2"}, (src, 1): {b"z": b"9"}}
    )
    log.commit(group, {(src, 0): 5}, state_changes={(src, 0): {b"a": None, b"b": b"3", b"c": b"4"}})
    kind = "local" if isinstance(log, LocalEventLog) else "kafka"
    with open_backend(kind, request, tmp_path) as restarted:
        assert restarted.load_state(group, src, 0) == {b"b": b"3", b"c": b"4"}
        assert restarted.load_state(group, src, 1) == {b"z": b"9"}
        assert restarted.load_state(uniq("other-group"), src, 0) == {}
        assert restarted.committed(group, src) == {0: 5}


def test_retention_moves_the_start_offset(log, uniq) -> None:
    topic = uniq("items")
    log.create_topic(topic, 1, retention_ms=600_000)  # retention by event time
    log.append(topic, [Record(k, b"old", NOW_MS - 3_600_000) for k in range(5)])
    time.sleep(0.3)  # Kafka: the next append rolls the segment (segment.ms=100), making it deletable
    log.append(topic, [Record(k, b"new", NOW_MS) for k in range(3)])

    def start() -> dict[int, int]:
        log.cleanup()
        return log.start_offsets(topic)

    assert wait_until(start, lambda s: s == {0: 5}) == {0: 5}
    assert [(r.offset, r.value) for r in log.read(topic, 0, 0)] == [(5, b"new"), (6, b"new"), (7, b"new")]
    assert log.end_offsets(topic) == {0: 8}


def test_compaction_keeps_the_last_value_per_key(log, uniq) -> None:
    topic = uniq("state")
    log.create_topic(topic, 1, compacted=True)
    log.append(topic, [Record(i % 3, f"v{i}".encode(), NOW_MS) for i in range(30)])
    time.sleep(0.3)  # Kafka compacts closed segments only: let the next append roll this one
    log.append(topic, [Record(99, b"roll", NOW_MS)])

    def records() -> list:
        log.cleanup()
        return read_all(log, topic)

    got = wait_until(records, lambda rs: len(rs) == 4)
    assert sorted((r.key, r.value) for r in got) == [(0, b"v27"), (1, b"v28"), (2, b"v29"), (99, b"roll")]


def test_bad_input_raises_invalid_input(log, uniq) -> None:
    topic, missing, group = uniq("served"), uniq("missing"), uniq("g")
    log.create_topic(topic, 2)
    log.append(topic, served(3))
    bad_calls = [
        (lambda: log.append(missing, served(1)), "unknown topic"),
        (lambda: log.read(missing, 0, 0), "unknown topic"),
        (lambda: log.end_offsets(missing), "unknown topic"),
        (lambda: log.committed(group, missing), "unknown topic"),
        (lambda: log.read(topic, 0, -1), "non-negative"),
        (lambda: log.read(topic, 2, 0), r"partitions 0\.\.1"),
        (lambda: log.read(topic, -1, 0), r"partitions 0\.\.1"),
        (lambda: log.read(topic, 0, 1_000), "past the end"),
        (lambda: log.read(topic, 0, 0, 0), "max_records"),
        (lambda: log.create_topic(topic, 2), "already exists"),
        (lambda: log.create_topic(topic, 3, exist_ok=True), "already exists"),
        (lambda: log.create_topic(uniq("t"), 0), "partitions"),
        (lambda: log.create_topic("no spaces allowed", 1), "bad topic name"),
        (lambda: log.commit(group, {(topic, 0): -1}), "non-negative"),
        (lambda: log.commit(group, {(topic, 5): 1}), r"partitions 0\.\.1"),
        (lambda: log.commit("bad group!", {(topic, 0): 1}), "bad group name"),
        (lambda: log.commit(group, state_changes={(topic, 0): {"str": b"v"}}), "bytes"),
        (lambda: log.load_state(group, topic, 7), r"partitions 0\.\.1"),
        (lambda: log.append(topic, [Record(1, b"ok", 0), Record(2**63, b"too big", 0)]), "int64"),
        (lambda: log.append(topic, [Record(1, "not bytes", 0)]), "bytes"),
        (lambda: log.append(topic, [Record(1, b"v", -5)]), "timestamp_ms"),
    ]
    for call, message in bad_calls:
        with pytest.raises(InvalidInput, match=message):
            call()
    log.create_topic(topic, 2, exist_ok=True)  # same partition count: fine
    assert sum(log.end_offsets(topic).values()) == 3  # the half-good batch appended nothing
    assert log.committed(group, topic) == {}


def test_open_event_log_urls(tmp_path, broker) -> None:
    with open_event_log(f"sqlite:///{tmp_path}/a.db") as a, open_event_log(tmp_path / "b.db") as b:
        assert isinstance(a, LocalEventLog) and isinstance(b, LocalEventLog)
    assert (tmp_path / "a.db").is_file() and (tmp_path / "b.db").is_file()
    with open_event_log(f"{broker.url}?instance=w1") as k:
        assert isinstance(k, KafkaEventLog) and k.instance == "w1" and k.bootstrap == broker.bootstrap
    with pytest.raises(InvalidInput, match="scheme"):
        open_event_log("redis://127.0.0.1:6379")
    with pytest.raises(InvalidInput, match="does not exist"):
        open_event_log(tmp_path / "missing-dir" / "log.db")


def test_local_second_instance_reads_and_writes_the_same_file(tmp_path) -> None:
    with LocalEventLog(tmp_path / "log.db") as writer, LocalEventLog(tmp_path / "log.db") as other:
        writer.create_topic("served", 1)
        assert other.read("served", 0, 0) == []
        writer.append("served", served(3))
        assert [r.offset for r in other.read("served", 0, 0)] == [0, 1, 2]  # a poller sees new records
        other.append("served", served(2, start=3))  # a second writer queues on the lock, offsets go on
        assert [r.offset for r in writer.read("served", 0, 0)] == [0, 1, 2, 3, 4]


def test_kafka_aborted_transaction_is_invisible_to_read_committed(broker, uniq) -> None:
    out, group = uniq("examples"), uniq("joiner")
    log = KafkaEventLog(broker.bootstrap, topic_config=FAST_SEGMENTS)
    raw = Consumer(
        {
            "bootstrap.servers": broker.bootstrap,
            "group.id": uniq("raw"),
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        log.create_topic(out, 1)
        raw.assign([KafkaTopicPartition(out, 0, 0)])

        def outputs_reaching_the_broker_then_crash():
            yield out, Record(1, b"aborted", NOW_MS)
            log._tx_producers[group].flush(10)  # on the broker, inside the open transaction
            seen = wait_until(
                lambda: [m.value() for m in raw.consume(10, timeout=0.5) if not m.error()], bool
            )
            assert seen == [b"aborted"], "a read_uncommitted consumer should see the open transaction"
            raise RuntimeError("crash before commit")

        with pytest.raises(RuntimeError, match="before commit"):
            log.commit(group, outputs=outputs_reaching_the_broker_then_crash())
        log.commit(group, outputs=[(out, Record(2, b"committed", NOW_MS))])
        assert [r.value for r in log.read(out, 0, 0)] == [b"committed"]
    finally:
        raw.close()
        log.close()


def _run_until_acknowledged(script: str, args: list[str], acks_wanted: int) -> list[str]:
    """Runs `script`, SIGKILLs it once it has printed `acks_wanted` lines (it is mid-write then), and
    returns every line it printed (each one an acknowledged write)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= acks_wanted:
                break
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.readlines()  # printed before the kill: acknowledged too
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    return [line for line in lines if line.endswith("\n")]


LOCAL_WRITER = """
import sys
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import Record
log = LocalEventLog(sys.argv[1], cleanup_interval_s=None)
log.create_topic("served", 4, exist_ok=True)
batch = 0
while True:
    records = [Record(batch * 1000 + i, b"%d:%d:" % (batch, i) + b"x" * 300, 1) for i in range(200)]
    log.append("served", records)
    print(batch, flush=True)
    batch += 1
"""


def test_local_acknowledged_batches_survive_kill_9_of_the_writer(tmp_path) -> None:
    path = tmp_path / "log.db"
    acked = {int(line) for line in _run_until_acknowledged(LOCAL_WRITER, [str(path)], acks_wanted=40)}
    assert acked == set(range(len(acked)))
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with LocalEventLog(path) as log:
        records = read_all(log, "served")
        by_batch = defaultdict(set)
        for r in records:
            batch, index, _ = r.value.split(b":", 2)
            by_batch[int(batch)].add(int(index))
        assert acked <= set(by_batch), f"lost acknowledged batches {sorted(acked - set(by_batch))}"
        assert set(by_batch) <= acked | {max(acked) + 1}  # at most the batch committed as it was killed
        assert all(indices == set(range(200)) for indices in by_batch.values())  # no torn batch
        for partition, end in log.end_offsets("served").items():  # contiguous offsets, nothing half-written
            assert [r.offset for r in records if r.partition == partition] == list(range(end))


KAFKA_PRODUCER = """
import json, sys, time
from gpurec.stream.kafka import KafkaEventLog
from gpurec.stream.log import Record
log = KafkaEventLog(sys.argv[1])
seq = 0
while True:
    batch = [Record(seq + i, b"seq-%d" % (seq + i), int(time.time() * 1000)) for i in range(50)]
    placed = log.append(sys.argv[2], batch)
    print(json.dumps([[r.key, p, o] for r, (p, o) in zip(batch, placed)]), flush=True)
    seq += 50
"""


def test_kafka_acknowledged_records_survive_kill_9_of_the_producer(broker, uniq) -> None:
    topic = uniq("served")
    with KafkaEventLog(broker.bootstrap) as log:
        log.create_topic(topic, 3)
        lines = _run_until_acknowledged(KAFKA_PRODUCER, [broker.bootstrap, topic], acks_wanted=20)
        acked = [tuple(entry) for line in lines for entry in json.loads(line)]
        assert len(acked) >= 20 * 50
        stored = {(r.partition, r.offset): (r.key, r.value) for r in read_all(log, topic)}
        for key, partition, offset in acked:
            assert stored.get((partition, offset)) == (key, b"seq-%d" % key), (
                f"acknowledged record {key} lost"
            )
