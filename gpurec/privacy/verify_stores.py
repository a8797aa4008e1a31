"""The forget verifier's readers of stores: the event log (SQLite or Kafka) with the joiner's state,
any SQLite file, and a Redis feature store. A mixin of `gpurec.privacy.verify`'s search, split off
to keep each file short: it uses the search's matching and recording methods (`match`, `add`, ...).
"""

from __future__ import annotations

import re
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from gpurec.stream.joiner_state import CONSENT_PREFIX, EARLY_PREFIX, ROW_PREFIX, EarlyAction, RowState
from gpurec.stream.log import EventLog, open_event_log
from gpurec.stream.records import (
    DEAD_LETTER_SOURCES,
    Action,
    ConsentChange,
    DeadLetter,
    Example,
    ServedRow,
    decode,
)

USER_FEATURE = "user_id"  # the sparse feature whose hashed ids are the user's table keys
# Topics whose record key is the user id (gpurec.stream.join, gpurec.sync.online): their keys are
# user fields. Literal names: this module must not import the joiner's runtime.
USER_KEYED_TOPICS = ("served", "actions", "consent", "examples", "joiner.dead_letter")
TOPIC_KINDS: dict[str, type] = {"served": ServedRow, "actions": Action, "consent": ConsentChange, "examples": Example}
SQLITE_MAGIC = b"SQLite format 3\x00"
_REDIS_USER_KEY = re.compile(rb"(?:^|:)u:(-?\d+)$")
_IMP_RECORD = struct.Struct("<qq??q")  # gpurec.features.redis: an impression record starts with user_id


class StoreScans:
    """The store readers of `gpurec.privacy.verify._Search` (which provides `ws`, `searched`, `notes`,
    `match`, `match_bytes`, `user_fields`, `ints_in`, `add`, `unreadable` and `name`)."""

    def scan_sqlite(self, path: Path, kind: str = "sqlite") -> None:
        self.searched[kind] += 1
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
                for table in tables:
                    columns = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]
                    for row_number, row in enumerate(db.execute(f'SELECT * FROM "{table}"')):
                        for column, value in zip(columns, row, strict=True):
                            self._sql_value(kind, self.name(path), table, column, value, row_number)
            finally:
                db.close()
        except sqlite3.Error as err:
            self.unreadable(kind, self.name(path), err)

    def _sql_value(self, kind: str, artifact: str, table: str, column: str, value: object, row: int) -> None:
        where = f"table {table} column {column}"
        if isinstance(value, int):
            if self.match(value, "user" in column.lower()) is not None:
                self.add(kind, artifact, where, value, f"row {row}")
        elif isinstance(value, bytes | str):
            data = value.encode() if isinstance(value, str) else value
            for v, count, _ in self.match_bytes(data):
                self.add(kind, artifact, where, v, f"row {row}", count)

    def scan_event_log(self, url: str) -> None:
        local = sqlite_path(url)
        if local is not None and not local.exists():
            self.notes.append(f"no event log at {self.name(local)}")
            return
        self.searched["event_log"] += 1
        artifact = self.name(local) if local is not None else url
        try:
            with open_event_log(url) as log:
                for topic in log.topics():
                    self._topic(log, artifact, topic)
                if local is not None:
                    self._local_state(local, artifact)
                else:
                    self._kafka_state(log, artifact)
        except Exception as err:  # a log that cannot be read fails closed
            self.unreadable("event_log", artifact, err)

    def _topic(self, log: EventLog, artifact: str, topic: str) -> None:
        user_keyed = topic in USER_KEYED_TOPICS
        starts, ends = log.start_offsets(topic), log.end_offsets(topic)
        for partition in range(log.partitions(topic)):
            offset, end = starts.get(partition, 0), ends.get(partition, 0)
            while offset < end:
                # Kafka: an empty answer below the end is a transaction marker or a slow fetch; ask twice.
                batch = log.read(topic, partition, offset, 5000) or log.read(topic, partition, offset, 5000)
                if not batch:
                    break
                for rec in batch:
                    at = f"offset {rec.offset}"
                    if self.match(rec.key, user_keyed) is not None:
                        self.add("event_log", artifact, f"topic {topic}[{partition}] record key", rec.key, at)
                    for field, value, _is_user in self.record_ids(topic, rec.value):
                        self.add("event_log", artifact, f"topic {topic}[{partition}] {field}", value, at)
                offset = batch[-1].offset + 1

    def record_ids(self, topic: str, value: bytes) -> list[tuple[str, int, bool]]:
        """(field, matched id, is a user field) in one encoded record of `topic`."""
        kind = DeadLetter if topic.endswith("dead_letter") else TOPIC_KINDS.get(topic)
        try:
            if kind is None:
                raise msgspec.DecodeError("unknown topic")
            record = decode(value, kind)
        except Exception:  # undecodable: search what is there
            return self._loose(value, "value")
        # A big id outside the typed user fields (a new field, say) still shows in the bytes.
        return self._typed(record) or [("value bytes", v, False) for v, _c, _f in self.match_bytes(value)]

    def _typed(self, record: object, prefix: str = "") -> list[tuple[str, int, bool]]:
        out: list[tuple[str, int, bool]] = []
        if isinstance(record, Example):
            return self._typed(record.served, "served.")
        if isinstance(record, ServedRow | Action | ConsentChange) and self.match(record.user_id, True) is not None:
            note = " (forget request)" if isinstance(record, ConsentChange) and record.forget else ""
            out.append((f"{prefix}user_id{note}", record.user_id, True))
        if isinstance(record, ServedRow):
            for name, ids in record.model_inputs().sparse.items():
                for v in ids:
                    if self.match(v, USER_FEATURE in name) is not None:
                        out.append((f"{prefix}inputs.sparse.{name}", v, True))
        if isinstance(record, DeadLetter):
            kind = DEAD_LETTER_SOURCES.get(record.source)
            try:
                if kind is None:
                    raise msgspec.DecodeError("unknown source")
                inner = self._typed(decode(record.record, kind))
                out += [(f"dead letter {f}", v, u) for f, v, u in inner]
            except Exception:  # the payload is what arrived, maybe garbage: search its bytes
                out += self._loose(record.record, "dead letter payload", all_forms=True)
        return out

    def _loose(self, data: bytes, where: str, all_forms: bool = False) -> list[tuple[str, int, bool]]:
        """An undecodable value: a generic MessagePack walk, then its bytes for the big ids, or for
        every id when `all_forms` (a dead letter's payload is raw input of unknown shape: its decimal
        and 8-byte forms of a small id are taken as a trace, failing closed)."""
        out: list[tuple[str, int, bool]] = []
        try:
            walked = msgspec.msgpack.decode(data)
            out += [(f"{where}{p}", v, False) for p, v in self.ints_in(walked) if self.match(v, False) is not None]
        except msgspec.DecodeError:
            pass
        forms = None
        if all_forms:
            forms = [(v, [(str(v).encode(), True), (v.to_bytes(8, "little", signed=True), False), (v.to_bytes(8, "big", signed=True), False)]) for v in self.forms]
        out += [(f"{where} bytes", v, False) for v, _c, _f in self.match_bytes(data, forms)]
        out += [(f"{where} user field", v, True) for v, _o in self.user_fields(data)]
        return out

    def _state_entry(self, artifact: str, where: str, key: bytes, value: bytes) -> None:
        prefix, rest = key[:1], key[1:]
        found: list[tuple[str, int, bool]] = []
        try:
            if prefix == CONSENT_PREFIX and len(rest) == 8:
                found.append(("consent key", struct.unpack(">q", rest)[0], True))
            elif prefix == ROW_PREFIX and len(rest) == 16:
                row = msgspec.msgpack.decode(value, type=RowState)
                found.append(("row user_id", row.user_id, True))
                if row.served is not None:
                    found += [(f"row {f}", v, u) for f, v, u in self._typed(row.served)]
            elif prefix == EARLY_PREFIX and len(rest) == 16:
                for early in msgspec.msgpack.decode(value, type=list[EarlyAction]):
                    found.append(("waiting action user_id", early.action.user_id, True))
            else:
                found += self._loose(value, "value")
        except (msgspec.DecodeError, struct.error):
            found += self._loose(value, "value")
        for field, v, is_user in found:
            if self.match(v, is_user) is not None:
                self.add("joiner_state", artifact, f"{where} {field}", v)

    def _local_state(self, path: Path, artifact: str) -> None:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT s.grp, t.name, s.partition, s.key, s.value FROM state s JOIN topics t ON t.id = s.topic_id"
            ).fetchall()
        finally:
            db.close()
        self.searched["joiner_state"] += 1
        for group, topic, partition, key, value in rows:
            self._state_entry(artifact, f"state {group}/{topic}[{partition}]", bytes(key), bytes(value))

    def _kafka_state(self, log: EventLog, artifact: str) -> None:
        from gpurec.stream.kafka import STATE_PREFIX, state_topic

        # topics() hides the internal changelogs; the admin client lists them (one per group and input).
        names = log._admin.list_topics(timeout=log.timeout_s).topics  # type: ignore[attr-defined]
        user_topics = log.topics()
        for name in sorted(n for n in names if n.startswith(STATE_PREFIX)):
            rest = name[len(STATE_PREFIX) :]
            pairs = [(rest[:i], t) for i in range(1, len(rest)) for t in user_topics if state_topic(rest[:i], t) == name]
            if not pairs:
                self.unreadable("joiner_state", f"{artifact} {name}", "a state changelog of an unknown group or topic")
                continue
            group, topic = pairs[0]
            self.searched["joiner_state"] += 1
            for partition in range(log.partitions(topic)):
                for key, value in log.load_state(group, topic, partition).items():
                    self._state_entry(artifact, f"state {group}/{topic}[{partition}]", key, value)

    def scan_feature_store(self, url: str) -> None:
        local = sqlite_path(url)
        if local is not None:
            if not local.exists():
                self.notes.append(f"no feature store at {self.name(local)}")
            elif self.ws.root not in local.resolve().parents:  # inside the workspace the file walk scans it
                self.scan_sqlite(local, "feature_store")
            return
        self.searched["feature_store"] += 1
        try:
            self._redis(url)
        except Exception as err:  # any failure to read fails closed
            self.unreadable("feature_store", url, err)

    def _redis(self, url: str) -> None:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
        try:
            for key in client.scan_iter(count=1000):
                where = f"key {key.decode(errors='replace')}"
                m = _REDIS_USER_KEY.search(key)
                if m and self.match(int(m.group(1)), True) is not None:
                    self.add("feature_store", url, "key u:<id>", int(m.group(1)))
                for v, count, _f in self.match_bytes(key):
                    self.add("feature_store", url, "key name", v, where, count)
                for field, data in _redis_values(client, key):
                    if b":imp:" in key and len(data) == _IMP_RECORD.size:
                        user = _IMP_RECORD.unpack(data)[0]
                        if self.match(user, True) is not None:
                            self.add("feature_store", url, "impression record user_id", user, where)
                    for v, count, _f in self.match_bytes(field + b"\0" + data):
                        self.add("feature_store", url, "value bytes", v, where, count)
        finally:
            client.close()


def _redis_values(client: Any, key: bytes) -> Iterator[tuple[bytes, bytes]]:
    kind = client.type(key)
    if kind == b"string":
        yield b"", client.get(key) or b""
    elif kind == b"hash":
        yield from client.hgetall(key).items()
    elif kind == b"set":
        yield from ((b"", m) for m in client.smembers(key))
    elif kind == b"zset":
        yield from ((b"", m) for m in client.zrange(key, 0, -1))
    elif kind == b"list":
        yield from ((b"", m) for m in client.lrange(key, 0, -1))
    elif kind == b"stream":
        for _id, fields in client.xrange(key):
            yield from fields.items()


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL or plain path; None for a server URL (kafka://, redis://)."""
    parts = urlsplit(str(url))
    if parts.scheme == "sqlite":
        return Path(parts.path[1:])
    if parts.scheme and len(parts.scheme) > 1:
        return None
    return Path(url)


def is_sqlite(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except OSError:
        return False
