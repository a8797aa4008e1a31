"""The event log's interface: Kafka's model (topics, fixed partitions, offsets, consumer groups)
with one extra promise, an atomic consume-transform-produce `commit`.

Two backends implement it and pass the same contract tests (tests/test_event_log.py):
`gpurec.stream.local.LocalEventLog` (SQLite in WAL mode, the embedded default) and
`gpurec.stream.kafka.KafkaEventLog` (any Kafka-protocol broker, through confluent-kafka).
`open_event_log(url)` picks one from a URL.

What both promise:
- A record is (key: int64, value: bytes, timestamp_ms: event time). The log picks its partition
  from the key with `partition_for`, the same function on both backends, so a user's events land in
  the same partition whichever backend holds them.
- `append` returns the (partition, offset) of each record once all of them are durable.
- `read` returns committed records only (Kafka: `isolation.level=read_committed`). Offsets grow
  but need not be contiguous: Kafka spends offsets on transaction markers and compaction leaves
  gaps, so readers continue from the last returned offset + 1, never from a count.
- `commit(group, offsets, outputs, state_changes)` makes the group's next offsets, its output
  records and its state changes visible together or not at all.
- Retention goes by event time (the record's timestamp, Kafka's CreateTime): from the start of a
  partition, records whose timestamp is older than now - retention_ms are deleted and the start
  offset moves past them; deletion stops at the first younger record, as Kafka's segment retention
  does. Compacted topics keep at least the latest record of each key.
"""

from __future__ import annotations

import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlsplit

from gpurec.data.hashing_core import splitmix64
from gpurec.errors import GpurecError, InvalidInput

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT64_MASK = (1 << 64) - 1
# Kafka's legal topic characters, shortened so that a state changelog name built from a group and a
# topic (see kafka.py) stays under Kafka's 249-character limit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class EraseUnsupported(GpurecError):
    """The backend cannot delete single records (Kafka): they go when retention expires them."""


class Record(NamedTuple):
    """One event to append: `key` is an int64 (the user id, say), `timestamp_ms` its event time."""

    key: int
    value: bytes
    timestamp_ms: int


class StoredRecord(NamedTuple):
    """A record as read back, with where it lives."""

    partition: int
    offset: int
    key: int
    value: bytes
    timestamp_ms: int


TopicPartition = tuple[str, int]
# Per input (topic, partition): state key -> new value, or None to delete the key.
StateChanges = Mapping[TopicPartition, Mapping[bytes, bytes | None]]


def partition_for(key: int, partitions: int) -> int:
    """The partition of a record with `key` in a topic of `partitions` partitions.

    splitmix64 of the key's 64 bits, modulo the partition count: stable across processes, Python
    versions and backends (Python's `hash()` is salted per process; Kafka's default murmur2
    partitioner hashes the serialised key and exists only on the Kafka side).
    """
    return splitmix64(key & _UINT64_MASK) % partitions


def check_name(name: object, what: str) -> str:
    """A topic or group name, or InvalidInput saying which characters are allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInput(
            f"bad {what} name {name!r}: use 1-100 of the characters A-Z a-z 0-9 . _ -,"
            " not starting with . _ or -"
        )
    return name


def check_record(record: object) -> Record:
    """`record` as a Record, or InvalidInput naming the field that is wrong."""
    if type(record) is Record:  # the common case, checked with exact types: this runs per record
        key, value, ts = record
        exact = type(key) is int and type(value) is bytes and type(ts) is int
        if exact and INT64_MIN <= key <= INT64_MAX and 0 <= ts <= INT64_MAX:
            return record
    if not isinstance(record, tuple) or len(record) != 3:
        raise InvalidInput(f"a record is (key, value, timestamp_ms), got {record!r:.80}")
    key, value, ts = record
    if not isinstance(key, numbers.Integral) or isinstance(key, bool) or not INT64_MIN <= key <= INT64_MAX:
        raise InvalidInput(f"record key must be an int64, got {key!r:.40}")
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidInput(f"record value must be bytes, got {type(value).__name__}")
    if not isinstance(ts, numbers.Integral) or isinstance(ts, bool) or not 0 <= ts <= INT64_MAX:
        raise InvalidInput(f"record timestamp_ms must be a non-negative int, got {ts!r:.40}")
    return Record(int(key), bytes(value), int(ts))


def check_offset(offset: object, what: str = "offset") -> int:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidInput(f"{what} must be a non-negative int, got {offset!r:.40}")
    return offset


def check_partition(topic: str, partition: object, partitions: int) -> int:
    if not isinstance(partition, int) or isinstance(partition, bool) or not 0 <= partition < partitions:
        raise InvalidInput(
            f"topic {topic!r} has partitions 0..{partitions - 1}, got partition {partition!r:.40}"
        )
    return partition


def check_state_entry(key: object, value: object) -> None:
    if not isinstance(key, bytes):
        raise InvalidInput(f"state keys must be bytes, got {type(key).__name__}")
    if value is not None and not isinstance(value, bytes):
        raise InvalidInput(f"state values must be bytes (or None to delete), got {type(value).__name__}")


def check_topic_spec(name: str, partitions: object, retention_ms: object) -> None:
    check_name(name, "topic")
    if not isinstance(partitions, int) or isinstance(partitions, bool) or not 1 <= partitions <= 10_000:
        raise InvalidInput(f"topic {name!r}: partitions must be an int in 1..10000, got {partitions!r:.40}")
    if retention_ms is not None and (not isinstance(retention_ms, int) or retention_ms <= 0):
        raise InvalidInput(
            f"topic {name!r}: retention_ms must be a positive int or None, got {retention_ms!r:.40}"
        )


class EventLog(ABC):
    """Named topics of append-only partitions, consumer-group offsets and per-partition state."""

    # What retention windows are measured back from when the backend applies them itself: "event"
    # (the topic's newest event time, local) or "wall" (the broker's clock, Kafka).
    retention_clock: str = "event"

    @abstractmethod
    def create_topic(
        self,
        name: str,
        partitions: int,
        retention_ms: int | None = None,
        compacted: bool = False,
        *,
        exist_ok: bool = False,
    ) -> None:
        """Create a topic. An existing one raises InvalidInput unless `exist_ok` and it has the same
        partition count."""

    @abstractmethod
    def topics(self) -> list[str]:
        """The user topics, sorted (internal topics such as state changelogs are hidden)."""

    @abstractmethod
    def partitions(self, topic: str) -> int:
        """The partition count of `topic`."""

    @abstractmethod
    def append(self, topic: str, records: Iterable[Record]) -> list[tuple[int, int]]:
        """Append `records` (one transaction or flush for the batch); returns each one's
        (partition, offset), in order, once all are durable."""

    @abstractmethod
    def read(self, topic: str, partition: int, offset: int, max_records: int = 1000) -> list[StoredRecord]:
        """Up to `max_records` committed records of one partition from `offset` on (an offset below
        the start offset reads from the start; an offset past the end offset is InvalidInput; at
        the end offset it returns [] at once: readers poll)."""

    @abstractmethod
    def end_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the offset after the last committed record."""

    @abstractmethod
    def start_offsets(self, topic: str) -> dict[int, int]:
        """Per partition, the first offset still held (moves with retention)."""

    @abstractmethod
    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed next offset per partition of `topic` (partitions never committed
        are absent)."""

    @abstractmethod
    def commit(
        self,
        group: str,
        offsets: Mapping[TopicPartition, int] | None = None,
        outputs: Iterable[tuple[str, Record]] = (),
        state_changes: StateChanges | None = None,
    ) -> list[tuple[int, int]]:
        """Atomically: set the group's next offsets, append the output records (partitioned by
        key), apply the state changes. If anything raises, none of it becomes visible. Returns the
        outputs' (partition, offset)."""

    @abstractmethod
    def load_state(self, group: str, topic: str, partition: int) -> dict[bytes, bytes]:
        """The group's state for one input partition, as of its last commit."""

    @abstractmethod
    def cleanup(self, now_ms: int | None = None) -> None:
        """Apply retention and compaction now where the backend does it itself (local); a Kafka
        broker does both on its own schedule, so there this only returns."""

    def set_retention(self, topic: str, retention_ms: int | None) -> None:
        """Change an existing topic's retention (None: keep forever); the next cleanup (the local
        backend) or the broker's next pass (Kafka) applies it. `gpurec retention` uses this to put
        a workspace's configured windows on topics created before them."""
        raise NotImplementedError(f"{type(self).__name__} cannot change a topic's retention")

    def erase(
        self,
        key: int,
        scan: Mapping[str, Callable[[bytes], bool]] | None = None,
        state_keys: Iterable[bytes] = (),
    ) -> dict[str, int]:
        """Delete one user's records from every topic (an erasure request): every record with `key`,
        the records of the topics in `scan` (topics not keyed by user, e.g. dead letters) whose value
        the topic's predicate matches, and the state entries named in `state_keys` (of any group).
        Returns the deleted counts by topic (and "state"). Offsets of deleted records become gaps,
        as compaction leaves them.

        A Kafka broker cannot delete single records: there the records expire with the topic's
        retention (`EraseUnsupported` says when)."""
        raise EraseUnsupported(f"{type(self).__name__} cannot delete single records")

    @abstractmethod
    def close(self) -> None:
        """Release connections and producers (idempotent)."""

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_event_log(url: str | Path, **options: Any) -> EventLog:
    """An event log from a URL.

    - `sqlite:///relative/log.db`, `sqlite:////absolute/log.db` (SQLAlchemy's convention) or a plain
      path: the local SQLite log (options: `synchronous="FULL"` to survive power loss).
    - `kafka://host:port[,host:port...]`: the Kafka backend (options: see KafkaEventLog).

    URL query parameters become options too: `sqlite:///log.db?synchronous=FULL`.
    """
    text = str(url)
    parts = urlsplit(text)
    query = dict(parse_qsl(parts.query))
    if parts.scheme == "kafka":
        from gpurec.stream.kafka import KafkaEventLog

        if not parts.netloc:
            raise InvalidInput(f"kafka URL needs host:port, got {text!r}")
        return KafkaEventLog(parts.netloc, **query, **options)
    from gpurec.stream.local import LocalEventLog

    if parts.scheme == "sqlite":
        if not text.startswith("sqlite:///") or not parts.path[1:]:
            raise InvalidInput(f"sqlite URL must look like sqlite:///path/to/log.db, got {text!r}")
        return LocalEventLog(parts.path[1:], **query, **options)
    if parts.scheme and len(parts.scheme) > 1:  # one letter would be a Windows drive
        raise InvalidInput(
            f"unknown event log URL scheme {parts.scheme!r} in {text!r}: use sqlite:/// or kafka://"
        )
    return LocalEventLog(text, **options)
