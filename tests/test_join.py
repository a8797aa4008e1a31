"""`gpurec join` on the embedded event log: exactly once across kill -9, idle flush, bad records.

The state machine itself is tested in test_joiner.py; here it runs on a real SQLite event log, with
its offsets, outputs and state committed in one transaction per step.
"""

from __future__ import annotations

import collections
import dataclasses
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

from gpurec.errors import InvalidInput
from gpurec.stream.join import ACTIONS, DEAD_LETTER, EXAMPLES, SERVED, JoinSettings, ensure_topics, run_join
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import Action, Example, ModelInputs, ServedRow, decode, encode, encode_inputs

WINDOW_MS = 60_000
BASE_MS = 1_760_000_000_000


def make_stream(requests: int, seed: int) -> tuple[list[ServedRow], list[tuple[Action, bool]]]:
    """Served rows (6 per request, 1 in 10 users without training consent) and actions: about half the
    rows get one, some a second (a later like), 2% repeated (same action_id), 1% appended late, a
    few on rows never served. Each action comes with whether it is appended at the very end (late)."""
    rng = random.Random(seed)
    rows, actions = [], []
    action_id = 0
    for r in range(requests):
        user = rng.randrange(200)
        ts = BASE_MS + r * 2_000  # a request every 2 s: the stream spans many windows
        for position in range(6):
            item = rng.randrange(5_000)
            inputs = ModelInputs(dense=(rng.random(), float(position)), sparse={"user_id": (user,), "item_id": (item,)})
            rows.append(ServedRow(r, item, user, ts, position, "v1", 20_000, user % 10 != 0, encode_inputs(inputs)))
            if rng.random() < 0.5:
                action_id += 1
                late = rng.random() < 0.01
                watch = Action(action_id, r, item, user, ts + rng.randrange(1, 30_000), rng.randrange(25_000),
                               rng.random() < 0.2, False, False, False, rng.random() < 0.3)  # fmt: skip
                actions.append((watch, late))
                if rng.random() < 0.02:
                    actions.append((watch, False))  # redelivered: same action_id
                if rng.random() < 0.1:
                    action_id += 1
                    like = Action(action_id, r, item, user, watch.ts_ms + 5_000, 0, True, False, False, False, False)
                    actions.append((like, False))
        if rng.random() < 0.02:
            action_id += 1
            actions.append((Action(action_id, -r - 1, 1, user, ts + 10, 100, True, False, False, False, False), False))
    return rows, actions


def fill_log(url: str, rows, actions, partitions: int = 2) -> None:
    with open_event_log(url) as log:
        ensure_topics(log, partitions)
        log.append(SERVED, [Record(r.user_id, encode(r), r.ts_ms) for r in rows])
        on_time = [a for a, late in actions if not late]
        late = [a for a, late in actions if late]
        log.append(ACTIONS, [Record(a.user_id, encode(a), a.ts_ms) for a in sorted(on_time, key=lambda a: a.ts_ms)])
        log.append(ACTIONS, [Record(a.user_id, encode(a), a.ts_ms) for a in late])


def read_topic(url: str, topic: str) -> list[bytes]:
    out = []
    with open_event_log(url) as log:
        for partition in range(log.partitions(topic)):
            offset = log.start_offsets(topic)[partition]
            while batch := log.read(topic, partition, offset, 10_000):
                out.extend(r.value for r in batch)
                offset = batch[-1].offset + 1
    return out


SETTINGS = JoinSettings(window_ms=WINDOW_MS, grace_ms=100 * WINDOW_MS, out_of_order_ms=1_000, idle_ms=10**12, batch=100, poll_s=0)


def test_drain_emits_one_example_per_consenting_served_row(tmp_path):
    rows, actions = make_stream(150, seed=1)
    url = f"sqlite:///{tmp_path}/log.db"
    fill_log(url, rows, actions)
    with open_event_log(url) as log:
        report = run_join(log, SETTINGS, drain=True)
    examples = [decode(v, Example) for v in read_topic(url, EXAMPLES)]
    keys = collections.Counter((e.served.request_id, e.served.item_id) for e in examples)
    consenting = {(r.request_id, r.item_id) for r in rows if r.consent_training}
    assert set(keys) == consenting and max(keys.values()) == 1
    assert report.examples == len(examples) and report.counters["non_consenting"] == len(rows) - len(consenting)
    # inputs reach the example byte for byte; labels from the joined actions
    by_key = {(r.request_id, r.item_id): r for r in rows}
    assert all(e.served == by_key[(e.served.request_id, e.served.item_id)] for e in examples)
    liked = {(a.request_id, a.item_id) for a, late in actions if a.like and not late and a.request_id >= 0}
    assert {k for k in consenting if k in liked} <= {(e.served.request_id, e.served.item_id) for e in examples if e.like}
    counters = report.counters
    assert counters["duplicates"] > 0 and counters["late"] > 0 and counters["dead_letters"]["no served row"] > 0
    dead = read_topic(url, DEAD_LETTER)
    assert len(dead) == report.dead_letters == sum(counters["dead_letters"].values())


def _committed_steps(url: str, group: str) -> int:
    with open_event_log(url) as log:
        return sum(log.committed(group, SERVED).values())


def test_exactly_once_across_kill_9_at_random_points(tmp_path):
    """A joiner process killed with SIGKILL again and again, restarted each time, emits exactly what an
    uninterrupted run emits: every example once, none lost, none repeated."""
    rows, actions = make_stream(1_500, seed=2)  # 9,000 served rows
    reference_url, url = f"sqlite:///{tmp_path}/reference.db", f"sqlite:///{tmp_path}/killed.db"
    fill_log(reference_url, rows, actions)
    fill_log(url, rows, actions)
    with open_event_log(reference_url) as log:  # the same step size as the killed runs: same watermark steps
        run_join(log, dataclasses.replace(SETTINGS, batch=20), drain=True)
    expected = collections.Counter(read_topic(reference_url, EXAMPLES))

    command = [sys.executable, "-m", "gpurec.cli", "join", "--log", url, "--drain", "--json", "--batch", "20",
               "--window-s", str(WINDOW_MS / 1000), "--grace-s", str(100 * WINDOW_MS / 1000), "--out-of-order-s", "1",
               "--idle-s", "1e9"]  # fmt: skip
    rng = random.Random(7)
    kills = 0
    for _attempt in range(40):
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
        before = _committed_steps(url, "joiner")
        deadline = time.monotonic() + 60
        while proc.poll() is None and _committed_steps(url, "joiner") == before and time.monotonic() < deadline:
            time.sleep(0.01)  # wait until this run commits, then kill it somewhere in its stream of commits
        time.sleep(rng.uniform(0, 0.15))
        if proc.poll() is None and kills < 8:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        report = json.loads(out.decode().strip().splitlines()[-1])
        break
    else:
        pytest.fail("the joiner never finished")
    assert kills >= 3, "the kill never landed while the joiner was running"
    got = collections.Counter(read_topic(url, EXAMPLES))
    assert got == expected  # identical examples, each exactly once
    assert sum(got.values()) == len({(r.request_id, r.item_id) for r in rows if r.consent_training})
    assert report["counters"]["examples"] == sum(got.values())


def test_a_stopped_joiner_resumes_where_it_committed(tmp_path):
    """In-process restarts after every few steps give the uninterrupted output (and the watermark's
    per-input maxima survive the restart, so windows close the same way)."""
    rows, actions = make_stream(200, seed=3)
    urls = [f"sqlite:///{tmp_path}/{name}.db" for name in ("once", "restarted")]
    for url in urls:
        fill_log(url, rows, actions)
    with open_event_log(urls[0]) as log:
        run_join(log, SETTINGS, drain=True)
    for _ in range(200):
        stop = threading.Event()
        steps = []

        def halt(report, stop=stop, steps=steps):
            steps.append(report.steps)
            if len(steps) >= 3:
                stop.set()

        with open_event_log(urls[1]) as log:
            report = run_join(log, SETTINGS, drain=True, stop=stop, on_step=halt)
        if not stop.is_set():
            break
    assert read_topic(urls[1], EXAMPLES) and collections.Counter(read_topic(urls[1], EXAMPLES)) == collections.Counter(
        read_topic(urls[0], EXAMPLES)
    )
    assert report.input_lag == 0


def test_idle_inputs_still_flush_without_drain(tmp_path):
    """With no new records the watermark advances with processing time (x time_scale), so the last
    windows close although nothing newer arrives."""
    rows, actions = make_stream(20, seed=4)
    url = f"sqlite:///{tmp_path}/log.db"
    fill_log(url, rows, actions)
    settings = JoinSettings(window_ms=WINDOW_MS, grace_ms=0, idle_ms=1_000, time_scale=600.0, batch=100, poll_s=0.01)
    stop = threading.Event()
    want = len({(r.request_id, r.item_id) for r in rows if r.consent_training})
    done = []

    def watch(report):
        if report.examples >= want:
            done.append(report)
            stop.set()

    def stop_later():
        if not stop.wait(30):
            stop.set()

    threading.Thread(target=stop_later, daemon=True).start()
    with open_event_log(url) as log:
        run_join(log, settings, stop=stop, on_step=watch)
    assert done, "idle partitions never flushed"
    assert len(read_topic(url, EXAMPLES)) == want


def test_undecodable_records_become_dead_letters_and_bad_setups_are_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/log.db"
    rows, _ = make_stream(3, seed=5)
    fill_log(url, rows, [])
    with open_event_log(url) as log:
        log.append(SERVED, [Record(7, b"\x01not msgpack", BASE_MS)])
        log.append(ACTIONS, [Record(7, encode(rows[0]), BASE_MS)])  # a served row on the actions topic
        report = run_join(log, SETTINGS, drain=True)
        assert report.counters["examples"] == len({(r.request_id, r.item_id) for r in rows if r.consent_training})
        with pytest.raises(InvalidInput, match="out of range"):
            run_join(log, SETTINGS, partitions=[5])
        log.create_topic("served_wide", 3)
    letters = read_topic(url, DEAD_LETTER)
    assert len(letters) == 2 and report.dead_letters == 2
    other = f"sqlite:///{tmp_path}/mismatch.db"
    with open_event_log(other) as log:
        log.create_topic(SERVED, 2)
        log.create_topic(ACTIONS, 3)
        with pytest.raises(InvalidInput, match="partitioned alike"):
            ensure_topics(log, 2)


def test_the_joiner_keeps_the_online_counters_current_and_a_replay_changes_nothing(tmp_path):
    from gpurec.features.store import open_feature_store

    rows, actions = make_stream(100, seed=6)
    url = f"sqlite:///{tmp_path}/log.db"
    fill_log(url, rows, actions)
    store = open_feature_store(f"sqlite:///{tmp_path}/features.db")
    users = sorted({r.user_id for r in rows})
    items = sorted({r.item_id for r in rows})
    store.put_users({
        "user_id": users, "region": ["eu"] * len(users), "device": ["ios"] * len(users),
        "language": ["en"] * len(users), "signup_ts": [BASE_MS - 1] * len(users),
        "consent_personalisation": [True] * len(users), "consent_training": [u % 10 != 0 for u in users],
    })  # fmt: skip
    store.put_items({
        "item_id": items, "author_id": [1] * len(items), "duration_ms": [20_000] * len(items),
        "upload_ts": [BASE_MS - 1] * len(items), "hashtags": [["a"]] * len(items), "language": ["en"] * len(items),
        "region": ["eu"] * len(items),
    })  # fmt: skip
    with open_event_log(url) as log:
        run_join(log, SETTINGS, drain=True, store=store)
        after_once = store.stats()
        # The same records delivered again (another group starts from the beginning): nothing changes.
        run_join(log, dataclasses.replace(SETTINGS, group="replay"), drain=True, store=store)
    consenting = {(r.request_id, r.item_id) for r in rows if r.consent_training}
    assert after_once["impressions"] == len(consenting)
    assert store.stats() == after_once
    # The dense features the feed reads now count those impressions: user_impressions = log1p(n).
    import math

    from gpurec.preprocess.features import DENSE_FEATURES

    user = next(r.user_id for r in rows if r.consent_training)
    seen = len({(r.request_id, r.item_id) for r in rows if r.user_id == user})
    features = store.read(user, [rows[0].item_id], BASE_MS + 10**9)
    column = [f.name for f in DENSE_FEATURES].index("user_impressions")
    assert features.user_known and features.dense[0, column] == pytest.approx(math.log1p(seen), rel=1e-6)
    store.close()


def test_the_same_joiner_runs_on_kafka_with_transactions(tmp_path):
    """The runner is backend-independent: on a real Kafka-protocol broker (noida-db) each step is a
    Kafka transaction (offsets sent to it, examples and state changelog inside), and the examples
    equal those of the SQLite run of the same records."""
    from gpurec.stream.broker import KafkaBroker

    rows, actions = make_stream(40, seed=8)
    local = f"sqlite:///{tmp_path}/log.db"
    fill_log(local, rows, actions)
    with open_event_log(local) as log:
        run_join(log, SETTINGS, drain=True)
    with KafkaBroker(tmp_path / "kafka") as broker:
        fill_log(broker.url, rows, actions)
        with open_event_log(broker.url) as log:
            report = run_join(log, SETTINGS, drain=True)
        on_kafka = collections.Counter(read_topic(broker.url, EXAMPLES))
    assert on_kafka == collections.Counter(read_topic(local, EXAMPLES))
    assert report.examples == sum(on_kafka.values()) > 0
