"""The joiner as a Quix Streams application: `gpurec join --engine quix`, exactly once on Kafka.

The same `Joiner` state machine as the embedded runner (`gpurec.stream.join`), run by Quix Streams
3.28.1: one consumer group reads `served`, `actions` (and `consent` when it exists) concatenated with
`sdf.concat` (Quix then pops each partition's records in timestamp order across the topics) plus the
heartbeat topic `joiner.ticks`; partitions are spread over the group's processes by Kafka's
assignor, so the joiner scales by running more processes (`--member` names each one: static
membership, so a restarted process gets its partitions back at once). One stateful step keeps one
`Joiner` per assigned partition in memory; after every record it writes the joiner's drained state
changes to Quix's state store (RocksDB, backed by a changelog topic) and produces the examples and
dead letters itself; with `processing_guarantee="exactly-once"` Quix commits the changelog, the
outputs and the input offsets in one Kafka transaction per checkpoint (every `commit_interval_s`).
Outputs are byte for byte those of the embedded runner (`_output_record`), each produced to the
partition `partition_for` picks, as the event log does.

Why internals. Quix hands a stateful function a `State` scoped to the message key (the user), with
get/set/delete only; the joiner's state is per partition (timers, sequence, counters) and
`Joiner.restore` needs every entry back, which no public call enumerates. So the step does what
Quix's own `_as_stateful` wrapper does, with a fixed prefix instead of the key:
`sdf.processing_context.checkpoint.get_store_transaction(stream_id, partition).as_state(prefix)`
gives a partition-wide `State` inside the checkpoint's transaction, and
`sdf.processing_context.state_manager.get_store(stream_id).partitions[p].iter_items(lo, hi)`
(the RocksDB store partition) lists the committed entries for the restore. A new store-partition
object (a rebalance revoked and re-assigned the partition; Quix commits at revoke and replays the
changelog at assign) triggers a restore. Outputs go through `sdf.processing_context.producer`
because `to_topic` cannot choose a partition. What breaks if Quix changes them: a rename fails
loudly at the first record (AttributeError); a change of the key layout (prefix + b"|" + key) or of
the value encoding (plain bytes unless a TTL is ever written, which this step never does) would
make the restore read nothing or garbage, so `test_quix_join.py` kills and restarts the engine and
checks every example exactly once. One Quix 3.28.1 race is worked around: after a rebalance a
changelog record can (rarely) reach the timestamp-aligning buffer, which raises KeyError; the run
then starts a new app, which resumes from the last commit (`_RESTARTS` times at most).

Time. Event time is the records' CreateTime; the watermark follows the embedded runner's rules
(per-input maximum minus `out_of_order_ms`, an input idle for `idle_ms` of processing time x
`time_scale` stops holding it back) through `WatermarkTracker`, advanced after every record.
Quix has no timers, so a `Ticker` appends a tick to every partition of `joiner.ticks` (about every
idle/2, at most every second); a tick carries its wall-clock time and the step takes it as
processing time, so a replay after a crash sees the same times in the same places. An end tick
also carries, per input, the offset of the last record at the time it was sent: once a partition
has processed those, its watermark becomes INT64_MAX (every window closes) and the partition is
finished. An end tick ends the group's stream: every process of the group stops once each
partition it holds is finished. `drain=True` sends end ticks first, so it processes to the end of
the inputs as of its start, closes every window and stops (tests, benchmarks, the end of a demo).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec

from gpurec.errors import GpurecError, InvalidInput
from gpurec.stream import join as embedded  # the embedded runner: its topics, decoders and output records
from gpurec.stream.join import ACTIONS, CONSENT, DEAD_LETTER, EXAMPLES, SERVED, JoinSettings, ensure_topics
from gpurec.stream.joiner import Joiner, Output
from gpurec.stream.kafka import KafkaEventLog, encode_key
from gpurec.stream.log import check_name, partition_for
from gpurec.stream.records import INT64_MAX, DeadLetter, Example
from gpurec.stream.watermark import WatermarkTracker

TICKS = "joiner.ticks"
_JOINER = b"joiner"  # state prefix of the joiner's own entries
_RUNNER = b"runner"  # state prefix of this runner's one entry, _POSITION_KEY
_SEPARATOR = b"|"  # quixstreams.state.metadata.SEPARATOR: a prefixed key is prefix + b"|" + key
# (now, max event time per input, last offset per input, end targets): what the watermark tracker and
# the end-of-input check need after a restore.
_POSITION_KEY = b"position"
_POSITION = msgspec.msgpack.Decoder(tuple[int | None, dict[str, int], dict[str, int], dict[str, int] | None])
_ENCODE = msgspec.msgpack.Encoder().encode


def kafka_bootstrap(url: str) -> str:
    """host:port[,host:port] of a kafka:// event-log URL, or InvalidInput."""
    parts = urlsplit(str(url))
    if parts.scheme != "kafka" or not parts.netloc:
        raise InvalidInput(f"the quix engine runs on Kafka: --log must be kafka://host:port, got {url!r}")
    return parts.netloc


# ---- ticks ----------------------------------------------------------------------------------------


def encode_tick(now_ms: int, end: Mapping[str, int] | None = None) -> bytes:
    return json.dumps({"now_ms": now_ms, "end": dict(end) if end is not None else None}).encode()


def _decode_tick(raw: bytes) -> tuple[int, dict[str, int] | None] | None:
    try:
        tick = json.loads(raw)
        end = tick["end"]
        return int(tick["now_ms"]), None if end is None else {str(t): int(o) for t, o in end.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        return None  # not ours: ignored rather than dead-lettered (nobody else should write here)


def last_offsets(log: KafkaEventLog, topics: Sequence[str]) -> dict[int, dict[str, int]]:
    """Per partition, the offset of each input's last committed record (-1: none). Not end - 1:
    a transactional producer leaves commit markers, which take offsets but are never delivered."""
    targets: dict[int, dict[str, int]] = {}
    for topic in topics:
        ends, starts = log.end_offsets(topic), log.start_offsets(topic)
        for partition, end in ends.items():
            last, upper, step = -1, end, 64
            while upper > starts[partition] and last < 0:
                lower = max(starts[partition], upper - step)
                records = log.read(topic, partition, lower, upper - lower)
                last = max((r.offset for r in records if r.offset < end), default=-1)
                upper, step = lower, step * 4
            targets.setdefault(partition, {})[topic] = last
    return targets


class Ticker:
    """Appends a tick to every partition of `joiner.ticks` every `interval_s` from a daemon thread
    (`start`), and end ticks on demand (`send_end`)."""

    def __init__(self, bootstrap: str, partitions: int, interval_s: float) -> None:
        from confluent_kafka import Producer

        self.partitions, self.interval_s = partitions, interval_s
        config = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 0}
        self._producer = Producer(config)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def send(self, end: Mapping[int, Mapping[str, int]] | None = None) -> None:
        now_ms = int(time.time() * 1000)
        for partition in range(self.partitions):
            targets = None if end is None else end.get(partition, {})
            # Kafka compacts the topic by key: one key for all plain ticks, so it stays small; an end
            # tick gets its own key, so a later plain tick cannot compact it away before it is read.
            key = b"tick" if targets is None else b"end/%d" % now_ms
            self._producer.produce(TICKS, encode_tick(now_ms, targets), key, partition=partition)
        if self._producer.flush(30):
            raise GpurecError(f"ticks not delivered to {TICKS} within 30 s")

    def send_end(self, log: KafkaEventLog, topics: Sequence[str]) -> dict[int, dict[str, int]]:
        """End ticks carrying each input's last offset now; returns those targets."""
        targets = last_offsets(log, topics)
        self.send(targets)
        return targets

    def start(self) -> Ticker:
        def loop() -> None:
            try:
                while not self._stop.is_set():
                    self.send()
                    self._stop.wait(self.interval_s)
            except BaseException as error:
                self.error = error

        self._thread = threading.Thread(target=loop, name="joiner-ticker", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._producer.flush(5)


# ---- one partition ----------------------------------------------------------------------------------


class _PartitionJoin:
    """One assigned partition: its joiner, watermark tracker and positions, rebuilt from the store."""

    def __init__(
        self, settings: JoinSettings, topics: list[str], store_partition: Any, entries: list
    ) -> None:
        self.settings, self.topics, self.store_partition = settings, topics, store_partition
        joiner_state: dict[bytes, bytes] = {}
        runner: dict[bytes, bytes] = {}
        for key, value in entries:
            prefix, _, rest = key.partition(_SEPARATOR)
            (joiner_state if prefix == _JOINER else runner)[rest] = value
        self.joiner = Joiner.restore(joiner_state, settings.joiner_config)
        self.restored = len(entries)
        now, max_event, offsets, end = (
            _POSITION.decode(runner[_POSITION_KEY]) if _POSITION_KEY in runner else (None, {}, {}, None)
        )
        self.now: int | None = now  # None until the first tick
        self.max_event = {t: v for t, v in max_event.items() if t in topics}
        self.offsets = {t: v for t, v in offsets.items() if t in topics}
        self.end: dict[str, int] | None = end  # the latest end tick's targets: last offset per input
        self.end_seen = False  # this run processed an end tick on this partition
        self._track()

    def _track(self) -> None:
        """A tracker as of `now` (0 before the first tick: then no input counts as idle)."""
        now = self.now or 0
        lag, idle = self.settings.out_of_order_ms, self.settings.idle_ms
        self.tracker = WatermarkTracker(self.topics, out_of_order_ms=lag, idle_ms=idle, now_ms=now)
        for topic, newest in self.max_event.items():
            self.tracker.observe(topic, newest, now)

    def record(self, topic: str, value: bytes, timestamp: int, offset: int) -> list[Output]:
        out = self._feed(topic, value)
        self.offsets[topic] = offset
        if timestamp > self.max_event.get(topic, timestamp - 1):
            self.max_event[topic] = timestamp
        self.tracker.observe(topic, self.max_event[topic], self.now or 0)
        return out + self._advance()

    def tick(self, now_ms: int, end: dict[str, int] | None) -> list[Output]:
        now = int(now_ms * self.settings.time_scale)  # processing time in event-time units
        if self.now is None or now > self.now:
            first = self.now is None
            self.now = now
            if first:  # observations so far were made at time 0: re-base them on the first tick
                self._track()
        if end is not None:
            merged = dict(self.end or {})
            for topic in self.topics:
                merged[topic] = max(merged.get(topic, -1), end.get(topic, -1))
            self.end, self.end_seen = merged, True
        return self._advance()

    def _advance(self) -> list[Output]:
        watermark = self.tracker.watermark(self.now or 0)
        out = self.joiner.on_watermark(watermark) if watermark is not None else []
        if self.end is not None and self.joiner.watermark < INT64_MAX and self.reached(self.end):
            out.extend(self.joiner.on_watermark(INT64_MAX))  # the inputs are over: close every window
        return out

    def reached(self, targets: Mapping[str, int]) -> bool:
        return all(self.offsets.get(t, -1) >= targets.get(t, -1) for t in self.topics)

    def finished(self, own: Mapping[str, int] | None) -> bool:
        """Past an end tick seen in this run, or past this run's own drain targets."""
        if self.joiner.watermark < INT64_MAX:
            return False
        return (self.end_seen and self.end is not None and self.reached(self.end)) or (
            own is not None and self.reached(own)
        )

    def _feed(self, topic: str, value: bytes) -> list[Output]:
        try:
            decoded = embedded._DECODERS[topic](value)
        except InvalidInput as error:
            return [DeadLetter(embedded._SOURCE[topic], "undecodable", bytes(value), str(error))]
        if topic == SERVED:
            return self.joiner.on_served(decoded)
        if topic == ACTIONS:
            return self.joiner.on_action(decoded)
        return self.joiner.on_consent(decoded.user_id, decoded.training, decoded.ts_ms, decoded.forget)

    def write(self, transaction: Any) -> None:
        """This record's state changes into the checkpoint's transaction (committed with the offsets)."""
        joiner, runner = transaction.as_state(prefix=_JOINER), transaction.as_state(prefix=_RUNNER)
        upserts, deletes = self.joiner.drain_changes()
        for key, value in upserts.items():
            joiner.set_bytes(key, value)
        for key in deletes:
            joiner.delete(key)
        # Positions change with every record: one entry, so one write per record.
        runner.set_bytes(_POSITION_KEY, _ENCODE((self.now, self.max_event, self.offsets, self.end)))


# ---- the step -----------------------------------------------------------------------------------------


class _Step:
    """The stateful Quix step: routes each record or tick to its partition's joiner, produces the
    outputs in the checkpoint's transaction, writes the state changes, stops the app when done."""

    def __init__(self, settings: JoinSettings, topics: list[str], out_partitions: dict[str, int],
                 own_targets: Mapping[int, Mapping[str, int]] | None,
                 on_partition: Callable[[int, int], None] | None) -> None:  # fmt: skip
        self.settings, self.topics = settings, topics
        self.out_partitions, self.own_targets, self.on_partition = out_partitions, own_targets, on_partition
        self.joins: dict[int, _PartitionJoin] = {}
        self.partitions: set[int] = set()  # partitions whose records this process joined
        self.records_in = {t: 0 for t in (SERVED, ACTIONS, CONSENT)}
        self.ticks = self.examples = self.dead_letters = self.restores = 0

    def bind(self, app: Any, sdf: Any) -> None:
        """Run in this (new) app: every partition is restored from the store at its first record."""
        self.app, self.sdf, self.context = app, sdf, sdf.processing_context
        self.joins.clear()

    def __call__(self, value: bytes, key: Any, timestamp: int, headers: Any, _state: Any) -> None:
        from quixstreams import message_context

        ctx = message_context()
        partition, topic = ctx.partition, ctx.topic
        transaction = self.context.checkpoint.get_store_transaction(
            stream_id=self.sdf.stream_id, partition=partition
        )
        join = self._join(partition, transaction)
        if topic == TICKS:
            tick = _decode_tick(value)
            outputs = [] if tick is None else join.tick(*tick)
            self.ticks += 1
        else:
            outputs = join.record(topic, value, timestamp, ctx.offset)
            self.records_in[topic] += 1
            self.partitions.add(partition)
        if outputs:
            self._produce(outputs)
        join.write(transaction)
        if (self.own_targets is not None or join.end_seen) and self._all_finished():
            self.app.stop()  # Quix commits this checkpoint as it stops

    def _join(self, partition: int, transaction: Any) -> _PartitionJoin:
        store_partition = self.context.state_manager.get_store(stream_id=self.sdf.stream_id).partitions[
            partition
        ]
        join = self.joins.get(partition)
        if join is not None and join.store_partition is store_partition:
            return join
        # First record since the partition was assigned: restore from the committed store.
        if transaction.changed or getattr(store_partition, "uses_ttl_stamps", False):
            raise GpurecError(
                f"partition {partition}: the Quix store is not in the state this runner expects"
            )
        entries = list(
            store_partition.iter_items(lower_bound=_JOINER + _SEPARATOR, upper_bound=_RUNNER + b"}")
        )
        entries = [(k, v) for k, v in entries if k.startswith((_JOINER + _SEPARATOR, _RUNNER + _SEPARATOR))]
        join = self.joins[partition] = _PartitionJoin(self.settings, self.topics, store_partition, entries)
        self.restores += 1
        if self.on_partition is not None:
            self.on_partition(partition, join.restored)
        return join

    def _produce(self, outputs: list[Output]) -> None:
        producer = self.context.producer
        for output in outputs:
            topic, record = embedded._output_record(output)
            producer.produce(topic=topic, key=encode_key(record.key), value=record.value,
                             partition=partition_for(record.key, self.out_partitions[topic]),
                             timestamp=record.timestamp_ms)  # fmt: skip
            if isinstance(output, Example):
                self.examples += 1
            else:
                self.dead_letters += 1

    def _all_finished(self) -> bool:
        assigned = self.context.state_manager.get_store(stream_id=self.sdf.stream_id).partitions
        own = self.own_targets or {}
        for partition, store_partition in assigned.items():
            join = self.joins.get(partition)
            if join is None or join.store_partition is not store_partition:
                return False
            if not join.finished(own.get(partition) if self.own_targets is not None else None):
                return False
        return bool(assigned)

    def report(self, seconds: float) -> dict[str, object]:
        counters: dict[str, Any] = {"dead_letters": {}}
        for join in self.joins.values():
            for name, value in join.joiner.stats().items():
                if name == "watermark":
                    continue
                if isinstance(value, dict):
                    for reason, n in value.items():
                        counters[name][reason] = counters[name].get(reason, 0) + n
                else:
                    counters[name] = counters.get(name, 0) + value
        return {
            "engine": "quix",
            "partitions": sorted(self.partitions),
            "records_in": self.records_in,
            "ticks": self.ticks,
            "examples": self.examples,
            "dead_letters": self.dead_letters,
            "restores": self.restores,
            "counters": counters,
            "seconds": round(seconds, 3),
        }


_RESTARTS = 3
_BYTES = dict.fromkeys(
    ("value_deserializer", "key_deserializer", "value_serializer", "key_serializer"), "bytes"
)


def _application(
    bootstrap: str,
    settings: JoinSettings,
    member: str,
    state_dir: Path,
    commit_interval_s: float,
    loglevel: str,
) -> Any:
    from quixstreams import Application

    return Application(
        broker_address=bootstrap,
        consumer_group=settings.group,
        processing_guarantee="exactly-once",
        auto_offset_reset="earliest",
        commit_interval=commit_interval_s,
        consumer_poll_timeout=0.1,  # Quix waits this long for a full buffer of records (default 1 s)
        # Static membership: a restarted member gets its partitions back at once (a killed plain
        # member would hold them until its session times out).
        consumer_extra_config={"group.instance.id": member},
        # A stable transactional id per member: the restarted process fences its dead predecessor
        # and aborts its open transaction at once (Quix's default id is random per process, leaving
        # the old transaction to block read_committed readers until it times out).
        producer_extra_config={"transactional.id": f"gpurec.quix.{settings.group}.{member}"},
        state_dir=str(state_dir / member),
        # Never delete local state on its own: a committed offset below the retained data raises.
        auto_recover_from_source_offset_out_of_range=False,
        loglevel=loglevel,
    )


def run_quix_join(
    url: str,
    settings: JoinSettings,
    *,
    member: str = "joiner-0",
    state_dir: str | Path,
    drain: bool = False,
    create_partitions: int = 0,
    commit_interval_s: float = 1.0,
    tick_interval_s: float | None = None,
    on_partition: Callable[[int, int], None] | None = None,
    loglevel: str = "WARNING",
) -> dict[str, object]:
    """Run the joiner as a Quix Streams app on the Kafka log at `url` (group `settings.group`,
    static member `member`, RocksDB under `state_dir`) until an end tick finishes every partition it
    holds (`drain` sends them first) or SIGINT/SIGTERM; returns a report like `run_join`'s.
    `on_partition(partition, state entries)` is called when a partition is restored after assignment."""
    bootstrap = kafka_bootstrap(url)
    check_name(member, "member")
    started = time.monotonic()
    with KafkaEventLog(bootstrap) as log:
        if create_partitions:
            ensure_topics(log, create_partitions)
        elif SERVED not in log.topics():
            raise InvalidInput(f"{url} has no {SERVED!r} topic yet (pass --create-partitions N to create it)")
        partitions = log.partitions(SERVED)
        ensure_topics(log, partitions)
        log.create_topic(TICKS, partitions, compacted=True, exist_ok=True)
        topics = [SERVED, ACTIONS] + ([CONSENT] if CONSENT in log.topics() else [])
        out_partitions = {EXAMPLES: log.partitions(EXAMPLES), DEAD_LETTER: log.partitions(DEAD_LETTER)}
        if tick_interval_s is None:  # an idle input is noticed within 1.5 x idle (at most idle + 1 s)
            tick_interval_s = min(1.0, max(0.05, settings.idle_ms / settings.time_scale / 2000))
        ticker = Ticker(bootstrap, partitions, tick_interval_s)
        own_targets = ticker.send_end(log, topics) if drain else None
    step = _Step(settings, topics, out_partitions, own_targets, on_partition)
    # app.run() installs its own SIGINT/SIGTERM handlers (a graceful stop): put the caller's back after.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ticker.start()
    try:
        for attempt in range(_RESTARTS + 1):
            app = _application(bootstrap, settings, member, Path(state_dir), commit_interval_s, loglevel)
            frames = [app.dataframe(app.topic(name, **_BYTES)) for name in [*topics, TICKS]]
            sdf = frames[0]
            for other in frames[1:]:
                sdf = sdf.concat(other)
            step.bind(app, sdf)
            sdf.update(step, stateful=True, metadata=True)
            try:
                app.run()
                break
            except KeyError as error:
                # Quix 3.28.1 race, seen once in ~40 rebalances: a changelog record reaches the
                # timestamp-aligning buffer, which knows only the input topics. The app has aborted
                # its transaction, so a new app resumes from the last commit, exactly once.
                if attempt == _RESTARTS or not str(error.args[0]).startswith("changelog__"):
                    raise
                logging.getLogger(__name__).warning("quix app failed (%r); restarting it", error)
    finally:
        ticker.stop()
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if ticker.error is not None:
        raise GpurecError(f"the ticker failed: {ticker.error}") from ticker.error
    return step.report(time.monotonic() - started)


__all__ = ["TICKS", "Ticker", "encode_tick", "kafka_bootstrap", "last_offsets", "run_quix_join"]
