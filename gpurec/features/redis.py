"""The production online store on Redis: a hash per user and per item, counters moved by HINCRBY.

Keys (under `prefix`, default ``gpurec:``): ``u:<user_id>`` and ``i:<item_id>`` hashes with the
fields ``c:<count>`` (counters, decimal for HINCRBY), ``row`` (the row's integer columns,
`TableLayout.numeric_columns`: dense dimension values, single-valued sparse ids, consent flags,
packed as little-endian int64) and ``s_<feature>`` per multi-valued feature (int64 bytes);
``imp:<day>`` / ``pend:<day>`` hashes of the impression records and pending actions of one UTC
day, field = (request_id, item_id) packed, so a whole day is dropped with one UNLINK once no
action can join it (``days``: the sorted set of days held); ``meta`` (layout fingerprint, newest
event day).

A read is one round trip and one consistent snapshot: a Lua script (EVALSHA) that runs HMGET on
the user and every candidate. Measured with 300 candidates: 0.9 ms p50 against 2.6 ms for the same
HMGETs in a pipeline (MULTI or not), all of the difference being redis-py packing and parsing 301
commands; packing a row's integers into one field cut the parsing further.

A write is three round trips whatever its size: WATCH the day buckets it touches, read what it
needs in one pipeline, then one MULTI/EXEC with every HINCRBY and HSET, so a batch applies whole
or not at all; if another writer changed a watched bucket in between, the
batch is planned again (several writers are safe, one is the expected setup: the joiner). The
counting rules are `gpurec.features.events`, shared with the SQLite backend.

Redis is not durable by default: run it with ``--appendonly yes`` (see NOTES: entries survive a
kill -9), or rebuild the store by replaying the event log.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import redis

from gpurec.data.schema import MS_PER_DAY
from gpurec.errors import GpurecError, InvalidInput
from gpurec.features.events import (
    Actions,
    Batch,
    Changes,
    ImpressionRecord,
    Impressions,
    Key,
    PendingAction,
    State,
    plan_actions,
    plan_impressions,
    retention_cutoff_day,
)
from gpurec.features.layout import Layout, TableLayout
from gpurec.features.rows import StoredRows, assemble, dimension_rows
from gpurec.features.store import FeatureRows, OnlineFeatureStore, WriteResult
from gpurec.preprocess.counters import COUNTS

_KEY = struct.Struct("<qq")  # (request_id, item_id)
_RECORD = struct.Struct("<qq??q")  # user_id, ts_ms, like, finish, action_ms (NO_ACTION: none)
_PENDING = struct.Struct("<qq?")  # ts_ms, watch_ms, like
NO_ACTION = -(2**63)
COUNTER_FIELDS = tuple(f"c:{c}".encode() for c in COUNTS)
ROW_FIELD = b"row"
MAX_WATCH_RETRIES = 20
# KEYS: the user's hash, then the candidates'; ARGV: the number of user fields, the user fields, the
# item fields. Returns every HMGET reply, flattened (a missing field or hash: nil).
READ_SCRIPT = """
local user_fields, item_fields = {}, {}
local n_user = tonumber(ARGV[1])
for i = 2, n_user + 1 do user_fields[#user_fields + 1] = ARGV[i] end
for i = n_user + 2, #ARGV do item_fields[#item_fields + 1] = ARGV[i] end
local out, n = {}, 0
for i = 1, #KEYS do
  local values = redis.call('HMGET', KEYS[i], unpack(i == 1 and user_fields or item_fields))
  for j = 1, #values do n = n + 1; out[n] = values[j] end
end
return out
"""


def _fields(t: TableLayout) -> list[bytes]:
    """Fields a read fetches: counters, the packed integer row, the multi-valued ids."""
    return [*COUNTER_FIELDS, ROW_FIELD, *(c.encode() for c in t.blob_columns)]


def _numeric(t: TableLayout, row: bytes | None, column: str) -> int | None:
    """One integer column of a packed row (None: no row)."""
    return None if row is None else int(np.frombuffer(row, "<i8")[t.numeric_columns.index(column)])


class RedisFeatureStore(OnlineFeatureStore):
    """`OnlineFeatureStore` on a Redis server (``redis://host:port/db``); thread-safe."""

    def __init__(self, url: str, prefix: str = "gpurec:", timeout_s: float = 5.0) -> None:
        self.layout = Layout.from_features()
        self.prefix = prefix
        try:
            self._redis = redis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        except ValueError as err:
            raise InvalidInput(f"feature store URL {url!r}: {err}") from err
        self._fields = {t.name: _fields(t) for t in (self.layout.users, self.layout.items)}
        self._read_script = self._redis.register_script(READ_SCRIPT)
        self._read_args = [len(self._fields["users"]), *self._fields["users"], *self._fields["items"]]
        meta = self._key("meta")
        try:
            self._redis.hsetnx(meta, "layout", self.layout.fingerprint)
            self._redis.hsetnx(meta, "forget_salt", os.urandom(16).hex())
        except redis.ConnectionError as err:
            raise GpurecError(f"feature store {url}: cannot reach redis ({err})") from err
        self._salt = bytes.fromhex(self._redis.hget(meta, "forget_salt").decode())
        stored = self._redis.hget(meta, "layout").decode()
        if stored != self.layout.fingerprint:
            raise InvalidInput(
                f"feature store {url} ({prefix}*) was built for another feature list (layout {stored}, this gpurec"
                f" {self.layout.fingerprint}): rebuild it by replaying the logs under a new prefix or database"
            )

    def _key(self, *parts: object) -> bytes:
        return (self.prefix + ":".join(map(str, parts))).encode()

    def _row_key(self, table: TableLayout, key: int) -> bytes:
        return self._key("u" if table.name == "users" else "i", key)

    # --- dimension rows --------------------------------------------------------------------------

    def _put(self, table: TableLayout, data: Batch) -> WriteResult:
        rows = dimension_rows(table, data)
        pipe = self._redis.pipeline(transaction=True)
        packed = rows.numeric.astype("<i8")
        denied: set[bytes] = set()
        if table.name == "users":
            denied = set(self._redis.smembers(self._key("forgotten")))
        refused = 0
        for i, key in enumerate(rows.keys):
            if denied and self.forget_digest(key) in denied:
                refused += 1
                continue
            mapping = {
                ROW_FIELD: packed[i].tobytes(),
                **{c.encode(): rows.blobs[c][i] for c in table.blob_columns},
            }
            pipe.hset(self._row_key(table, key), mapping=mapping)
        pipe.execute()
        return WriteResult(len(rows), {"applied": len(rows) - refused, **({"forgotten": refused} if refused else {})})

    def _forget_salt(self) -> bytes:
        return self._salt

    def _forget(self, user_id: int, digest: bytes) -> dict[str, int]:
        """Delete the user's hash and their impression records (a scan of the day buckets: rare), then
        deny-list the digest, in one MULTI/EXEC."""
        doomed: dict[bytes, list[bytes]] = {}
        for day in self._redis.zrange(self._key("days"), 0, -1):
            bucket = self._key("imp", int(day))
            fields = [f for f, record in self._redis.hgetall(bucket).items() if _RECORD.unpack(record)[0] == user_id]
            if fields:
                doomed[bucket] = fields
        pipe = self._redis.pipeline(transaction=True)
        pipe.unlink(self._key("u", user_id))
        for bucket, fields in doomed.items():
            pipe.hdel(bucket, *fields)
        pipe.sadd(self._key("forgotten"), digest)
        profiles = pipe.execute()[0]
        return {"profiles": int(profiles), "impressions": sum(len(f) for f in doomed.values())}

    def put_users(self, users: Batch) -> WriteResult:
        return self._put(self.layout.users, users)

    def put_items(self, items: Batch) -> WriteResult:
        return self._put(self.layout.items, items)

    # --- events ----------------------------------------------------------------------------------

    def _lookups(self, batch: Impressions | Actions) -> tuple[dict[int, list[Key]], dict[int, list[Key]]]:
        """Which day buckets to search for each key's impression record and pending action.

        An impression's record is in its own day; its action may be on that day or the next (the
        join window), so impressions look for pending actions in days d and d + 1, and actions
        for records in days d - 1, d and d + 1 (d + 1: an action before its impression's day,
        which the window then refuses, as batch does).
        """
        records: dict[int, list[Key]] = defaultdict(list)
        pending: dict[int, list[Key]] = defaultdict(list)
        days = (batch.ts_ms // MS_PER_DAY).tolist()
        for key, day in zip(
            zip(batch.request_id.tolist(), batch.item_id.tolist(), strict=True), days, strict=True
        ):
            if isinstance(batch, Impressions):
                records[day].append(key)
                pending[day].append(key)
                pending[day + 1].append(key)
            else:
                for d in (day - 1, day, day + 1):
                    records[d].append(key)
                pending[day].append(key)
        return records, pending

    def _load(
        self, batch: Impressions | Actions, records: dict[int, list[Key]], pending: dict[int, list[Key]]
    ) -> State:
        reads = self._redis.pipeline(transaction=False)
        users = np.unique(batch.user_id).tolist() if isinstance(batch, Impressions) else []
        items = np.unique(batch.item_id).tolist()
        for uid in users:
            reads.hget(self._key("u", uid), ROW_FIELD)
        for iid in items:
            reads.hget(self._key("i", iid), ROW_FIELD)
        for bucket, lookups in (("imp", records), ("pend", pending)):
            for day, keys in lookups.items():
                reads.hmget(self._key(bucket, day), [_KEY.pack(*k) for k in keys])
        results = iter(reads.execute())
        state = State()
        for uid in users:
            value = _numeric(self.layout.users, next(results), "consent_training")
            if value is not None:
                state.consent_training[uid] = bool(value)
        for iid in items:
            value = _numeric(self.layout.items, next(results), "d_duration_ms")
            if value is not None:
                state.duration_ms[iid] = value
        for keys in records.values():
            for key, value in zip(keys, next(results), strict=True):
                if value is not None:
                    uid, ts, like, finish, action_ms = _RECORD.unpack(value)
                    state.impressions[key] = ImpressionRecord(
                        uid, ts, like, finish, None if action_ms == NO_ACTION else action_ms
                    )
        for keys in pending.values():
            for key, value in zip(keys, next(results), strict=True):
                if value is not None:
                    waiting = PendingAction(*_PENDING.unpack(value))
                    if key not in state.pending or waiting.ts_ms > state.pending[key].ts_ms:
                        state.pending[key] = waiting
        return state

    def _queue(
        self, pipe: redis.client.Pipeline, changes: Changes, resolved: Iterable[tuple[Key, int]]
    ) -> set[int]:
        """Queue the batch's writes on `pipe` (in MULTI); returns the day buckets written."""
        for table, deltas in ((self.layout.users, changes.users), (self.layout.items, changes.items)):
            for key, delta in deltas.items():
                for field, amount in zip(COUNTER_FIELDS, delta, strict=True):
                    if amount:
                        pipe.hincrby(self._row_key(table, key), field, amount)
        days: set[int] = set()
        by_day: dict[int, dict[bytes, bytes]] = defaultdict(dict)
        for key, r in changes.impressions.items():
            action_ms = NO_ACTION if r.action_ms is None else r.action_ms
            by_day[r.day][_KEY.pack(*key)] = _RECORD.pack(r.user_id, r.ts_ms, r.like, r.finish, action_ms)
        for day, mapping in by_day.items():
            pipe.hset(self._key("imp", day), mapping=mapping)
            days.add(day)
        for key, waiting in changes.pending.items():
            if waiting is not None:
                pipe.hset(
                    self._key("pend", waiting.day),
                    _KEY.pack(*key),
                    _PENDING.pack(waiting.ts_ms, waiting.watch_ms, waiting.like),
                )
                days.add(waiting.day)
        for key, day in resolved:  # applied pending actions: wherever they were looked up
            if changes.pending.get(key, 0) is None:
                pipe.hdel(self._key("pend", day), _KEY.pack(*key))
        if days:
            pipe.zadd(self._key("days"), {str(d): d for d in days})
        return days

    def _record(self, batch: Impressions | Actions) -> WriteResult:
        if not len(batch):
            return WriteResult(0)
        records, pending = self._lookups(batch)
        buckets = [self._key("imp", d) for d in records] + [self._key("pend", d) for d in pending]
        resolved = [(key, day) for day, keys in pending.items() for key in keys]
        with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(MAX_WATCH_RETRIES):
                try:
                    pipe.watch(*buckets)
                    state = self._load(batch, records, pending)
                    changes = (
                        plan_impressions(batch, state)
                        if isinstance(batch, Impressions)
                        else plan_actions(batch, state)
                    )
                    pipe.multi()
                    self._queue(pipe, changes, resolved)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue  # another writer changed a bucket: plan again on fresh state
            else:
                raise RuntimeError(
                    f"feature store: {MAX_WATCH_RETRIES} conflicting writes in a row; is another writer stuck in a loop?"
                )
        self._advance(int(batch.ts_ms.max()) // MS_PER_DAY)
        return WriteResult(len(batch), changes.stats)

    def record_impressions(self, impressions: Batch) -> WriteResult:
        return self._record(Impressions.of(impressions))

    def record_actions(self, actions: Batch) -> WriteResult:
        return self._record(Actions.of(actions))

    def _advance(self, day: int) -> None:
        """Remember the newest event day; drop day buckets no action can join any more when it moves."""
        meta = self._key("meta")
        newest = self._redis.hget(meta, "newest_day")
        if newest is not None and int(newest) >= day:
            return
        self._redis.hset(meta, "newest_day", day)
        self.prune(retention_cutoff_day(day) * MS_PER_DAY)

    def prune(self, before_ms: int) -> None:
        """Drop the buckets of whole UTC days before `before_ms`."""
        last = int(before_ms) // MS_PER_DAY - 1
        days_key = self._key("days")
        old = [int(d) for d in self._redis.zrangebyscore(days_key, "-inf", last)]
        if old:
            self._redis.unlink(*[self._key(bucket, d) for d in old for bucket in ("imp", "pend")])
            self._redis.zremrangebyscore(days_key, "-inf", last)

    # --- reads -----------------------------------------------------------------------------------

    def _read(self, user_id: int, item_ids: np.ndarray, ts_ms: int, profiled: bool = True) -> FeatureRows:
        ids = item_ids.tolist()
        keys = [self._key("u", user_id), *(self._key("i", iid) for iid in ids)]
        pipe = self._redis.pipeline(transaction=False)  # one round trip: the read and the deny-list check
        self._read_script(keys=keys, args=self._read_args, client=pipe)
        pipe.sismember(self._key("forgotten"), self.forget_digest(user_id))
        values, forgotten = pipe.execute()
        n_user = len(self._fields["users"])
        user = _columns(self.layout.users, values[:n_user], 1)
        items = _columns(self.layout.items, values[n_user:], len(ids))
        rows = assemble(self.layout, user_id, user, item_ids, items, ts_ms, profiled)
        return dataclasses.replace(rows, forgotten=True) if forgotten and not rows.user_known else rows

    def _set_consent(self, user_id: int, personalisation: bool | None, training: bool | None) -> tuple[bool, bool] | None:
        """Rewrite the flags inside the user's packed row: WATCH the user's hash, read, MULTI/EXEC,
        again if another writer changed the hash meanwhile (a profile put, another consent change)."""
        key = self._key("u", user_id)
        columns = self.layout.users.numeric_columns
        at = {flag: columns.index(f"consent_{flag}") for flag in ("personalisation", "training")}
        with self._redis.pipeline(transaction=True) as pipe:
            for _ in range(MAX_WATCH_RETRIES):
                try:
                    pipe.watch(key)
                    row = pipe.hget(key, ROW_FIELD)
                    if row is None:
                        pipe.unwatch()
                        return None
                    values = np.frombuffer(row, "<i8").copy()
                    for flag, value in (("personalisation", personalisation), ("training", training)):
                        if value is not None:
                            values[at[flag]] = int(value)
                    pipe.multi()
                    pipe.hset(key, ROW_FIELD, values.astype("<i8").tobytes())
                    pipe.execute()
                    return bool(values[at["personalisation"]]), bool(values[at["training"]])
                except redis.WatchError:
                    continue
        raise RuntimeError(f"feature store: {MAX_WATCH_RETRIES} conflicting writes to user {user_id}'s profile in a row")

    def stats(self) -> dict[str, int]:
        """Key counts under the prefix (for monitoring and tests; scans the keyspace)."""
        counts: dict[str, int] = defaultdict(int)
        for key in self._redis.scan_iter(match=self.prefix + "*", count=1000):
            kind = key.decode()[len(self.prefix) :].split(":")[0]
            counts[{"u": "users", "i": "items"}.get(kind, kind)] += 1
        counts["impressions"] = sum(
            self._redis.hlen(self._key("imp", int(d))) for d in self._redis.zrange(self._key("days"), 0, -1)
        )
        counts["pending"] = sum(
            self._redis.hlen(self._key("pend", int(d))) for d in self._redis.zrange(self._key("days"), 0, -1)
        )
        return {k: counts.get(k, 0) for k in ("users", "items", "impressions", "pending")}

    def close(self) -> None:
        self._redis.close()


def _columns(t: TableLayout, values: list[bytes | None], n: int) -> StoredRows:
    """`n` rows from the flattened HMGET replies of `_fields(t)` (a row without ``row``: unknown)."""
    width = len(_fields(t))
    rows = values[len(COUNTER_FIELDS) :: width]
    known = np.array([row is not None for row in rows], bool)
    counters = [v if v is not None else b"0" for k in range(len(COUNTER_FIELDS)) for v in values[k::width]]
    counts = np.array(counters, dtype="S20").astype(np.int64).reshape(len(COUNTER_FIELDS), n).T
    blank = bytes(8 * len(t.numeric_columns))
    numeric = np.frombuffer(b"".join(row if row is not None else blank for row in rows), "<i8").astype(
        np.int64
    )
    blobs = {c: values[len(COUNTER_FIELDS) + 1 + b :: width] for b, c in enumerate(t.blob_columns)}
    return StoredRows(known, counts, numeric.reshape(n, len(t.numeric_columns)), blobs)


__all__ = ["RedisFeatureStore"]
