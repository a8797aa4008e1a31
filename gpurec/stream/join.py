"""The joiner on the event log: `gpurec join`, exactly once across crashes.

Each partition p of `served` and `actions` (both keyed by user, so a user's rows and actions meet
in one partition; `consent` too when that topic exists) is joined by one `Joiner` state machine.
A step reads a batch from each input partition, feeds the records to the joiner in event-time
order, advances the event-time watermark, and then commits in ONE `EventLog.commit`:

    the inputs' next offsets + the examples and dead letters it released + the joiner's state changes

so a joiner killed at any instant restarts from the last commit (state restored with
`Joiner.restore`, offsets from the group's committed offsets) and emits every example exactly once:
outputs of an uncommitted step never became visible, and the replayed step recomputes them from the
same committed state. The watermark tracker's per-input maximum event times are part of the
committed state too, so a restarted joiner closes windows exactly as an uninterrupted one.

With a feature store, each step also counts its served rows and actions there (the online counters
the feed reads) before it commits: the store ignores redelivered impressions and actions, so the
replay of a step that crashed after its store write and before its commit changes nothing.

Time: the watermark comes from event time (max per input minus `out_of_order_ms`); an input idle
for `idle_ms` is advanced by processing time times `time_scale` (the simulated world runs event time
faster than wall time), so idle partitions still flush. `drain` processes to the end of the inputs,
closes every window and stops (tests, benchmarks, the end of a demo); without it the joiner runs
until stopped.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpurec.errors import InvalidInput
from gpurec.features.store import OnlineFeatureStore
from gpurec.stream.joiner import Joiner, JoinerConfig, LatePolicy, Output
from gpurec.stream.log import EventLog, Record, StoredRecord
from gpurec.stream.records import (
    INT64_MAX,
    Action,
    ConsentChange,
    DeadLetter,
    Example,
    ServedRow,
    decoder,
    encode,
)
from gpurec.stream.retention import default_retention_ms
from gpurec.stream.watermark import WatermarkTracker

SERVED, ACTIONS, CONSENT = "served", "actions", "consent"
EXAMPLES, DEAD_LETTER = "examples", "joiner.dead_letter"
# State keys the runner keeps beside the joiner's own (which never start with this prefix).
_MAX_EVENT_PREFIX = b"runner/max_event/"


@dataclass(frozen=True)
class JoinSettings:
    """How `gpurec join` runs (event-time durations in milliseconds)."""

    window_ms: int = 600_000  # an action counts if it comes within W of its served row
    grace_ms: int = 600_000  # closed rows kept this long for late actions
    late_policy: LatePolicy = "drop"
    out_of_order_ms: int = 5_000  # how far behind the newest record an input may still deliver
    idle_ms: int = 2_000  # (processing time x time_scale) after which a quiet input stops holding back
    time_scale: float = 1.0  # event-time ms per wall-clock ms (the simulation runs faster)
    batch: int = 2_000  # records per input partition per step
    group: str = "joiner"
    poll_s: float = 0.05  # sleep when nothing new arrived

    def __post_init__(self) -> None:
        for name in ("window_ms", "grace_ms", "out_of_order_ms"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.idle_ms <= 0 or self.batch <= 0 or self.time_scale <= 0 or self.poll_s < 0:
            raise InvalidInput("idle_ms, batch and time_scale must be positive, poll_s not negative")

    @property
    def joiner_config(self) -> JoinerConfig:
        return JoinerConfig(window_ms=self.window_ms, grace_ms=self.grace_ms, late_policy=self.late_policy)


@dataclass
class JoinReport:
    """What a run did: records read, outputs committed, the joiners' counters, where it stands."""

    steps: int = 0
    commits: int = 0
    records_in: dict[str, int] = field(default_factory=lambda: {SERVED: 0, ACTIONS: 0, CONSENT: 0})
    examples: int = 0
    dead_letters: int = 0
    counters: dict[str, object] = field(default_factory=dict)  # the joiners' counters, summed
    watermark_lag_ms: int = 0  # newest event time read - watermark (how far the joiner runs behind)
    input_lag: int = 0  # records appended but not yet read, over all inputs
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items()}


class _PartitionJoin:
    """One partition: its joiner, input positions and watermark tracker."""

    def __init__(
        self,
        log: EventLog,
        settings: JoinSettings,
        partition: int,
        topics: list[str],
        now: int,
        store: OnlineFeatureStore | None = None,
    ) -> None:
        self.log, self.settings, self.partition, self.topics = log, settings, partition, topics
        self.store = store
        self._served: list[ServedRow] = []  # this step's decoded records, for the feature store
        self._actions: list[Action] = []
        state = log.load_state(settings.group, SERVED, partition)
        runner_state = {k: v for k, v in state.items() if k.startswith(_MAX_EVENT_PREFIX)}
        joiner_state = {k: v for k, v in state.items() if not k.startswith(_MAX_EVENT_PREFIX)}
        self.joiner = Joiner.restore(joiner_state, settings.joiner_config)
        # Keys in the committed state: a row opened and closed within one step was never written, so
        # its delete is dropped instead of sent (most rows live shorter than a step's event time).
        self.persisted: set[bytes] = set(joiner_state)
        self.tracker = WatermarkTracker(topics, out_of_order_ms=settings.out_of_order_ms, idle_ms=settings.idle_ms, now_ms=now)
        self.max_event: dict[str, int] = {}
        for key, value in runner_state.items():
            topic = key[len(_MAX_EVENT_PREFIX) :].decode()
            if topic in topics:
                self.max_event[topic] = struct.unpack(">q", value)[0]
                self.tracker.observe(topic, self.max_event[topic], now)
        self.position: dict[str, int] = {}
        for topic in topics:
            committed = log.committed(settings.group, topic).get(partition)
            self.position[topic] = committed if committed is not None else log.start_offsets(topic)[partition]
        self.ends = self._end_offsets()  # where each input ends, read once per step (a broker call on Kafka)

    def step(self, now: int, drain: bool) -> tuple[dict[str, int], list[Output], bool]:
        """Read one batch per input, join it, commit. Returns (records read per topic, outputs, done)."""
        raw = {t: self.log.read(t, self.partition, self.position[t], self.settings.batch) for t in self.topics}
        batches = _aligned(raw, self.settings.batch)
        events: list[tuple[int, int, int, StoredRecord]] = []
        for order, topic in enumerate(self.topics):  # ties: served before consent before actions
            events.extend((r.timestamp_ms, _ORDER[topic], order, r) for r in batches[topic])
        events.sort(key=lambda e: (e[0], e[1]))
        outputs: list[Output] = []
        for _, _, order, record in events:
            outputs.extend(self._feed(self.topics[order], record))
        for topic, records in batches.items():
            if records:
                self.position[topic] = records[-1].offset + 1
                newest = max(r.timestamp_ms for r in records)
                self.max_event[topic] = max(newest, self.max_event.get(topic, newest))
                self.tracker.observe(topic, self.max_event[topic], now)
        read = {t: len(r) for t, r in batches.items()}
        self.ends = self._end_offsets()
        caught_up = all(self.position[t] >= self.ends[t] for t in self.topics)
        exhausted = caught_up and all(len(r) < self.settings.batch for r in raw.values())
        watermark = self.tracker.watermark(now)
        if drain and exhausted:
            watermark = INT64_MAX  # the inputs are over: close every window
        if watermark is not None:
            outputs.extend(self.joiner.on_watermark(watermark))
        self._update_store()
        self._commit(outputs, changed=bool(events) or bool(outputs))
        return read, outputs, drain and exhausted

    def _feed(self, topic: str, record: StoredRecord) -> list[Output]:
        try:
            value = _DECODERS[topic](record.value)
        except InvalidInput as error:
            letter = DeadLetter(source=_SOURCE[topic], reason="undecodable", record=bytes(record.value), detail=str(error))
            return [letter]
        if topic == SERVED:
            self._served.append(value)
            return self.joiner.on_served(value)
        if topic == ACTIONS:
            self._actions.append(value)
            return self.joiner.on_action(value)
        return self.joiner.on_consent(value.user_id, value.training, value.ts_ms, value.forget)

    def _update_store(self) -> None:
        """Count this step's impressions and actions in the online feature store (idempotent)."""
        served, actions = self._served, self._actions
        self._served, self._actions = [], []
        if self.store is None:
            return
        if served:
            self.store.record_impressions(
                {
                    "request_id": [r.request_id for r in served],
                    "item_id": [r.item_id for r in served],
                    "user_id": [r.user_id for r in served],
                    "ts_ms": [r.ts_ms for r in served],
                }
            )
        if actions:
            self.store.record_actions(
                {
                    "request_id": [a.request_id for a in actions],
                    "item_id": [a.item_id for a in actions],
                    "ts_ms": [a.ts_ms for a in actions],
                    "watch_ms": [a.watch_ms for a in actions],
                    "like": [a.like for a in actions],
                }
            )

    def _end_offsets(self) -> dict[str, int]:
        return {t: self.log.end_offsets(t)[self.partition] for t in self.topics}

    def lag(self) -> int:
        """Records appended but not yet read, as of this step's end offsets."""
        return sum(max(0, self.ends[t] - self.position[t]) for t in self.topics)

    def _commit(self, outputs: list[Output], changed: bool) -> None:
        upserts, deletes = self.joiner.drain_changes()
        deletes &= self.persisted
        if not (changed or upserts or deletes):
            return
        state: dict[bytes, bytes | None] = dict(upserts)
        state.update(dict.fromkeys(deletes))
        for topic, newest in self.max_event.items():
            state[_MAX_EVENT_PREFIX + topic.encode()] = struct.pack(">q", newest)
        records = [_output_record(output) for output in outputs]
        self.log.commit(
            self.settings.group,
            offsets={(t, self.partition): self.position[t] for t in self.topics},
            outputs=records,
            state_changes={(SERVED, self.partition): state},
        )
        self.persisted -= deletes
        self.persisted.update(upserts)


def _aligned(batches: dict[str, list[StoredRecord]], size: int) -> dict[str, list[StoredRecord]]:
    """The records to process this step: inputs advance together in event time. A full batch may
    stop short of what another input holds (2,000 actions can span more time than 2,000 served rows),
    so each input is cut at the earliest last-timestamp of the full batches; the rest is read again
    next step. Without the cut, actions would outrun their served rows and a late action could pass
    for an early one, depending on batch sizes."""
    full = [records[-1].timestamp_ms for records in batches.values() if len(records) == size]
    if not full:
        return batches
    limit = min(full)
    cut = {}
    for topic, records in batches.items():
        end = 0
        while end < len(records) and records[end].timestamp_ms <= limit:
            end += 1
        cut[topic] = records[:end]
    return cut if any(cut.values()) else batches  # out-of-order heads: never stall


_ORDER = {SERVED: 0, CONSENT: 1, ACTIONS: 2}
_SOURCE = {SERVED: "served", ACTIONS: "action", CONSENT: "consent"}  # DeadLetter.source of each input
_TOPIC_OF_SOURCE = {source: topic for topic, source in _SOURCE.items()}
_DECODERS: dict[str, Callable[[bytes], object]] = {
    SERVED: decoder(ServedRow),
    ACTIONS: decoder(Action),
    CONSENT: decoder(ConsentChange),
}


def _output_record(output: Output) -> tuple[str, Record]:
    if isinstance(output, Example):
        served = output.served
        return EXAMPLES, Record(served.user_id, encode(output), served.ts_ms)
    key, ts = _dead_letter_key(output)
    return DEAD_LETTER, Record(key, encode(output), ts)


def _dead_letter_key(letter: DeadLetter) -> tuple[int, int]:
    """Key and time of a dead letter: its user and event time when the record decodes, else 0."""
    topic = _TOPIC_OF_SOURCE.get(letter.source)
    if topic is not None:
        try:
            record = _DECODERS[topic](letter.record)
            return record.user_id, record.ts_ms
        except InvalidInput:
            pass
    return 0, 0


def ensure_topics(log: EventLog, partitions: int) -> None:
    """The joiner's topics, with `partitions` partitions where they do not exist yet."""
    existing = set(log.topics())
    for topic in (SERVED, ACTIONS, EXAMPLES, DEAD_LETTER):
        if topic not in existing:
            log.create_topic(topic, partitions, retention_ms=default_retention_ms(log, topic))
    if log.partitions(SERVED) != log.partitions(ACTIONS):
        raise InvalidInput(
            f"{SERVED} has {log.partitions(SERVED)} partitions but {ACTIONS} has {log.partitions(ACTIONS)}: "
            "both must be partitioned alike (by user) for their records to meet"
        )


def run_join(
    log: EventLog,
    settings: JoinSettings,
    partitions: Sequence[int] | None = None,
    *,
    drain: bool = False,
    stop: threading.Event | None = None,
    on_step: Callable[[JoinReport], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    store: OnlineFeatureStore | None = None,
) -> JoinReport:
    """Join `served` with `actions` on the given partitions (default: all) until stopped or drained;
    with `store`, keep its online counters current from the same records."""
    count = log.partitions(SERVED)
    chosen = list(range(count)) if partitions is None else list(partitions)
    bad = [p for p in chosen if not 0 <= p < count]
    if bad or not chosen:
        raise InvalidInput(f"partitions {bad or chosen} out of range: {SERVED} has {count} partitions")
    topics = [SERVED, ACTIONS] + ([CONSENT] if CONSENT in log.topics() else [])
    started = clock()

    def now_ms() -> int:  # processing time in event-time units
        return int((clock() - started) * 1000 * settings.time_scale)

    joins = [_PartitionJoin(log, settings, p, topics, now_ms(), store) for p in chosen]
    report = JoinReport()
    done: set[int] = set()
    while not (stop is not None and stop.is_set()) and len(done) < len(joins):
        quiet = True
        for join in joins:
            if join.partition in done:
                continue
            read, outputs, finished = join.step(now_ms(), drain)
            report.steps += 1
            report.commits += 1 if (any(read.values()) or outputs) else 0
            for topic, n in read.items():
                report.records_in[topic] += n
            report.examples += sum(isinstance(o, Example) for o in outputs)
            report.dead_letters += sum(isinstance(o, DeadLetter) for o in outputs)
            quiet = quiet and not any(read.values())
            if finished:
                done.add(join.partition)
        _summarise(report, joins, started, clock)
        if on_step is not None:
            on_step(report)
        if quiet and settings.poll_s:
            time.sleep(settings.poll_s)
    _summarise(report, joins, started, clock)
    return report


def _summarise(report: JoinReport, joins: list[_PartitionJoin], started: float, clock) -> None:
    counters: dict[str, object] = {"dead_letters": {}}
    for join in joins:
        for name, value in join.joiner.stats().items():
            if name == "watermark":
                continue
            if isinstance(value, dict):  # dead letters by reason
                merged = counters.setdefault(name, {})
                for reason, n in value.items():
                    merged[reason] = merged.get(reason, 0) + n
            else:
                counters[name] = counters.get(name, 0) + value
    report.counters = counters
    lags = [max(join.max_event.values()) - join.joiner.watermark for join in joins if join.max_event]
    report.watermark_lag_ms = max(0, max(lags, default=0))
    report.input_lag = sum(join.lag() for join in joins)
    report.seconds = round(clock() - started, 3)
