"""`gpurec simulate`: the world's users live against the real feed.

In-process, without a server: pages react exactly as `World.respond` says, the action events of
each impression, late deliveries, the event clock, session budgets and arrival rates from the
world's laws, uploads into a real SQLite feature store and event log. End to end: a short run
against a real tritonserver (feed + ranker) on a real SQLite log and store, checked through the
log (served rows = what the feed answered, actions only for shown items and after them) and the
joiner; the command with `--url`, and without it (its own server, stopped on Ctrl-C).
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_WORLD, serve_for_tests, train_small

from gpurec.cli import main
from gpurec.client import load_contract
from gpurec.client.simulate import (
    SWIPE_GAP_MS,
    Delivery,
    EventClock,
    LiveConfig,
    LiveWorld,
    budget_distribution,
)
from gpurec.client.simulate_log import join_lag, newest_event_ms, prepare, start_time, upload
from gpurec.client.simulate_run import ActionProducer, Simulation, SimulationReport, SimulationSettings
from gpurec.data.generate import load_world_config
from gpurec.data.schema import MS_PER_DAY
from gpurec.data.world import World
from gpurec.features import open_feature_store
from gpurec.serve.export import export_repository
from gpurec.serve.feed_settings import FeedSettings
from gpurec.serve.items import ITEMS_TOPIC, decode_item
from gpurec.stream.join import EXAMPLES, JoinSettings, ensure_topics, run_join
from gpurec.stream.log import EventLog, Record, StoredRecord, open_event_log, partition_for
from gpurec.stream.records import Action, Example, ServedRow, decode, encode

ROOT = Path(__file__).resolve().parents[1]


def everything(log: EventLog, topic: str) -> list[StoredRecord]:
    out = []
    for partition, end in log.end_offsets(topic).items():
        offset = log.start_offsets(topic)[partition]
        while offset < end:
            records = log.read(topic, partition, offset, 10_000)
            out.extend(records)
            offset = records[-1].offset + 1
    return out


def wait_for(check, timeout_s: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def live() -> LiveWorld:
    return LiveWorld(SMALL_WORLD, users=100, seed=5)


def pages(live: LiveWorld, count: int, seed: int, budget: int = 6) -> Iterator[tuple]:
    """`count` pages of random live items for random sampled users, with the rng state before each."""
    rng = np.random.default_rng(seed)
    ids = itertools.count(1)
    catalogue = live.world.item_ids[live.uploaded(None, live.start_ms + 2 * MS_PER_DAY)]
    for request_id in range(count):
        user = int(rng.integers(len(live.user_ids)))
        shown = rng.choice(catalogue, size=live.page_size, replace=False)
        start = live.start_ms + int(rng.integers(0, 2 * MS_PER_DAY))
        before = np.random.default_rng(rng.integers(1 << 62))
        state = before.bit_generator.state
        page = live.view_page(user, request_id, shown, budget, 3, start, before, ids)
        yield user, shown, start, state, page


# ---- the behaviour model, in-process --------------------------------------------------------------


def test_pages_react_exactly_as_the_world_responds(live):
    world = World(SMALL_WORLD)  # a plain World: the live one must not be a second model
    rows = {int(i): r for r, i in enumerate(world.item_ids)}
    for user, shown, start, state, page in pages(live, 40, seed=1, budget=4):
        rng = np.random.default_rng()
        rng.bit_generator.state = state
        items = np.array([rows[int(i)] for i in shown[:4]])
        positions = 3 + np.arange(4)
        want = world.respond(np.full(4, live.user_rows[user]), items, world.day_index(start), positions, rng)
        assert page.item_ids.tolist() == shown[:4].tolist()  # what was shown, in order, up to the budget
        assert page.positions.tolist() == positions.tolist()
        for name in ("skip", "like", "share", "comment", "follow", "p_like", "p_finish"):
            assert np.array_equal(getattr(page.response, name), getattr(want, name)), name
        assert np.array_equal(page.response.watch_ms, want.watch_ms)


def test_each_impression_gives_a_watch_event_then_one_event_per_engagement(live):
    engaged = Counter()
    all_ids = []
    for user, _, start, _, page in pages(live, 400, seed=2):
        r = page.response
        user_id = int(live.user_ids[user])
        # Impressions follow each other: watch time plus a swipe gap, from the page's start.
        assert page.start_ms[0] == start
        gaps = np.diff(page.start_ms) - np.maximum(r.watch_ms[:-1], 1)
        assert ((gaps >= SWIPE_GAP_MS[0]) & (gaps < SWIPE_GAP_MS[1])).all()
        assert page.end_ms > page.start_ms[-1] + r.watch_ms[-1]
        by_item: dict[int, list[Action]] = {}
        for d in page.deliveries:
            assert d.action.user_id == user_id and d.deliver_ms >= d.action.ts_ms
            by_item.setdefault(d.action.item_id, []).append(d.action)
            all_ids.append(d.action.action_id)
        for j, item in enumerate(page.item_ids.tolist()):
            watch, *follow_ups = by_item[item]
            assert watch.ts_ms == page.start_ms[j] + max(int(r.watch_ms[j]), 1) > start
            assert (watch.watch_ms, watch.skip) == (max(int(r.watch_ms[j]), 1), bool(r.skip[j]))
            assert not (watch.like or watch.share or watch.comment or watch.follow)
            flags = [name for name in ("like", "share", "comment", "follow") if getattr(r, name)[j]]
            assert sorted(n for a in follow_ups for n in flags if getattr(a, n)) == sorted(flags)
            for a in follow_ups:  # one engagement each, after the watch, counting no second play
                assert a.ts_ms > watch.ts_ms and a.watch_ms == 0 and not a.skip
                assert sum((a.like, a.share, a.comment, a.follow)) == 1
            engaged.update(flags)
    assert len(all_ids) == len(set(all_ids))
    assert engaged["like"] > 0 and engaged["share"] + engaged["comment"] + engaged["follow"] > 0


def test_late_impressions_deliver_all_their_events_late(live):
    late_live = LiveWorld(SMALL_WORLD, users=100, seed=5, live=LiveConfig(late_share=0.3))
    delays = []
    for *_, page in pages(late_live, 300, seed=3):
        by_item: dict[int, set[int]] = {}
        for d in page.deliveries:
            by_item.setdefault(d.action.item_id, set()).add(d.deliver_ms - d.action.ts_ms)
        for extra in by_item.values():
            assert len(extra) == 1  # an offline app sends an impression's events together
            delays.append(extra.pop())
    delays = np.array(delays)
    late = delays[delays > 0]
    assert 0.25 < len(late) / len(delays) < 0.35
    assert late.min() >= LiveConfig.late_min_ms and late.max() <= LiveConfig.late_max_ms


def test_budget_and_unknown_items_limit_what_is_viewed(live):
    shown = live.world.item_ids[live.uploaded(None, live.start_ms)[:6]].copy()
    shown[1] = 12345  # not an item of this world
    page = live.view_page(0, 1, shown, 3, 0, live.start_ms, np.random.default_rng(0), itertools.count())
    assert page.unknown == 1
    assert page.item_ids.tolist() == [shown[0], shown[2], shown[3]]
    assert {d.action.item_id for d in page.deliveries} == set(page.item_ids.tolist())


def test_event_clock_runs_speedup_times_faster_than_wall_time():
    wall = [100.0]
    clock = EventClock(1_000_000, 1440.0, wall=lambda: wall[0])
    assert clock.now_ms() == 1_000_000
    wall[0] = 101.5
    assert clock.now_ms() == 1_000_000 + 1_500 * 1440
    assert clock.wall_at(1_000_000 + MS_PER_DAY) == pytest.approx(160.0)  # a simulated day a minute
    assert clock.seconds_until(1_000_000 + MS_PER_DAY) == pytest.approx(58.5)


def test_sessions_and_arrivals_follow_the_worlds_laws(live):
    values, p = budget_distribution(SMALL_WORLD)
    assert values.max() == SMALL_WORLD.max_session_budget
    assert p[0] / p[1] == pytest.approx(2**SMALL_WORLD.session_budget_exponent)
    rng = np.random.default_rng(0)
    budgets = np.array([live.draw_budget(rng) for _ in range(20_000)])
    assert budgets.mean() == pytest.approx((values * p).sum(), rel=0.05)
    pages_per_session = np.ceil(budgets / live.page_size).mean()
    assert live.mean_requests_per_session() == pytest.approx(pages_per_session, rel=0.05)
    assert live.session_arrival_rate(30.0) * live.mean_requests_per_session() == pytest.approx(30.0)
    # Sessions pick users by their activity, never one already in a session.
    users = Counter(live.draw_user(rng) for _ in range(20_000))
    heaviest = int(np.argmax(live.user_weights))
    assert users[heaviest] / 20_000 == pytest.approx(live.user_weights[heaviest], abs=0.01)
    busy = set(range(len(live.user_ids))) - {7}
    assert live.draw_user(rng, busy) == 7
    assert live.draw_user(rng, busy | {7}) is None


def test_prepare_and_uploads_fill_the_store_and_the_items_topic(live, tmp_path):
    log_url, store_url = f"sqlite:///{tmp_path / 'log.db'}", f"sqlite:///{tmp_path / 'features.db'}"
    with open_event_log(log_url) as log, open_feature_store(store_url) as store:
        start_ms, catalogue = prepare(log, store, live, partitions=3, start_day=1)
        assert start_ms == live.start_ms + MS_PER_DAY
        assert {log.partitions(t) for t in ("items", "actions", "served")} == {3}
        assert store.stats()["users"] == len(live.user_ids)
        first = {decode_item(r.value).item_id: r.timestamp_ms for r in everything(log, ITEMS_TOPIC)}
        world = live.world
        live_then = world.item_upload_ms <= start_ms
        assert catalogue == len(first) == int(live_then.sum())
        assert first == dict(
            zip(world.item_ids[live_then].tolist(), world.item_upload_ms[live_then].tolist(), strict=True)
        )
        # A day of event time uploads that day's items, into the store and on the topic.
        rows = live.uploaded(start_ms, start_ms + MS_PER_DAY)
        assert upload(log, store, live, rows) == len(rows) > 0
        new = world.item_ids[rows]
        assert (
            (world.item_upload_ms[rows] > start_ms) & (world.item_upload_ms[rows] <= start_ms + MS_PER_DAY)
        ).all()
        assert store.read(int(live.user_ids[0]), new, start_ms + MS_PER_DAY).item_known.all()
        assert len(everything(log, ITEMS_TOPIC)) == catalogue + len(rows)
        # A second run continues after the log's newest action and re-puts nothing on the topic.
        action = Action(
            1, 2, int(new[0]), int(live.user_ids[0]), start_ms + 5_000, 10, False, False, False, False, False
        )
        log.append("actions", [Record(action.user_id, encode(action), action.ts_ms)])
        assert start_time(log, live, 1) == start_ms + 5_001
        again, _ = prepare(log, store, live, partitions=3, start_day=1)
        assert again == start_ms + 5_001
        assert len(everything(log, ITEMS_TOPIC)) == catalogue + len(rows) + int(
            ((world.item_upload_ms > start_ms + MS_PER_DAY) & (world.item_upload_ms <= again)).sum()
        )
        assert join_lag(log, "joiner") is None  # no joiner has committed on this log


def test_action_producer_appends_due_events_keyed_by_user_and_the_rest_on_close(tmp_path):
    with open_event_log(tmp_path / "log.db") as log:
        log.create_topic("actions", 4)
        clock = EventClock(1_000_000, 1.0)
        report = SimulationReport()
        producer = ActionProducer(log, clock, report).start()
        due = [
            Action(i, 1, 10 + i, 7_000 + i, 999_000 + i, 5, False, False, False, False, True)
            for i in range(5)
        ]
        later = Action(99, 1, 99, 7_099, 1_000_100, 5, False, False, False, False, True)
        producer.schedule([Delivery(a.ts_ms, a) for a in due] + [Delivery(1_000_000 + 3_600_000, later)])
        wait_for(lambda: len(everything(log, "actions")) == 5, what="the due events")
        producer.close()  # the event an hour away is appended now, with its own event time
        records = everything(log, "actions")
        assert report.actions == 6 and not report.errors
        for r in records:
            action = decode(r.value, Action)
            assert (r.key, r.timestamp_ms, r.partition) == (
                action.user_id,
                action.ts_ms,
                partition_for(action.user_id, 4),
            )
        assert sorted(decode(r.value, Action).action_id for r in records) == [0, 1, 2, 3, 4, 99]


# ---- end to end: a real feed --------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    root: Path
    repo: Path
    world: Path
    log_url: str
    store_url: str
    report: SimulationReport
    settings: SimulationSettings


@pytest.fixture(scope="module")
def served_world(small_features, tmp_path_factory) -> Iterator[tuple]:
    """A trained ranker exported with its feed on a fresh log and store, the catalogue prepared, served."""
    root = tmp_path_factory.mktemp("simulate")
    world = small_features.parent / "raw"
    log_url, store_url = f"sqlite:///{root / 'log.db'}", f"sqlite:///{root / 'features.db'}"
    live = LiveWorld(load_world_config(world), users=80, seed=3)
    settings = SimulationSettings(rate=25, duration_s=4, speedup=14_400, seed=3, partitions=2)
    with open_event_log(log_url) as log, open_feature_store(store_url) as store:
        start_ms, catalogue = prepare(log, store, live, partitions=settings.partitions)
    train_small(small_features, root / "run", max_steps=10)
    feed = FeedSettings(feature_store=store_url, event_log=log_url, store_timeout_ms=2_000)
    export_repository(root / "run", root / "repo", feed=feed)
    for server in serve_for_tests(root / "repo"):
        yield root, world, live, settings, start_ms, catalogue, server


@pytest.fixture(scope="module")
def run(served_world) -> Run:
    root, world, live, settings, start_ms, catalogue, server = served_world
    log_url, store_url = f"sqlite:///{root / 'log.db'}", f"sqlite:///{root / 'features.db'}"
    with (
        open_event_log(log_url) as log,
        open_feature_store(store_url) as store,
        open_event_log(log_url) as joiner_log,
    ):
        # The joiner runs while the traffic does (so it meets late actions and shows a lag), as `gpurec join` would.
        ensure_topics(joiner_log, joiner_log.partitions("served"))
        stop, failures = threading.Event(), []

        def join() -> None:
            try:
                run_join(joiner_log, JoinSettings(time_scale=settings.speedup), stop=stop)
            except BaseException as err:
                failures.append(err)

        joiner = threading.Thread(target=join, daemon=True)
        joiner.start()
        simulation = Simulation(
            live, log, server.grpc_url, load_contract(root / "repo"), settings, keep_answers=True
        )
        try:
            report = simulation.run(start_ms, store, catalogue)
        finally:
            stop.set()
            joiner.join(60)
    assert not failures and not joiner.is_alive()
    return Run(root, root / "repo", world, log_url, store_url, report, settings)


def test_a_short_run_serves_users_and_logs_what_the_feed_answered(run):
    r = run.report
    assert r.requests > 10 and not r.errors, (r.requests, r.errors, r.error_examples)
    assert r.join_lag is not None  # the live joiner committed: its lag was measured
    assert r.served_rows == sum(len(a.item_ids) for a in r.answers) == 6 * r.requests
    assert 0 < r.impressions <= r.served_rows and r.actions >= r.impressions
    assert r.uploads > 0 and r.end_ms - r.start_ms >= run.settings.duration_s * run.settings.speedup * 1000
    answered = {
        (a.request_id, item, position, a.user_id, a.ts_ms)
        for a in r.answers
        for position, item in enumerate(a.item_ids)
    }
    with open_event_log(run.log_url) as log:
        rows = wait_for(
            lambda: (rows := [decode(x.value, ServedRow) for x in everything(log, "served")])
            and len(rows) >= r.served_rows
            and rows,
            what="the feed's served rows",
        )
        assert {(s.request_id, s.item_id, s.position, s.user_id, s.ts_ms) for s in rows} == answered
        served = {(s.request_id, s.item_id): s.ts_ms for s in rows}
        actions = [(x, decode(x.value, Action)) for x in everything(log, "actions")]
        assert len(actions) == r.actions
        assert len({a.action_id for _, a in actions}) == len(actions)
        for record, a in actions:  # only for shown items, after they were served, keyed by user
            assert a.ts_ms > served[(a.request_id, a.item_id)]
            assert (record.key, record.timestamp_ms) == (a.user_id, a.ts_ms)
        assert len({(a.request_id, a.item_id) for _, a in actions if a.watch_ms > 0}) == r.impressions
        uploads = [decode_item(x.value) for x in everything(log, ITEMS_TOPIC)]
        assert len(uploads) == r.catalogue + r.uploads
        assert max(i.upload_ts_ms for i in uploads) <= r.end_ms


def test_the_joiner_turns_the_run_into_examples(run):
    r = run.report
    with open_event_log(run.log_url) as log:  # the rest of what the live joiner had not closed yet
        joined = run_join(log, JoinSettings(time_scale=run.settings.speedup, poll_s=0.0), drain=True)
        examples = [decode(x.value, Example) for x in everything(log, EXAMPLES)]
        assert join_lag(log, "joiner") == 0
    c = joined.counters  # since the joiner's state began: the live part and the drain
    assert c["served"] == r.served_rows and c["actions"] == r.actions
    assert c["examples"] + c["non_consenting"] == r.served_rows
    assert len(examples) == c["examples"] > 0
    assert 0 < c["positives"] <= r.impressions  # a viewed item has a watch event (unless it came too late)
    assert "outside window" not in c["dead_letters"]  # every action lies within its row's window
    assert c["negatives"] >= r.served_rows - r.impressions - c["non_consenting"]  # served, never reached
    assert all(e.actions > 0 for e in examples if e.like or e.watch_ms > 0)


def test_command_with_url_prints_one_json_object(served_world, capsys):
    root, world, *_, server = served_world
    log_url, store_url = f"sqlite:///{root / 'log.db'}", f"sqlite:///{root / 'features.db'}"
    with open_event_log(log_url) as log:
        before, newest = sum(log.end_offsets("actions").values()), newest_event_ms(log)
    code = main([
        "simulate", "--repo", str(root / "repo"), "--log", log_url, "--feature-store", store_url,
        "--url", server.grpc_url, "--world", str(world), "--users", "20", "--rate", "10",
        "--duration", "2", "--speedup", "7200", "--json",
    ])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    result = json.loads(out[0])
    for key in (
        "requests",
        "served_rows",
        "actions",
        "uploads",
        "errors",
        "feed_p50_ms",
        "feed_p99_ms",
        "achieved_rate",
        "event_time_span_ms",
    ):
        assert key in result
    assert result["requests"] > 0 and result["errors"] == {} and result["achieved_rate"] > 0
    assert result["feed_p50_ms"] <= result["feed_p99_ms"]
    with open_event_log(log_url) as log:
        assert sum(log.end_offsets("actions").values()) - before == result["actions"] > 0
    if newest is not None:  # a second run on a log continues after its newest events
        assert result["start_ms"] > newest


def test_command_errors_are_one_line(tmp_path, capsys):
    assert (
        main(["simulate", "--repo", str(tmp_path / "none"), "--log", "x.db", "--feature-store", "y.db"]) == 2
    )
    assert (
        main(["simulate", "--repo", str(tmp_path), "--log", "x.db", "--feature-store", "y.db", "--rate", "0"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("gpurec simulate: ") for line in err)
    assert "does not exist" in err[0] and "--rate" in err[1]


def test_command_starts_its_own_server_and_stops_it_on_ctrl_c(served_world, tmp_path):
    root, world, *_ = served_world
    command = [
        sys.executable, "-m", "gpurec.cli", "simulate", "--repo", str(root / "repo"),
        "--log", f"sqlite:///{tmp_path / 'log.db'}", "--feature-store", f"sqlite:///{tmp_path / 'features.db'}",
        "--world", str(world), "--users", "10", "--rate", "5", "--duration", "300", "--json",
    ]  # fmt: skip
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            started = wait_for(
                lambda: next(
                    (x for x in errors.read_text().splitlines() if "started tritonserver (pid" in x), None
                ),
                120,
                "the server to start",
            )
            pid = int(started.split("(pid ")[1].split(",")[0])
            time.sleep(1.5)  # some traffic
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
    said = errors.read_text()
    assert process.returncode == 130, said
    result = json.loads(out.strip().splitlines()[-1])
    assert result["interrupted"] is True and result["requests"] > 0
    assert "stopped tritonserver (exit code 0)" in said, said
    assert not Path(f"/proc/{pid}").exists()
