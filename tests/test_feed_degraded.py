"""The feed degrades instead of failing when its storage goes away, and recovers when it returns.

In-process `FeedService` on a real SQLite feature store and event log (and a real redis-server),
with the faults injected into the real files and processes:

- feature store missing (file removed), locked by another process, or its Redis server killed with
  kill -9: every request is still answered, non-profiled on default features (the item metadata
  the feed follows from the log, counters at their priors), counted by reason in
  `gpurec_feed_degraded_reads_total` and by mode in `gpurec_feed_requests_by_mode_total`; the
  next request after the store returns is personalised again;
- event log unreachable (its files moved away and appends failing): requests are still answered;
  the served rows wait in the writer's bounded queue and are written once when the log returns;
  rows of an append that failed, and rows beyond the bound, are counted lost, never written twice.

The same faults through a real tritonserver (a table renamed away) are in tests/test_feed.py.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_consent import ALICE, BOB, CARL, T0, feature_contract, score, users_table
from test_feed import table_offline, wait_for

import gpurec.serve.feed as feed_module
from gpurec.features import open_feature_store
from gpurec.features.redis_server import RedisServer, redis_server_binary
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC
from gpurec.serve.feed import FeedService
from gpurec.serve.feed_settings import FeedSettings, open_existing
from gpurec.serve.items import ITEMS_TOPIC, Item, item_record, items_table
from gpurec.serve.served_log import ServedLogWriter
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Action, ServedRow, decode, encode

ITEMS = [Item(i, 50 + i % 3, 20_000 + 1000 * i, T0 - (40 - i) * 3_600_000, ("t",), *(("de", "de") if i % 2 else ("en", "us"))) for i in range(1, 41)]
USERS = [(ALICE, "de", "ios", "de", True, True), (BOB, "de", "android", "de", True, True), (CARL, "us", "ios", "en", True, True)]


def fill_store(url: str) -> None:
    with open_feature_store(url) as store:
        store.put_users(users_table(USERS))
        store.put_items(items_table(ITEMS))


def fill_log(url: str) -> None:
    actions = [Action(k, 10_000 + k, 1 + k % 40, CARL, T0 - 60_000 + k, 15_000, k % 3 == 0, False, False, False, False) for k in range(200)]
    with open_event_log(url) as log:
        for topic in (ITEMS_TOPIC, ACTIONS_TOPIC, SERVED_TOPIC):
            log.create_topic(topic, 2)
        log.append(ITEMS_TOPIC, [item_record(i) for i in ITEMS])
        log.append(ACTIONS_TOPIC, [Record(a.user_id, encode(a), a.ts_ms) for a in actions])


def start_feed(store_url: str, log_url: str, timeout_ms: int = 2000) -> FeedService:
    settings = FeedSettings(feature_store=store_url, event_log=log_url, fresh=10, regional=10, trending=10, store_timeout_ms=timeout_ms)
    return FeedService(settings, feature_contract(), "1").start()


def served(log_url: str) -> list[ServedRow]:
    with open_event_log(log_url) as log:
        return [decode(r.value, ServedRow) for p in range(log.partitions(SERVED_TOPIC)) for r in log.read(SERVED_TOPIC, p, 0, 10_000)]


def check_degraded(feed: FeedService, reason: str | tuple[str, ...], request_id: int) -> None:
    """A request while the store is away: answered, non-profiled, on defaults, counted."""
    reasons = (reason,) if isinstance(reason, str) else reason
    plan = feed.plan(ALICE, 5, T0)
    assert plan.degraded in reasons and not plan.personalised
    assert not plan.rows.user_known and not plan.rows.consent_training  # nothing of Alice, never trained on
    before = feed.metrics.total("gpurec_feed_requests_by_mode_total", mode="non_profiled")
    answer = feed.serve(ALICE, 5, score, ts_ms=T0, request_id=request_id)
    assert len(answer.item_ids) == 5 and set(answer.item_ids.tolist()) <= {i.item_id for i in ITEMS}
    assert feed.metrics.total("gpurec_feed_requests_by_mode_total", mode="non_profiled") == before + 1
    assert sum(feed.metrics.total("gpurec_feed_degraded_reads_total", reason=r) for r in reasons) >= 2


@pytest.fixture()
def sqlite_world(tmp_path, monkeypatch):
    monkeypatch.setattr(feed_module, "STORE_RETRY_S", 0.2)  # reopen a missing store after 0.2 s, not 5 s
    store_url, log_url = f"sqlite:///{tmp_path / 'features.db'}", f"sqlite:///{tmp_path / 'log.db'}"
    fill_store(store_url)
    fill_log(log_url)
    return tmp_path, store_url, log_url


def test_a_missing_store_degrades_to_non_profiled_and_recovers(sqlite_world):
    root, store_url, log_url = sqlite_world
    database = root / "features.db"
    away = root / "features.away"
    database.rename(away)  # the store is gone before the feed starts (a volume not mounted yet)
    feed = start_feed(store_url, log_url)
    try:
        check_degraded(feed, "unavailable", 1)
        away.rename(database)
        plan = wait_for(lambda: (p := feed.plan(ALICE, 5, T0)).personalised and p, what="the store to be reopened")
        assert plan.degraded is None and plan.rows.user_known and plan.rows.consent_training
        # Removed while open: the open file keeps answering (its last contents) until the feed restarts.
        database.unlink()
        assert feed.plan(ALICE, 5, T0).personalised
    finally:
        feed.close()
    rows = {r.request_id: r for r in served(log_url)}
    assert not rows[1].consent_training  # the degraded request's rows are never training examples


def test_a_locked_store_degrades_and_recovers_when_the_lock_goes(sqlite_world):
    root, store_url, log_url = sqlite_world
    # Another process holds the store exclusively (a maintenance job with locking_mode=EXCLUSIVE):
    # in WAL mode nothing else blocks readers, this does.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""
import sqlite3, sys
db = sqlite3.connect({str(root / 'features.db')!r}, isolation_level=None)
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
db.execute("CREATE TABLE IF NOT EXISTS lock_probe(x)")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    feed = None
    try:
        assert holder.stdout.readline().strip() == "locked"
        feed = start_feed(store_url, log_url, timeout_ms=100)
        check_degraded(feed, ("unavailable", "timeout", "busy", "error"), 2)
        holder.stdin.close()  # the job ends: its lock goes
        holder.wait(timeout=30)
        wait_for(lambda: feed.plan(ALICE, 5, T0).personalised, what="the store to answer again")
    finally:
        holder.kill()
        holder.wait()
        if feed is not None:
            feed.close()


def test_a_killed_redis_store_degrades_and_recovers_when_it_restarts(tmp_path):
    log_url = f"sqlite:///{tmp_path / 'log.db'}"
    fill_log(log_url)
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    restarted: subprocess.Popen | None = None
    feed = None
    try:
        fill_store(redis.url())
        feed = start_feed(redis.url(), log_url, timeout_ms=500)
        assert feed.plan(ALICE, 5, T0).personalised
        os.kill(redis.process.pid, signal.SIGKILL)  # the store's server dies
        redis.process.wait()
        check_degraded(feed, "error", 3)
        # The server comes back on its port with its append-only file: the feed finds it again.
        restarted = subprocess.Popen(
            [str(redis_server_binary()), "--bind", "127.0.0.1", "--port", str(redis.port), "--dir", str(redis.directory),
             "--save", "", "--appendonly", "yes", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        plan = wait_for(lambda: (p := feed.plan(ALICE, 5, T0)).personalised and p, what="redis to answer again")
        assert plan.rows.user_known and plan.degraded is None
    finally:
        if feed is not None:
            feed.close()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=10)
        redis.stop()


def _move(root: Path, name: str, to: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        if (root / f"{name}{suffix}").exists():
            os.rename(root / f"{name}{suffix}", to / f"{name}{suffix}")


def test_an_unreachable_event_log_holds_served_rows_and_writes_them_once_when_it_returns(sqlite_world):
    root, store_url, log_url = sqlite_world
    away = root / "away"
    away.mkdir()
    _move(root, "log.db", away)  # the log is away (a broker not up yet, a volume not mounted)
    settings = FeedSettings(feature_store=store_url, event_log=log_url, fresh=10, regional=10, trending=10, store_timeout_ms=2000)
    feed = FeedService(settings, feature_contract(), "1").start(catch_up_s=0.5)
    try:
        # The pools the follower read before the outage (here: given directly, the log being away).
        feed.source.add_items(ITEMS)
        feed.source.refresh()
        for user, request_id in ((ALICE, 102), (BOB, 103)):
            assert len(feed.serve(user, 4, score, ts_ms=T0, request_id=request_id).item_ids) == 4
        assert feed.writer.queued == 2  # held, not lost
        wait_for(lambda: feed.metrics.total("gpurec_feed_source_errors_total") > 0, what="the failed reads counted")
        _move(away, "log.db", root)  # the log returns
        wait_for(lambda: {102, 103} <= {r.request_id for r in served(log_url)}, what="the held rows to be written")
        # An append that fails on an open log (every statement on its records fails): lost, counted.
        with table_offline(log_url, "records"):
            feed.serve(ALICE, 4, score, ts_ms=T0, request_id=104)
            wait_for(lambda: feed.metrics.total("gpurec_feed_log_failures_total", reason="append_failed") == 4, what="the failed append")
        feed.serve(CARL, 4, score, ts_ms=T0, request_id=105)
    finally:
        feed.close()
    by_request: dict[int, int] = {}
    for row in served(log_url):
        by_request[row.request_id] = by_request.get(row.request_id, 0) + 1
    assert by_request == {102: 4, 103: 4, 105: 4}  # 104 lost and counted; none written twice
    assert feed.metrics.total("gpurec_feed_log_failures_total", reason="log_unavailable") == 0
    assert feed.writer.stats.written == 12


def test_the_served_row_queue_is_bounded_while_the_log_is_away(tmp_path):
    url = f"sqlite:///{tmp_path / 'log.db'}"
    lost: dict[str, int] = {}
    # Closed while the log is still away: the waiting rows are counted lost.
    writer = ServedLogWriter(
        lambda: open_existing(url, "event log", open_event_log),  # type: ignore[arg-type, return-value]
        SERVED_TOPIC,
        on_failure=lambda rows, reason: lost.__setitem__(reason, lost.get(reason, 0) + rows),
    )
    writer.submit([Record(1, b"a", 1), Record(2, b"b", 2)])
    writer.close()
    assert lost == {"log_unavailable": 2}
    lost.clear()
    writer = ServedLogWriter(
        lambda: open_existing(url, "event log", open_event_log),  # type: ignore[arg-type, return-value]
        SERVED_TOPIC,
        max_queue_batches=3,
        on_failure=lambda rows, reason: lost.__setitem__(reason, lost.get(reason, 0) + rows),
    )
    try:
        time.sleep(0.3)  # the writer has tried the (missing) log
        accepted = [writer.submit([Record(k, f"row {k}".encode(), k)]) for k in range(5)]
        assert accepted == [True, True, True, False, False] and lost == {"queue_full": 2}
        with open_event_log(url) as log:  # the log appears
            log.create_topic(SERVED_TOPIC, 1)
        wait_for(lambda: writer.stats.written == 3, what="the queued rows")
        with open_event_log(url) as log:
            assert [r.value for r in log.read(SERVED_TOPIC, 0, 0, 100)] == [b"row 0", b"row 1", b"row 2"]
        os.rename(tmp_path / "log.db", tmp_path / "gone.db")  # away again, and the writer closes meanwhile
        with sqlite3.connect(tmp_path / "gone.db") as db:
            db.execute("ALTER TABLE records RENAME TO records_gone")
        writer.submit([Record(9, b"row 9", 9)])
        writer.close(timeout_s=10)
    finally:
        writer.close()
    assert lost == {"queue_full": 2, "append_failed": 1}
