"""Running the live simulation: simulated users asking a real feed server, their actions on the log.

    live = LiveWorld(world_config, users=200, seed=0)
    start_ms, catalogue = prepare(log, store, live)       # gpurec.client.simulate_log, before the server
    report = Simulation(live, log, url, contract, settings).run(start_ms, store, catalogue)

One asyncio loop drives the sessions (`gpurec.client.AsyncRankerClient`: a session mostly waits,
for the feed or for its user to scroll, so thousands of them share one thread); sessions open as a
Poisson process whose rate makes `rate` feed requests per wall-clock second on average. A page is
seen the feed's real latency (not scaled by the speedup) after its request's event time. Two threads
write the log: `ActionProducer` appends each action event when event time reaches its delivery
time, and the background thread uploads items as event time passes their upload time (feature
store first, then the `items` topic, so an item the feed can pick already has features) and
measures the joiner's lag. Each request carries its event time, `EventClock.now_ms()` when sent.

When the run ends (its duration, a stop event, Ctrl-C), no new request is sent, requests in flight
finish (for up to `STOP_GRACE_S`), and the action events still waiting for their delivery time are appended at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpurec.client import AsyncRankerClient, ClientError, UnknownModel
from gpurec.client.simulate import Delivery, EventClock, LiveWorld
from gpurec.client.simulate_log import ACTIONS_TOPIC, join_lag, upload
from gpurec.errors import InvalidInput
from gpurec.features.store import OnlineFeatureStore
from gpurec.stream.log import EventLog, Record
from gpurec.stream.records import Action, encode

PROGRESS_EVERY_S = 0.5
BACKGROUND_TICK_S = 0.1
LAG_EVERY_S = 1.0
STOP_GRACE_S = 5.0  # how long requests in flight at the end may still take


@dataclass(frozen=True)
class SimulationSettings:
    """How much traffic, for how long, how fast event time runs, and where it starts."""

    rate: float = 20.0  # feed requests per wall-clock second, on average
    duration_s: float = 10.0  # wall-clock seconds of traffic
    speedup: float = 1440.0  # event-time ms per wall-clock ms (1440: a simulated day per minute)
    seed: int = 0
    start_day: int = 0  # event time starts at the world's day `start_day` (or after the log's newest event)
    partitions: int = 4  # of the topics this creates
    protocol: str = "grpc"
    timeout_s: float = 10.0  # per feed request
    max_in_flight: int = 16  # feed requests outstanding at once; more wait in the simulator (open loop)
    group: str = "joiner"  # the consumer group whose committed offsets give the join lag

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.duration_s > 0 or not self.speedup > 0:
            raise InvalidInput("rate, duration and speedup must be positive")
        if self.start_day < 0 or self.partitions < 1 or self.max_in_flight < 1:
            raise InvalidInput("start_day must be >= 0, partitions and max_in_flight >= 1")


@dataclass(frozen=True)
class Answer:
    """What the feed answered one simulated request (kept only when asked: tests, audits)."""

    request_id: int
    user_id: int
    ts_ms: int
    item_ids: tuple[int, ...]


@dataclass
class SimulationReport:
    """What a run did. `requests` counts answered feed requests; failed ones are in `errors`."""

    requests: int = 0
    served_rows: int = 0  # items the feed answered (what it logs as served rows)
    impressions: int = 0  # items the users scrolled to (reacted to)
    actions: int = 0  # action events appended to the log
    late_actions: int = 0  # of those, delivered late (after their event time, as an offline app would)
    uploads: int = 0  # items uploaded during the run
    catalogue: int = 0  # items already live when the run started
    sessions: int = 0
    no_idle_user: int = 0  # session arrivals dropped because every sampled user was in a session
    errors: Counter = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)  # the first message of each kind
    latencies_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    start_ms: int = 0
    end_ms: int = 0
    wall_start: float = 0.0  # time.monotonic() when event time was start_ms (the run's EventClock)
    join_lag: int | None = None  # records of served + actions the joiner group has not committed
    interrupted: bool = False
    fatal: str = ""  # why the run stopped early (the server has no feed model, ...)
    answers: list[Answer] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_error(self, kind: str, n: int = 1, message: str = "") -> None:
        """Count `n` errors of `kind` (from any of the run's threads), keeping its first message."""
        with self._lock:
            self.errors[kind] += n
            if message and kind not in self.error_examples:
                self.error_examples[kind] = message[:300]

    def to_json(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, np.float64)
        p50, p99 = (float(np.percentile(lat, q)) if lat.size else None for q in (50, 99))
        return {
            "requests": self.requests,
            "served_rows": self.served_rows,
            "impressions": self.impressions,
            "actions": self.actions,
            "late_actions": self.late_actions,
            "uploads": self.uploads,
            "catalogue": self.catalogue,
            "sessions": self.sessions,
            "no_idle_user": self.no_idle_user,
            "errors": dict(sorted(self.errors.items())),
            "error_examples": dict(sorted(self.error_examples.items())),
            "feed_p50_ms": None if p50 is None else round(p50, 3),
            "feed_p99_ms": None if p99 is None else round(p99, 3),
            "achieved_rate": round(self.requests / self.wall_s, 3) if self.wall_s > 0 else 0.0,
            "wall_s": round(self.wall_s, 3),
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "event_time_span_ms": self.end_ms - self.start_ms,
            "join_lag": self.join_lag,
            "interrupted": self.interrupted,
            "fatal": self.fatal,
        }


class ActionProducer:
    """Appends action events to `actions` (keyed by user) when event time reaches their delivery time."""

    def __init__(self, log: EventLog, clock: EventClock, report: SimulationReport) -> None:
        self.log, self.clock, self.report = log, clock, report
        self._heap: list[tuple[int, int, Action]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="gpurec-simulate-actions", daemon=True)

    def start(self) -> ActionProducer:
        self._thread.start()
        return self

    def schedule(self, deliveries: list[Delivery]) -> None:
        with self._cond:
            for d in deliveries:
                heapq.heappush(self._heap, (d.deliver_ms, next(self._seq), d.action))
            self._cond.notify()

    def _due(self, everything: bool) -> list[Record]:
        with self._cond:
            while not self._closed and not everything:
                wait = self.clock.seconds_until(self._heap[0][0]) if self._heap else None
                if wait is not None and wait <= 0:
                    break
                self._cond.wait(wait)
            flush = everything or self._closed
            out = []
            while self._heap and (flush or self.clock.seconds_until(self._heap[0][0]) <= 0):
                _, _, action = heapq.heappop(self._heap)
                out.append(Record(action.user_id, encode(action), action.ts_ms))
            return out

    def _append(self, records: list[Record]) -> None:
        if not records:
            return
        try:
            self.log.append(ACTIONS_TOPIC, records)
            self.report.actions += len(records)
        except Exception as err:  # a failed append loses those events; counted, the run goes on
            self.report.count_error(f"actions_append:{type(err).__name__}", len(records), str(err))

    def _loop(self) -> None:
        while not self._closed:
            self._append(self._due(everything=False))

    def close(self) -> None:
        """Stop the thread and append every event still waiting, whatever its delivery time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
        self._append(self._due(everything=True))


class Simulation:
    """One run of simulated traffic against the feed at `url` (see the module docstring)."""

    def __init__(
        self,
        live: LiveWorld,
        log: EventLog,
        url: str,
        contract: Any,
        settings: SimulationSettings,
        *,
        stop: threading.Event | None = None,
        progress: bool = False,
        keep_answers: bool = False,
    ) -> None:
        self.live, self.log, self.url, self.contract, self.settings = live, log, url, contract, settings
        self.stop = stop or threading.Event()
        self.progress = progress
        self.report = SimulationReport(answers=[] if keep_answers else None)
        # Random 62-bit start: action ids stay unique across runs on one log without coordination.
        self._action_ids: Iterator[int] = itertools.count(int.from_bytes(os.urandom(8), "little") >> 2)
        self._busy: set[int] = set()
        self._producer: ActionProducer

    def run(self, start_ms: int, store: OnlineFeatureStore, catalogue: int = 0) -> SimulationReport:
        """Drive traffic for the settings' duration (or until `stop` is set); returns the report."""
        report = self.report
        report.start_ms, report.end_ms, report.catalogue = start_ms, start_ms, catalogue
        clock = EventClock(start_ms, self.settings.speedup)
        report.wall_start = clock.wall_start
        producer = self._producer = ActionProducer(self.log, clock, report).start()
        background_stop = threading.Event()
        background = threading.Thread(
            target=self._background,
            args=(clock, store, start_ms, background_stop),
            name="gpurec-simulate-uploads",
            daemon=True,
        )
        background.start()
        started = time.monotonic()
        try:
            asyncio.run(self._drive(clock))
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            report.wall_s = time.monotonic() - started
            report.end_ms = clock.now_ms()
            background_stop.set()
            background.join()
            producer.close()
            with contextlib.suppress(Exception):
                report.join_lag = join_lag(self.log, self.settings.group)
        report.interrupted = report.interrupted or self.stop.is_set()
        return report

    # ---- background: uploads and join lag ------------------------------------------------------

    def _background(
        self, clock: EventClock, store: OnlineFeatureStore, uploaded_until: int, stop: threading.Event
    ) -> None:
        lag_at = 0.0
        while True:
            finished = stop.wait(BACKGROUND_TICK_S)
            # The last tick uploads up to the run's end.
            now = self.report.end_ms if finished else clock.now_ms()
            rows = self.live.uploaded(uploaded_until, now)
            try:
                self.report.uploads += upload(self.log, store, self.live, rows)
                uploaded_until = now
            except Exception as err:  # retried on the next tick
                self.report.count_error(f"upload:{type(err).__name__}", 1, str(err))
            if finished:
                return
            if time.monotonic() >= lag_at:
                lag_at = time.monotonic() + LAG_EVERY_S
                with contextlib.suppress(Exception):  # the lag is informative only
                    self.report.join_lag = join_lag(self.log, self.settings.group)

    # ---- the sessions --------------------------------------------------------------------------

    async def _drive(self, clock: EventClock) -> None:
        s, report = self.settings, self.report
        loop = asyncio.get_running_loop()
        rng = np.random.default_rng([s.seed, 12])
        mean_gap_s = 1.0 / self.live.session_arrival_rate(s.rate)
        stopping = asyncio.Event()
        tasks: set[asyncio.Task] = set()
        bar = _progress_bar(s.duration_s, self.progress)
        client = AsyncRankerClient(
            self.url, self.contract, protocol=s.protocol, timeout=s.timeout_s, max_concurrency=s.max_in_flight
        )
        in_flight = asyncio.Semaphore(s.max_in_flight)
        started = loop.time()
        deadline, next_arrival, shown_at = started + s.duration_s, started + rng.exponential(mean_gap_s), 0.0
        try:
            while not self.stop.is_set() and not report.fatal:
                now = loop.time()
                if now >= deadline:
                    break
                if now >= next_arrival:
                    next_arrival += rng.exponential(mean_gap_s)
                    user = self.live.draw_user(rng, self._busy)
                    if user is None:
                        report.no_idle_user += 1
                        continue
                    self._busy.add(user)
                    task = asyncio.create_task(
                        self._session(client, in_flight, user, report.sessions, clock, stopping)
                    )
                    report.sessions += 1
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    continue
                if now >= shown_at:
                    shown_at = now + PROGRESS_EVERY_S
                    report.end_ms = clock.now_ms()
                    _show(bar, report, now - started)
                await asyncio.sleep(min(next_arrival, deadline, now + BACKGROUND_TICK_S) - now)
        finally:
            stopping.set()
            if tasks:  # requests in flight may finish; a server that hangs does not hold the end for long
                _, pending = await asyncio.wait(set(tasks), timeout=STOP_GRACE_S)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                if pending:
                    report.count_error(
                        "cancelled_at_stop",
                        len(pending),
                        f"requests still unanswered {STOP_GRACE_S} s after the end",
                    )
            await client.close()
            report.end_ms = clock.now_ms()
            if bar is not None:
                _show(bar, report, loop.time() - started)
                bar.close()

    async def _session(
        self,
        client: Any,
        in_flight: asyncio.Semaphore,
        user: int,
        number: int,
        clock: EventClock,
        stopping: asyncio.Event,
    ) -> None:
        live, report = self.live, self.report
        rng = np.random.default_rng([self.settings.seed, 13, number])
        budget, position = live.draw_budget(rng), 0
        user_id = int(live.user_ids[user])
        try:
            while position < budget and not stopping.is_set():
                async with in_flight:  # beyond max_in_flight, requests queue here (open-loop load)
                    if stopping.is_set():
                        return
                    ts_ms = clock.now_ms()
                    sent = time.perf_counter()
                    try:
                        result = await client.feed(user_id, live.page_size, ts_ms=ts_ms)
                    except UnknownModel as err:
                        report.count_error(type(err).__name__, 1, str(err))
                        report.fatal = f"{err}"
                        return
                    except ClientError as err:
                        report.count_error(type(err).__name__, 1, str(err))
                        return
                    latency_ms = (time.perf_counter() - sent) * 1e3
                report.latencies_ms.append(latency_ms)
                report.requests += 1
                report.served_rows += len(result)
                if report.answers is not None:
                    report.answers.append(
                        Answer(result.request_id, user_id, ts_ms, tuple(result.item_ids.tolist()))
                    )
                # The user sees the page the feed's latency after asking, in real milliseconds: scaled by
                # the speedup, 30 ms would be 43 s of event time at x1440 and push actions out of the
                # joiner's window. Events already due are appended at once (behind the clock, as the
                # log of a real app that batches its events would be).
                page = live.view_page(
                    user,
                    result.request_id,
                    result.item_ids,
                    budget - position,
                    position,
                    ts_ms + max(1, round(latency_ms)),
                    rng,
                    self._action_ids,
                )
                if page.unknown:
                    report.count_error("unknown_item", page.unknown)
                if not len(page.item_ids):
                    return
                position += len(page.item_ids)
                report.impressions += len(page.item_ids)
                report.late_actions += sum(d.deliver_ms > d.action.ts_ms for d in page.deliveries)
                self._producer.schedule(page.deliveries)
                with contextlib.suppress(TimeoutError):  # the user scrolls until page.end_ms
                    await asyncio.wait_for(stopping.wait(), max(0.0, clock.seconds_until(page.end_ms)))
        finally:
            self._busy.discard(user)


def _progress_bar(duration_s: float, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=round(duration_s, 1),
        desc="simulate",
        unit="s",
        file=sys.stderr,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total}s {postfix}",
    )


def _show(bar: Any, report: SimulationReport, elapsed_s: float) -> None:
    if bar is None:
        return
    bar.n = round(min(elapsed_s, bar.total), 1)
    bar.set_postfix_str(
        f"{report.requests / max(elapsed_s, 1e-9):.1f} req/s, served {report.served_rows}, actions {report.actions}, "
        f"uploads {report.uploads}, errors {sum(report.errors.values())}, "
        f"join lag {'-' if report.join_lag is None else report.join_lag}"
    )


__all__ = ["ActionProducer", "Answer", "Simulation", "SimulationReport", "SimulationSettings"]
