"""The live feed (`feed` BLS model) against a real tritonserver, a real SQLite feature store and event log.

One small ranker is trained and exported with the feed pointed at a feature store filled from the
test world (profiles, item metadata, the last day's impressions and actions) and an event log whose
`items` and `actions` topics hold the world's uploads and that day's engagement; one server serves
the module. Failures are injected into the real SQLite files (a table renamed away and back), which
is what a broken store or log looks like to the feed: every SQL statement fails. The candidate
source's rules and the store timeout (a stopped redis-server) are checked in-process, without Triton.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import serve_for_tests, train_small

from gpurec.client import AsyncRankerClient, FeedRequest, InvalidRequest, RankerClient, load_contract
from gpurec.data.schema import MS_PER_DAY
from gpurec.features import open_feature_store
from gpurec.features.redis_server import RedisServer
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC, CandidateConfig, CandidateSource, region_key
from gpurec.serve.contract import ServingContract, pad_id_lists
from gpurec.serve.export import export_repository
from gpurec.serve.feed import FeedService, FeedUnavailable
from gpurec.serve.feed_settings import EVENT_LOG_ENV, FEATURE_STORE_ENV, FeedSettings, normalise_url
from gpurec.serve.items import ITEMS_TOPIC, Item, item_record, items_from_table, items_table
from gpurec.serve.model_config import BatchingConfig
from gpurec.serve.server import TritonServer
from gpurec.serve.source_follower import TopicTail, apply_records
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Action, ServedRow, decode, encode

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOLERANCE = 1e-5
MAX_N = 500  # above the 300 candidates, so a request can return all of them
UNKNOWN_USER = 987_654_321_987


@dataclass(frozen=True)
class Live:
    root: Path
    store_url: str
    log_url: str
    items: list[Item]
    held_back: Item  # uploaded during the tests
    users: pl.DataFrame
    now_ms: int

    @property
    def catalogue(self) -> set[int]:
        return {i.item_id for i in self.items}


@pytest.fixture(scope="module")
def live(small_features, tmp_path_factory) -> Live:
    raw, root = small_features.parent / "raw", tmp_path_factory.mktemp("feed")
    users, items = pl.read_parquet(raw / "users"), pl.read_parquet(raw / "items")
    impressions, actions = pl.read_parquet(raw / "impressions"), pl.read_parquet(raw / "actions")
    impressions = impressions.filter(pl.col("ts").dt.date() == impressions["ts"].max().date())  # the last day
    actions = actions.join(impressions.select("request_id", "item_id", "user_id"), on=["request_id", "item_id"])
    actions = actions.with_columns(ts_ms=pl.col("ts").dt.epoch("ms"))
    catalogue = sorted(items_from_table(items.drop("day")), key=lambda i: i.upload_ts_ms)
    *listed, newest = catalogue
    now_ms = int(actions["ts_ms"].max()) + 1
    held_back = Item(newest.item_id, newest.author_id, newest.duration_ms, now_ms - 60_000, newest.hashtags, newest.language, newest.region)
    store_url, log_url = f"sqlite:///{root / 'features.db'}", f"sqlite:///{root / 'log.db'}"
    with open_feature_store(store_url) as store:
        store.put_users(users.drop("day"))
        store.put_items(items.drop("day").filter(pl.col("item_id") != newest.item_id))
        store.record_impressions(impressions.drop("day"))
        store.record_actions(actions.drop("day", "ts_ms"))
    with open_event_log(log_url) as log:
        for topic in (ITEMS_TOPIC, ACTIONS_TOPIC):
            log.create_topic(topic, 2)
        log.append(ITEMS_TOPIC, [item_record(i) for i in listed])
        rows = actions.with_row_index("action_id").iter_rows(named=True)
        log.append(ACTIONS_TOPIC, [Record(a["user_id"], encode(_action(a)), a["ts_ms"]) for a in rows])
    return Live(root, store_url, log_url, listed, held_back, users, now_ms)


def _action(a: dict) -> Action:
    flags = (a["like"], a["share"], a["comment"], a["follow"], a["skip"])
    return Action(a["action_id"], a["request_id"], a["item_id"], a["user_id"], a["ts_ms"], a["watch_ms"], *flags)


@pytest.fixture(scope="module")
def repo(small_features, live) -> Path:
    train_small(small_features, live.root / "run", max_steps=10)
    settings = FeedSettings(feature_store=live.store_url, event_log=live.log_url, max_n=MAX_N)
    export_repository(live.root / "run", live.root / "repo", batching=BatchingConfig(max_queue_delay_us=2000), feed=settings)
    return live.root / "repo"


@pytest.fixture(scope="module")
def contract(repo) -> ServingContract:
    return load_contract(repo)


@pytest.fixture(scope="module")
def server(repo) -> Iterator[TritonServer]:
    yield from serve_for_tests(repo)


@pytest.fixture(scope="module")
def known_user(live) -> int:
    return int(live.users.filter(pl.col("consent_training"))["user_id"][0])


def client(server: TritonServer, contract: ServingContract, protocol: str = "grpc", **kwargs) -> RankerClient:
    return RankerClient(server.grpc_url if protocol == "grpc" else server.http_url, contract, protocol=protocol, **kwargs)


def wait_for(check: Callable[[], object], timeout_s: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def served_rows(live: Live | str, request_id: int) -> list[ServedRow]:
    """The served rows of one request in the test's log (or the log at a URL), in shown order."""
    with open_event_log(live if isinstance(live, str) else live.log_url) as log:
        if SERVED_TOPIC not in log.topics():
            return []
        records = [r for p in range(log.partitions(SERVED_TOPIC)) for r in log.read(SERVED_TOPIC, p, 0, 100_000)]
    rows = [decode(r.value, ServedRow) for r in records]
    return sorted((r for r in rows if r.request_id == request_id), key=lambda r: r.position)


def read_back(live: Live, request_id: int) -> None:
    """Wait until a request's served rows are in the log and the feed instances had time to read them."""
    wait_for(lambda: served_rows(live, request_id), what=f"request {request_id}'s served rows")
    time.sleep(1.0)  # the followers poll every 0.1 s (more under load)


def metric(server: TritonServer, name: str, **labels: str) -> float:
    """Sum of the series of `name` whose labels include `labels` (0 when there is none)."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for series, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        have = dict(re.findall(r'(\w+)="([^"]*)"', series))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@contextmanager
def table_offline(database: str, table: str) -> Iterator[None]:
    """Every statement on `table` fails for every connection (the feed's own included) until the end."""
    connection = sqlite3.connect(database.removeprefix("sqlite:///"), timeout=30, isolation_level=None)
    try:
        connection.execute(f"ALTER TABLE {table} RENAME TO {table}_offline")
        yield
    finally:
        connection.execute(f"ALTER TABLE {table}_offline RENAME TO {table}")
        connection.close()


def ranker_rows(contract: ServingContract, rows: list[ServedRow]) -> dict[str, np.ndarray]:
    """The ranker's input arrays rebuilt from logged served rows."""
    inputs = [r.model_inputs() for r in rows]
    arrays = {"dense": np.array([i.dense for i in inputs], dtype=np.float32)}
    for name in contract.sparse_features:
        arrays[name] = np.array([i.sparse[name] for i in inputs], dtype=np.int64).reshape(-1, 1)
    for name in contract.multi_valued_features:
        arrays[name] = pad_id_lists([i.sparse[name] for i in inputs])
    return arrays


# ---- the feed through Triton ----------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_feed_answers_distinct_catalogue_items_for_known_and_unknown_users(server, contract, live, known_user, protocol):
    with client(server, contract, protocol) as feeds:
        for user in (known_user, UNKNOWN_USER):  # an unknown user is a cold start, not an error
            result = feeds.feed(user, 10, ts_ms=live.now_ms)
            assert len(result) == 10 and len(set(result.item_ids.tolist())) == 10
            assert set(result.item_ids.tolist()) <= live.catalogue
            assert np.all(np.diff(result.scores) <= 0), "best first"
            assert result.model_version == "1" and result.request_id > 0
        mine = feeds.feed(known_user, 3, ts_ms=live.now_ms, request_id=424242)
        assert mine.request_id == 424242


def test_served_rows_are_the_shown_items_with_the_inputs_the_ranker_scored(server, contract, live, known_user):
    request_id = 7_000_001
    with client(server, contract) as feeds:
        result = feeds.feed(known_user, 8, ts_ms=live.now_ms, request_id=request_id)
        rows = wait_for(lambda: (r := served_rows(live, request_id)) and len(r) >= 8 and r, what="the served rows")
        assert [r.item_id for r in rows] == result.item_ids.tolist()
        assert [r.position for r in rows] == list(range(8))
        assert {(r.user_id, r.ts_ms, r.model_version, r.consent_training) for r in rows} == {(known_user, live.now_ms, "1", True)}
        durations = {i.item_id: i.duration_ms for i in live.items}
        assert [r.duration_ms for r in rows] == [durations[i] for i in result.item_ids.tolist()]
        rescored = feeds.rank(None, ranker_rows(contract, rows))  # the logged inputs, sent to `ranker` itself
    np.testing.assert_allclose(rescored.score, result.scores, atol=TOLERANCE, rtol=0)


def test_recently_shown_items_are_not_shown_again(server, contract, live, known_user):
    user = int(live.users.filter(pl.col("consent_personalisation"))["user_id"][1])  # non-profiled feeds exclude nothing
    with client(server, contract) as feeds:
        first = feeds.feed(user, 20, ts_ms=live.now_ms)
        read_back(live, first.request_id)  # the other feed instance learns it from the served topic
        second = feeds.feed(user, 20, ts_ms=live.now_ms)
    assert not set(first.item_ids.tolist()) & set(second.item_ids.tolist())


def test_fresh_uploads_become_candidates(server, contract, live):
    new = live.held_back
    users = iter(live.users["user_id"][10:].to_list())  # a new user per call: nothing excluded as already shown
    with client(server, contract) as feeds:
        everything = feeds.feed(next(users), MAX_N, ts_ms=live.now_ms)
        assert 200 <= len(everything) <= 300 and new.item_id not in everything.item_ids
        with open_feature_store(live.store_url) as store, open_event_log(live.log_url) as log:
            store.put_items(items_table([new]))
            log.append(ITEMS_TOPIC, [item_record(new)])
        wait_for(lambda: new.item_id in feeds.feed(next(users), MAX_N, ts_ms=live.now_ms).item_ids, what="the new upload")
        before_upload = feeds.feed(next(users), MAX_N, ts_ms=new.upload_ts_ms - 1)  # event time: not uploaded yet
        assert new.item_id not in before_upload.item_ids


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(server, contract, live, known_user, protocol):
    with client(server, contract, protocol, retries=3, backoff=3.0) as feeds:
        for n in (0, -1, MAX_N + 1):
            started = time.monotonic()
            with pytest.raises(InvalidRequest, match="n must be"):
                feeds.feed(known_user, n, ts_ms=live.now_ms)
            assert time.monotonic() - started < 2.5, "an invalid request is not retried (a retry waits 3 s)"
        with pytest.raises(InvalidRequest, match="ts_ms"):
            feeds.feed(known_user, 5, ts_ms=-5)
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            missing_n = grpcclient.InferInput("user_id", [1], "INT64")
            missing_n.set_data_from_numpy(np.array([known_user], np.int64))
            with pytest.raises(InferenceServerException, match="missing required input"):
                raw.infer("feed", [missing_n])
            for n in (0, MAX_N + 1):  # what the client refuses before sending, the server refuses too
                n_input = grpcclient.InferInput("n", [1], "INT32")
                n_input.set_data_from_numpy(np.array([n], np.int32))
                with pytest.raises(InferenceServerException, match=r"n must be an integer in 1\.\.500") as refused:
                    raw.infer("feed", [missing_n, n_input])
                assert "INVALID_ARG" in str(refused.value.status()).upper()
        finally:
            raw.close()
        assert len(feeds.feed(known_user, 5, ts_ms=live.now_ms)) == 5  # still serving
    assert server.running()


def test_async_feed_many(server, contract, live):
    users = live.users.filter(pl.col("consent_personalisation"))["user_id"][30:34].to_list()

    async def run() -> list:
        async with AsyncRankerClient(server.grpc_url, contract, protocol="grpc") as feeds:
            return await feeds.feed_many([FeedRequest(u, 6, ts_ms=live.now_ms) for u in users])

    results = asyncio.run(run())
    for result in results:
        read_back(live, result.request_id)
    with client(server, contract) as feeds:
        again = feeds.feed_many([FeedRequest(u, 6, ts_ms=live.now_ms) for u in users])
    for first, second in zip(results, again, strict=True):
        assert len(first) == len(second) == 6
        assert not set(first.item_ids.tolist()) & set(second.item_ids.tolist())  # the first batch is excluded


def test_feature_store_failure_degrades_and_is_counted(server, contract, live, known_user):
    before = metric(server, "gpurec_feed_degraded_reads_total", reason="error")
    with client(server, contract) as feeds:
        with table_offline(live.store_url, "items"):
            degraded = [feeds.feed(known_user, 5, ts_ms=live.now_ms, request_id=8_000_000 + i) for i in range(4)]
        assert all(len(r) == 5 for r in degraded)
        wait_for(lambda: metric(server, "gpurec_feed_degraded_reads_total", reason="error") >= before + 4, what="degraded reads")
        rows = wait_for(lambda: served_rows(live, 8_000_000), what="the degraded request's rows")
        assert not any(r.consent_training for r in rows), "rows scored on default features are never trained on"
        counted = metric(server, "gpurec_feed_degraded_reads_total", reason="error")
        feeds.feed(known_user, 5, ts_ms=live.now_ms, request_id=8_000_100)
        rows = wait_for(lambda: served_rows(live, 8_000_100), what="the recovered request's rows")
    assert all(r.consent_training for r in rows)
    time.sleep(1.0)  # a metrics flush
    assert metric(server, "gpurec_feed_degraded_reads_total", reason="error") == counted


def test_event_log_failure_does_not_fail_requests_and_is_counted(server, contract, live, known_user):
    before = metric(server, "gpurec_feed_log_failures_total", reason="append_failed")
    with client(server, contract) as feeds:
        with table_offline(live.log_url, "records"):
            answered = [feeds.feed(known_user, 4, ts_ms=live.now_ms, request_id=9_000_000 + i) for i in range(3)]
            assert all(len(r) == 4 for r in answered)
            wait_for(
                lambda: metric(server, "gpurec_feed_log_failures_total", reason="append_failed") >= before + 12,
                what="the failed appends counted",
            )
            wait_for(lambda: metric(server, "gpurec_feed_source_errors_total") > 0, what="the failed reads counted")
        assert served_rows(live, 9_000_000) == []  # lost, and counted: never written twice
        feeds.feed(known_user, 4, ts_ms=live.now_ms, request_id=9_000_100)
        assert len(wait_for(lambda: served_rows(live, 9_000_100), what="logging to resume")) == 4


def test_metrics_endpoint_shows_the_feed_metrics(server, contract, live, known_user):
    with client(server, contract) as feeds:
        feeds.feed(known_user, 5, ts_ms=live.now_ms)
        with pytest.raises(InvalidRequest):
            feeds.feed(known_user, MAX_N + 1, ts_ms=live.now_ms)
    wait_for(lambda: metric(server, "gpurec_feed_requests_total", outcome="invalid") > 0, what="a flush")
    assert metric(server, "gpurec_feed_errors_total", kind="invalid_argument") >= 1
    wait_for(  # one request, one latency observation (flushed together by each instance)
        lambda: metric(server, "gpurec_feed_latency_ms_count") == metric(server, "gpurec_feed_requests_total", outcome="ok") > 0,
        what="latencies for every answered request",
    )
    assert metric(server, "gpurec_feed_candidates_sum") >= 200 * metric(server, "gpurec_feed_candidates_count") > 0
    for stage in ("candidates", "features", "rank", "log"):
        assert metric(server, "gpurec_feed_stage_ms_count", stage=stage) > 0
    assert metric(server, "gpurec_feed_served_rows_total") > 0
    lag = {t: metric(server, "gpurec_feed_source_lag_records", topic=t) for t in (ITEMS_TOPIC, ACTIONS_TOPIC, SERVED_TOPIC)}
    assert lag[ITEMS_TOPIC] == lag[ACTIONS_TOPIC] == 0, lag


# ---- in-process: the candidate source, the store timeout, the settings --------------------------


def test_candidate_source_pools_follow_event_time():
    day, hour = MS_PER_DAY, 3_600_000
    t0 = 100 * day
    source = CandidateSource(CandidateConfig(fresh=2, regional=2, trending=2, half_life_ms=hour, exclude_requests=1))
    items = [Item(i, 1, 30_000, t0 - (10 - i) * day, (), "en", "us" if i % 2 else "de") for i in range(10)]
    items += [Item(100, 1, 30_000, t0 + hour, (), "en", "us")]  # uploaded after the request time below
    source.add_items(items)

    def engaged(item_id: int, ts_ms: int, likes: int) -> list[Action]:
        return [Action(k, k, item_id, 5, ts_ms, 10_000, True, False, False, False, False) for k in range(likes)]

    # item 1: 8 likes two hours ago (weight 3 each, decayed to 8*3/4 = 6); item 3: 3 likes now (9)
    source.add_actions(engaged(1, t0 - 2 * hour, 8) + engaged(3, t0, 3) + engaged(5, t0, 2) + engaged(4, t0, 1))
    source.refresh()
    user_in_us = 42
    source.note_user_region(user_in_us, region_key("us", "en"))
    got = source.candidates(user_in_us, t0)
    assert got.item_ids[:2].tolist() == [9, 8]  # fresh: newest first, nothing uploaded after t0 (item 100)
    assert (got.fresh, got.regional, got.trending) == (2, 2, 2)
    assert got.item_ids[2:4].tolist() == [3, 1]  # regional (us/en): by decayed engagement
    assert got.item_ids[4:].tolist() == [5, 4]  # global, without the items already taken
    assert 100 not in got.item_ids and len(set(got.item_ids.tolist())) == len(got)
    source.note_shown(user_in_us, 1, got.item_ids.tolist())
    again = source.candidates(user_in_us, t0)
    assert not set(again.item_ids.tolist()) & set(got.item_ids.tolist()) and again.excluded > 0
    cold = source.candidates(UNKNOWN_USER, t0)  # no region known: fresh and global only, filled from them
    assert cold.regional == 0 and cold.item_ids.tolist()[:2] == [9, 8] and 3 in cold.item_ids
    assert 100 in source.candidates(UNKNOWN_USER, t0 + 2 * hour).item_ids  # uploaded by then


def test_old_items_are_forgotten_unless_trending():
    day = MS_PER_DAY
    source = CandidateSource(CandidateConfig(fresh=5, regional=0, trending=5, item_horizon_ms=10 * day))
    source.add_items([Item(i, 1, 30_000, i * day, (), "en", "us") for i in range(1, 41)])  # one upload a day
    source.add_actions([Action(1, 1, 3, 9, 40 * day, 60_000, True, False, False, False, False)])  # item 3 still engages
    source.forget_old_items()
    assert {i for i in range(1, 41) if source.item(i)} == {3, *range(30, 41)}
    source.refresh()
    got = source.candidates(1, 40 * day)
    assert got.item_ids.tolist() == [40, 39, 38, 3]  # fresh (2-day window), then trending: all there is


def test_topic_tail_reads_uploads_and_skips_bad_records(tmp_path):
    with open_event_log(tmp_path / "log.db") as log:
        log.create_topic(ITEMS_TOPIC, 3)
        items = [Item(i, 7, 1000, 1_000 + i, ("cats",), "en", "us") for i in range(20)]
        log.append(ITEMS_TOPIC, [item_record(i) for i in items] + [Record(99, b"not an item", 5)])
        source, tail = CandidateSource(), TopicTail(log, (ITEMS_TOPIC, ACTIONS_TOPIC))
        assert apply_records(source, tail.poll()) == 1
        assert tail.poll() == [] and tail.lag() == {ITEMS_TOPIC: 0}
    assert source.counts["items"] == 20 and source.counts["invalid"] == 1
    assert source.item(7) == items[7]


def test_a_hung_store_degrades_after_the_timeout(contract, live, tmp_path, known_user):
    """A redis-server stopped with SIGSTOP: the read hangs, the request answers on default features."""
    with RedisServer(tmp_path / "redis") as redis_server:
        with open_feature_store(redis_server.url()) as store:
            store.put_users(live.users.drop("day"))
            store.put_items(items_table(live.items[-400:]))
        settings = FeedSettings(feature_store=redis_server.url(), event_log=live.log_url, store_timeout_ms=100)
        service = FeedService(settings, contract, "1").start()
        try:
            score = lambda inputs: inputs["dense"].sum(axis=1)  # noqa: E731
            assert service.plan(known_user, 5, live.now_ms).degraded is None
            os.kill(redis_server.process.pid, signal.SIGSTOP)
            try:  # answered while redis cannot answer: by the timeout
                assert len(service.serve(known_user, 5, score, ts_ms=live.now_ms).item_ids) == 5
                assert service.plan(known_user, 5, live.now_ms).degraded == "busy"  # the hung read still holds
            finally:
                os.kill(redis_server.process.pid, signal.SIGCONT)
            wait_for(lambda: service.plan(known_user, 5, live.now_ms).degraded is None, what="the store to answer again")
        finally:
            service.close()
    assert service.metrics.total("gpurec_feed_degraded_reads_total", reason="timeout") == 1


def test_an_unconfigured_feed_answers_unavailable(contract, known_user):
    """Exported without URLs (and served without them) the feed loads and says what is missing."""
    service = FeedService(FeedSettings(), contract, "1").start()
    with pytest.raises(FeedUnavailable, match="no feature store configured"):
        service.plan(known_user, 5, 0)
    service.close()


def test_settings_precedence_and_exported_config(repo, live, tmp_path, monkeypatch):
    config = (repo / "feed" / "config.pbtxt").read_text()
    assert f'string_value: "{live.store_url}"' in config and f'string_value: "{live.log_url}"' in config
    parameters = FeedSettings(feature_store="sqlite:////a.db", event_log="sqlite:////b.db", max_n=7).parameters()
    assert FeedSettings.from_parameters(parameters).max_n == 7
    overridden = FeedSettings.from_parameters(parameters, {FEATURE_STORE_ENV: "redis://h:1/0", EVENT_LOG_ENV: ""})
    assert (overridden.feature_store, overridden.event_log) == ("redis://h:1/0", "sqlite:////b.db")
    monkeypatch.chdir(tmp_path)
    assert normalise_url("sqlite:///x/f.db", "--feature-store") == f"sqlite:///{tmp_path / 'x' / 'f.db'}"
    assert normalise_url("log.db", "--event-log") == f"sqlite:///{tmp_path / 'log.db'}"
    assert normalise_url("kafka://127.0.0.1:9092", "--event-log") == "kafka://127.0.0.1:9092"


def test_gpurec_serve_overrides_the_exported_event_log(repo, contract, live, known_user, tmp_path):
    """`gpurec serve --event-log` wins over feed/config.pbtxt; the exported feature store stays."""
    other = f"sqlite:///{tmp_path / 'other-log.db'}"
    with open_event_log(other) as log:
        log.create_topic(ITEMS_TOPIC, 1)
        log.append(ITEMS_TOPIC, [item_record(i) for i in live.items])
    command = [sys.executable, "-m", "gpurec.cli", "serve", "--repo", str(repo), "--event-log", other, "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoints = json.loads(process.stdout.readline())
        with RankerClient(endpoints["grpc"], contract, protocol="grpc") as feeds:
            result = feeds.feed(known_user, 5, ts_ms=live.now_ms, request_id=10_000_001)
        rows = wait_for(lambda: served_rows(other, 10_000_001), what="the rows in the overriding log")
        assert [r.item_id for r in rows] == result.item_ids.tolist()
        assert all(r.consent_training for r in rows), "features read from the exported store"
        assert served_rows(live, 10_000_001) == []
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0


def test_non_finite_scores_are_never_shown_or_logged_and_are_counted_by_kind(contract, live, known_user):
    """The feed checks the ranker's scores itself: NaN/inf fails the request (kind
    non_finite_output) before anything is shown or logged; a refusal relayed from the ranker keeps
    the ranker's kind; the next request is served and logged as usual."""
    from gpurec.serve.feed import RankerFailed

    settings = FeedSettings(feature_store=live.store_url, event_log=live.log_url)
    service = FeedService(settings, contract, "1").start()
    try:

        def nan_for_one(inputs: dict[str, np.ndarray]) -> np.ndarray:
            scores = inputs["dense"].sum(axis=1).astype(np.float32)
            scores[1] = np.nan
            return scores

        def ranker_refuses(inputs: dict[str, np.ndarray]) -> np.ndarray:  # the ranker's own message
            raise RankerFailed.from_ranker("ranker: non_finite_input: 'dense' has NaN or infinite values")

        with pytest.raises(RankerFailed, match="non_finite_output") as raised:
            service.serve(known_user, 5, nan_for_one, ts_ms=live.now_ms, request_id=7_000_101)
        assert raised.value.kind == "non_finite_output"
        with pytest.raises(RankerFailed, match="non_finite_input"):
            service.serve(known_user, 5, ranker_refuses, ts_ms=live.now_ms, request_id=7_000_102)
        answer = service.serve(known_user, 5, lambda inputs: inputs["dense"].sum(axis=1), ts_ms=live.now_ms, request_id=7_000_103)
        assert np.isfinite(answer.scores).all() and len(answer.item_ids) == 5
    finally:
        service.close()  # writes the queued served rows
    metrics = service.metrics
    assert metrics.total("gpurec_feed_errors_total", kind="non_finite_output") == 1
    assert metrics.total("gpurec_feed_errors_total", kind="non_finite_input") == 1
    assert metrics.total("gpurec_feed_errors_total", kind="ranker") == 0
    assert metrics.total("gpurec_feed_requests_total", outcome="failed") == 2
    assert served_rows(live, 7_000_101) == [] and served_rows(live, 7_000_102) == []
    assert [r.item_id for r in served_rows(live, 7_000_103)] == answer.item_ids.tolist()
    assert RankerFailed.from_ranker("ranker: scoring_failed: RuntimeError: boom").kind == "ranker"
