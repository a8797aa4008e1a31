"""The soak test (bounded: about 2 minutes on 2 cores): the whole live loop with traffic and kill -9.

tritonserver with the feed and the ranker following the parameter deltas, `gpurec join`, `gpurec
train --online --sync-dir` and `gpurec simulate` (simulated users) run together, as `gpurec demo`
runs them but smaller. Mid-way the joiner and then the trainer are SIGKILLed and restarted. At the
end (the joiner drained, the trainer trained what was left) the invariants must hold:

- every served row of a consenting user became exactly one example (examples unique by key);
- the trainer's examples_total equals the examples in the topic, and its digest theirs;
- the version the server serves (delta seq) never went backwards and moved past the trainer's restart;
- the feed answered every request throughout (the server itself was never down).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from conftest import serve_for_tests

from gpurec.serve.export import export_repository
from gpurec.serve.feed_settings import EVENT_LOG_ENV, FEATURE_STORE_ENV, SYNC_DIR_ENV, FeedSettings
from gpurec.stream.join import EXAMPLES, SERVED, ensure_topics
from gpurec.stream.log import open_event_log
from gpurec.stream.records import Example, ServedRow, decode
from gpurec.sync.deltafile import list_deltas
from gpurec.sync.online import examples_digest

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 2
TRAFFIC_S = 40.0
SPEEDUP = 1440.0


def _start(*argv: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "gpurec.cli", *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def _run_json(*argv: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "gpurec.cli", *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # the joiner commits its step, the trainer checkpoints
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kill9(process: subprocess.Popen) -> None:
    assert process.poll() is None, f"exited on its own with {process.returncode} before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def _topic(url: str, topic: str, kind: type) -> list:
    out = []
    with open_event_log(url) as log:
        for partition in range(log.partitions(topic)):
            offset = log.start_offsets(topic)[partition]
            while batch := log.read(topic, partition, offset, 10_000):
                out.extend(decode(r.value, kind) for r in batch)
                offset = batch[-1].offset + 1
    return out


class _VersionWatch:
    """The ranker's served delta seq (lowest over its instances), read every 0.2 s from /metrics."""

    def __init__(self, metrics_url: str) -> None:
        self.url, self.seen, self.failures = metrics_url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                self.failures += 1
                continue
            versions = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gpurec_ranker_sync_version{")]
            if versions:
                self.seen.append((time.monotonic(), min(versions)))

    def latest(self) -> float:
        return self.seen[-1][1] if self.seen else -1.0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_soak_the_live_loop_with_the_joiner_and_trainer_killed(tmp_path, small_features, batch_run):
    live = tmp_path / "live"
    live.mkdir()
    log_url, store_url = f"sqlite:///{live / 'log.db'}", f"sqlite:///{live / 'features.db'}"
    sync, online, world = live / "sync", tmp_path / "online", small_features.parent / "raw"
    feed = FeedSettings(feature_store=store_url, event_log=log_url, store_timeout_ms=2_000, served_partitions=PARTITIONS)
    repo = export_repository(batch_run, tmp_path / "repo", feed=feed).repo
    with open_event_log(log_url) as log:
        ensure_topics(log, PARTITIONS)
    join_args = ("join", "--log", log_url, "--feature-store", store_url, "--time-scale", str(SPEEDUP),
                 "--window-s", "600", "--grace-s", "600", "--idle-s", "60")  # fmt: skip
    train_args = ("train", "--online", "--from", log_url, "--init", str(batch_run), "--out", str(online), "--sync-dir", str(sync),
                  "--batch-size", "64", "--linger-s", "0.5", "--sync-every-s", "1", "--dense-every-s", "5", "--checkpoint-every-s", "3")  # fmt: skip

    trainer = _start(*train_args, log=live / "trainer.log")
    joiner = _start(*join_args, log=live / "joiner.log")
    background = [trainer, joiner]
    try:
        deadline = time.monotonic() + 300
        while not list_deltas(sync):  # the ranker starts from the trainer's first snapshot
            assert trainer.poll() is None and time.monotonic() < deadline, (live / "trainer.log").read_text()[-3000:]
            time.sleep(0.2)
        env = {SYNC_DIR_ENV: str(sync), EVENT_LOG_ENV: log_url, FEATURE_STORE_ENV: store_url}
        for server in serve_for_tests(repo, env=env):
            watch = _VersionWatch(server.metrics_url)
            traffic = subprocess.Popen(
                [sys.executable, "-m", "gpurec.cli", "simulate", "--repo", str(repo), "--url", server.grpc_url,
                 "--log", log_url, "--feature-store", store_url, "--world", str(world), "--users", "60", "--rate", "8",
                 "--duration", str(TRAFFIC_S), "--speedup", str(SPEEDUP), "--partitions", str(PARTITIONS), "--json"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            try:
                time.sleep(TRAFFIC_S * 0.3)
                _kill9(joiner)
                joiner = _start(*join_args, log=live / "joiner.log")
                background.append(joiner)
                time.sleep(TRAFFIC_S * 0.25)
                before_kill = watch.latest()
                _kill9(trainer)
                trainer = _start(*train_args, log=live / "trainer.log")
                background.append(trainer)
                simulated = json.loads(traffic.communicate(timeout=TRAFFIC_S + 300)[0].strip().splitlines()[-1])
                deadline = time.monotonic() + 120
                while watch.latest() <= before_kill and time.monotonic() < deadline:
                    time.sleep(0.2)  # the restarted trainer publishes (its start-up snapshot first)
            finally:
                if traffic.poll() is None:
                    traffic.kill()
                    traffic.wait()
                watch.stop()
    finally:
        for process in background:
            _stop(process)
    assert traffic.returncode == 0 and simulated["requests"] > 50
    assert not simulated["errors"], simulated["error_examples"]  # the feed answered throughout

    joined = _run_json(*join_args, "--drain", "--json")  # close every window the traffic opened
    trained = _run_json(*train_args, "--drain", "--json")  # train what is left

    served = _topic(log_url, SERVED, ServedRow)
    examples = _topic(log_url, EXAMPLES, Example)
    keys = collections.Counter((e.served.request_id, e.served.item_id) for e in examples)
    consenting = {(r.request_id, r.item_id) for r in served if r.consent_training}
    assert len(served) >= simulated["served_rows"] > 0
    assert set(keys) == consenting and max(keys.values()) == 1  # every served row joined exactly once
    assert joined["counters"]["examples"] == len(examples)  # the killed joiner's counters carried on
    assert trained["invalid"] == 0 and trained["examples_total"] == len(examples)  # trained exactly once
    assert trained["digest"] == examples_digest(examples)

    versions = [v for _, v in watch.seen]
    assert versions == sorted(versions), "the served version went backwards"
    assert watch.latest() > before_kill >= 0  # the restarted trainer's deltas reached the server
