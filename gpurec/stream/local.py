"""The embedded event log: one SQLite file in WAL mode (stdlib sqlite3), the default backend.

- One writer at a time: every write is `BEGIN IMMEDIATE` (takes the write lock up front, so two
  writers queue on the busy timeout instead of failing half-way); any number of processes read
  at once, and readers never block the writer (WAL).
- `append` and `commit` are one transaction each. With `synchronous=NORMAL` (the default) a
  committed transaction survives a crash or kill -9 of the process; after a power loss or OS crash
  the last transactions may be rolled back, the file stays consistent. `synchronous="FULL"` fsyncs
  each commit and survives power loss too, at some throughput.
- No notifications: readers poll `read` / `end_offsets`.
- Retention and compaction run in `cleanup()`, which `append`/`commit` also call every
  `cleanup_interval_s` seconds. Retention goes by event time, as in log.py; the automatic runs
  measure it from each topic's newest event time (capped by the wall clock), so a simulated
  world whose clock runs in the past keeps its windows (see `cleanup`).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from gpurec.errors import InvalidInput
from gpurec.stream.log import (
    EventLog,
    Record,
    StateChanges,
    StoredRecord,
    TopicPartition,
    check_name,
    check_offset,
    check_partition,
    check_record,
    check_state_entry,
    check_topic_spec,
    partition_for,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS topics(
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, partitions INTEGER NOT NULL,
    retention_ms INTEGER, compacted INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS partitions(
    topic_id INTEGER NOT NULL, partition INTEGER NOT NULL,
    start_offset INTEGER NOT NULL, end_offset INTEGER NOT NULL,
    PRIMARY KEY(topic_id, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS records(
    topic_id INTEGER NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
    key INTEGER NOT NULL, ts INTEGER NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(topic_id, partition, offset));
CREATE TABLE IF NOT EXISTS group_offsets(
    grp TEXT NOT NULL, topic_id INTEGER NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY(grp, topic_id, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state(
    grp TEXT NOT NULL, topic_id INTEGER NOT NULL, partition INTEGER NOT NULL, key BLOB NOT NULL,
    value BLOB NOT NULL, PRIMARY KEY(grp, topic_id, partition, key)) WITHOUT ROWID;
"""


class _Topic:
    __slots__ = ("compacted", "id", "name", "partitions", "retention_ms")

    def __init__(self, id: int, name: str, partitions: int, retention_ms: int | None, compacted: bool):
        self.id, self.name, self.partitions = id, name, partitions
        self.retention_ms, self.compacted = retention_ms, compacted


class LocalEventLog(EventLog):
    """The event log in one SQLite file (created if missing). One instance per process or thread
    pool; instances in other processes may read and write the same file."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = 30.0,
        cleanup_interval_s: float | None = 60.0,
    ):
        if str(synchronous).upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise InvalidInput(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise InvalidInput(f"event log directory {self.path.parent} does not exist")
        # isolation_level=None: sqlite3 leaves transactions to us (explicit BEGIN IMMEDIATE).
        self._db = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={str(synchronous).upper()}")
        # What retention, compaction and erasure delete is overwritten, not left readable in free pages.
        self._db.execute("PRAGMA secure_delete=ON")
        with self._write() as db:
            for statement in _SCHEMA.split(";"):  # executescript would commit our transaction first
                if statement.strip():
                    db.execute(statement)
        self._topics: dict[str, _Topic] = {}
        self._cleanup_interval_s = cleanup_interval_s
        self._last_cleanup = time.monotonic()
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside commits together or rolls back on any error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also when COMMIT itself failed (disk full, I/O error)
                    self._db.execute("ROLLBACK")
                raise

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            check_name(name, "topic")
            row = self._db.execute(
                "SELECT id, name, partitions, retention_ms, compacted FROM topics WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                raise InvalidInput(f"unknown topic {name!r} (create it first; existing: {self.topics()})")
            topic = self._topics[name] = _Topic(row[0], row[1], row[2], row[3], bool(row[4]))
        return topic

    def _maybe_cleanup(self) -> None:
        if (
            self._cleanup_interval_s is not None
            and time.monotonic() - self._last_cleanup >= self._cleanup_interval_s
        ):
            self.cleanup()

    # -- topics -----------------------------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int,
        retention_ms: int | None = None,
        compacted: bool = False,
        *,
        exist_ok: bool = False,
    ) -> None:
        check_topic_spec(name, partitions, retention_ms)
        with self._write() as db:
            row = db.execute("SELECT partitions FROM topics WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if exist_ok and row[0] == partitions:
                    return
                raise InvalidInput(f"topic {name!r} already exists with {row[0]} partitions")
            topic_id = db.execute(
                "INSERT INTO topics(name, partitions, retention_ms, compacted) VALUES (?, ?, ?, ?)",
                (name, partitions, retention_ms, int(compacted)),
            ).lastrowid
            db.executemany(
                "INSERT INTO partitions VALUES (?, ?, 0, 0)", [(topic_id, p) for p in range(partitions)]
            )

    def topics(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT name FROM topics ORDER BY name")]

    def partitions(self, topic: str) -> int:
        with self._lock:
            return self._topic(topic).partitions

    # -- records ----------------------------------------------------------------------------------

    def _append_in(
        self, db: sqlite3.Connection, items: Iterable[tuple[str, object]]
    ) -> list[tuple[int, int]]:
        """Insert (topic, record) pairs inside the caller's transaction; returns their positions."""
        ends: dict[tuple[int, int], int] = {}
        rows: list[tuple[int, int, int, int, int, bytes]] = []
        placed: list[tuple[int, int]] = []
        for topic_name, raw in items:
            topic = self._topic(topic_name)
            key, value, ts = check_record(raw)
            partition = partition_for(key, topic.partitions)
            tp = (topic.id, partition)
            offset = ends.get(tp)
            if offset is None:
                offset = db.execute(
                    "SELECT end_offset FROM partitions WHERE topic_id = ? AND partition = ?", tp
                ).fetchone()[0]
            ends[tp] = offset + 1
            rows.append((topic.id, partition, offset, key, ts, value))
            placed.append((partition, offset))
        db.executemany("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)", rows)
        db.executemany(
            "UPDATE partitions SET end_offset = ? WHERE topic_id = ? AND partition = ?",
            [(end, tid, p) for (tid, p), end in ends.items()],
        )
        return placed

    def append(self, topic: str, records: Iterable[Record]) -> list[tuple[int, int]]:
        with self._write() as db:
            self._topic(topic)  # an unknown topic fails even for an empty batch
            placed = self._append_in(db, ((topic, r) for r in records))
        self._maybe_cleanup()
        return placed

    def read(self, topic: str, partition: int, offset: int, max_records: int = 1000) -> list[StoredRecord]:
        with self._lock:
            t = self._topic(topic)
            check_partition(topic, partition, t.partitions)
            check_offset(offset)
            if not isinstance(max_records, int) or max_records < 1:
                raise InvalidInput(f"max_records must be a positive int, got {max_records!r}")
            rows = self._db.execute(
                "SELECT offset, key, value, ts FROM records"
                " WHERE topic_id = ? AND partition = ? AND offset >= ?"
                " ORDER BY offset LIMIT ?",
                (t.id, partition, offset, max_records),
            ).fetchall()
            if not rows:  # only an empty answer needs to know where the end is
                end = self._end_offsets(t)[partition]
                if offset > end:
                    raise InvalidInput(
                        f"offset {offset} is past the end ({end}) of {topic!r} partition {partition}"
                    )
        return [StoredRecord(partition, o, k, v, ts) for o, k, v, ts in rows]

    def _end_offsets(self, t: _Topic) -> dict[int, int]:
        return dict(
            self._db.execute("SELECT partition, end_offset FROM partitions WHERE topic_id = ?", (t.id,))
        )

    def end_offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            return self._end_offsets(self._topic(topic))

    def start_offsets(self, topic: str) -> dict[int, int]:
        with self._lock:
            t = self._topic(topic)
            return dict(
                self._db.execute("SELECT partition, start_offset FROM partitions WHERE topic_id = ?", (t.id,))
            )

    # -- groups -----------------------------------------------------------------------------------

    def committed(self, group: str, topic: str) -> dict[int, int]:
        check_name(group, "group")
        with self._lock:
            t = self._topic(topic)
            return dict(
                self._db.execute(
                    "SELECT partition, next_offset FROM group_offsets WHERE grp = ? AND topic_id = ?",
                    (group, t.id),
                )
            )

    def commit(
        self,
        group: str,
        offsets: Mapping[TopicPartition, int] | None = None,
        outputs: Iterable[tuple[str, Record]] = (),
        state_changes: StateChanges | None = None,
    ) -> list[tuple[int, int]]:
        check_name(group, "group")
        with self._write() as db:
            placed = self._append_in(db, outputs)
            for (topic, partition), changes in (state_changes or {}).items():
                t = self._topic(topic)
                check_partition(topic, partition, t.partitions)
                deletes, upserts = [], []
                for key, value in changes.items():
                    check_state_entry(key, value)
                    if value is None:
                        deletes.append((group, t.id, partition, key))
                    else:
                        upserts.append((group, t.id, partition, key, value))
                # One statement per kind, not per entry: a joiner step changes thousands of entries.
                db.executemany(
                    "DELETE FROM state WHERE grp = ? AND topic_id = ? AND partition = ? AND key = ?", deletes
                )
                db.executemany("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?)", upserts)
            for (topic, partition), next_offset in (offsets or {}).items():
                t = self._topic(topic)
                check_partition(topic, partition, t.partitions)
                check_offset(next_offset, "committed offset")
                db.execute(
                    "INSERT OR REPLACE INTO group_offsets VALUES (?, ?, ?, ?)",
                    (group, t.id, partition, next_offset),
                )
        self._maybe_cleanup()
        return placed

    def load_state(self, group: str, topic: str, partition: int) -> dict[bytes, bytes]:
        check_name(group, "group")
        with self._lock:
            t = self._topic(topic)
            check_partition(topic, partition, t.partitions)
            return dict(
                self._db.execute(
                    "SELECT key, value FROM state WHERE grp = ? AND topic_id = ? AND partition = ?",
                    (group, t.id, partition),
                )
            )

    # -- retention and compaction -----------------------------------------------------------------

    def set_retention(self, topic: str, retention_ms: int | None) -> None:
        with self._lock:
            t = self._topic(topic)  # InvalidInput for an unknown topic
        check_topic_spec(topic, t.partitions, retention_ms)
        with self._write() as db:
            db.execute("UPDATE topics SET retention_ms = ? WHERE id = ?", (retention_ms, t.id))
        t.retention_ms = retention_ms

    def cleanup(self, now_ms: int | None = None) -> None:
        """Without `now_ms`, each topic's retention is measured from its newest event time, capped by
        the wall clock: a simulated world's event time runs months behind the wall clock (measured
        from the wall clock, a 7-day window would expire every record a minute after it was
        written), and the cap keeps one bogus future timestamp from expiring a whole topic."""
        wall_ms = int(time.time() * 1000)
        self._last_cleanup = time.monotonic()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, partitions, retention_ms, compacted FROM topics"
                " WHERE retention_ms IS NOT NULL OR compacted"
            ).fetchall()
        for topic_id, partitions, retention_ms, compacted in rows:
            topic_now = now_ms if now_ms is not None else min(wall_ms, self._newest_ts(topic_id, partitions, wall_ms))
            for partition in range(partitions):  # one short transaction per partition: writers interleave
                with self._write() as db:
                    if retention_ms is not None:
                        self._retain(db, topic_id, partition, topic_now - retention_ms)
                    if compacted:
                        # Keep the newest record of each key; older ones become gaps in the offsets.
                        db.execute(
                            "DELETE FROM records WHERE topic_id = ?1 AND partition = ?2 AND offset NOT IN"
                            " (SELECT MAX(offset) FROM records"
                            " WHERE topic_id = ?1 AND partition = ?2 GROUP BY key)",
                            (topic_id, partition),
                        )

    def _newest_ts(self, topic_id: int, partitions: int, default: int, tail: int = 64) -> int:
        """The newest timestamp among the last `tail` records of each partition (the offset index
        finds them; records are nearly in event-time order), `default` for an empty topic."""
        newest = None
        with self._lock:
            for partition in range(partitions):
                (found,) = self._db.execute(
                    "SELECT MAX(ts) FROM (SELECT ts FROM records WHERE topic_id = ? AND partition = ?"
                    " ORDER BY offset DESC LIMIT ?)",
                    (topic_id, partition, tail),
                ).fetchone()
                if found is not None:
                    newest = found if newest is None else max(newest, found)
        return default if newest is None else newest

    @staticmethod
    def _retain(db: sqlite3.Connection, topic_id: int, partition: int, cutoff_ms: int) -> None:
        # Walks the partition in offset order and stops at the first record young enough to keep.
        row = db.execute(
            "SELECT offset FROM records WHERE topic_id = ? AND partition = ? AND ts >= ?"
            " ORDER BY offset LIMIT 1",
            (topic_id, partition, cutoff_ms),
        ).fetchone()
        if row is None:
            new_start = db.execute(
                "SELECT end_offset FROM partitions WHERE topic_id = ? AND partition = ?",
                (topic_id, partition),
            ).fetchone()[0]
        else:
            new_start = row[0]
        db.execute(
            "DELETE FROM records WHERE topic_id = ? AND partition = ? AND offset < ?",
            (topic_id, partition, new_start),
        )
        db.execute(
            "UPDATE partitions SET start_offset = MAX(start_offset, ?) WHERE topic_id = ? AND partition = ?",
            (new_start, topic_id, partition),
        )

    # -- erasure ----------------------------------------------------------------------------------

    def erase(
        self,
        key: int,
        scan: Mapping[str, Callable[[bytes], bool]] | None = None,
        state_keys: Iterable[bytes] = (),
    ) -> dict[str, int]:
        deleted: dict[str, int] = {}
        with self._write() as db:
            for topic_id, name in db.execute("SELECT id, name FROM topics").fetchall():
                count = db.execute("DELETE FROM records WHERE topic_id = ? AND key = ?", (topic_id, key)).rowcount
                matches = (scan or {}).get(name)
                if matches is not None:
                    doomed = [
                        (topic_id, partition, offset)
                        for partition, offset, value in db.execute(
                            "SELECT partition, offset, value FROM records WHERE topic_id = ?", (topic_id,)
                        )
                        if matches(bytes(value))
                    ]
                    db.executemany("DELETE FROM records WHERE topic_id = ? AND partition = ? AND offset = ?", doomed)
                    count += len(doomed)
                if count:
                    deleted[name] = count
            states = sum(db.execute("DELETE FROM state WHERE key = ?", (k,)).rowcount for k in state_keys)
            if states:
                deleted["state"] = states
        with self._lock:
            # Older copies of the rows can sit in the free space of pages that page splits left
            # behind, which secure_delete never sees: VACUUM rewrites the file from the live rows.
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()
