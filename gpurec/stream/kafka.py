"""The production event log backend: any Kafka-protocol broker, through confluent-kafka.

- Topics are created through the AdminClient (`retention.ms`, `cleanup.policy=compact`); the
  broker applies retention (by record timestamp, Kafka's CreateTime = our event time) and
  compaction on its own schedule.
- `append`: an idempotent producer (`enable.idempotence`, so acks=all and no duplicates on
  retry), records sent to the partition `partition_for` picks, one flush per call; it returns once
  every record is delivery-reported.
- `read`: a consumer that never joins a group (assign + seek), `isolation.level=read_committed`,
  so aborted transactions are never seen.
- `commit`: one transactional producer per group (`transactional.id = <prefix>.<group>`): outputs
  and state changes (records in a compacted changelog topic, one partition per input partition)
  are produced inside the transaction, `send_offsets_to_transaction` adds the group's offsets,
  then `commit_transaction`. A second process committing for the same group with the same
  `instance` fences the first (Kafka's zombie fencing); give concurrent workers distinct
  `instance` names.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Producer,
)
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from gpurec.errors import GpurecError, InvalidInput
from gpurec.stream.log import (
    EventLog,
    Record,
    StateChanges,
    StoredRecord,
    TopicPartition,
    check_name,
    check_offset,
    check_partition,
    check_record,
    check_state_entry,
    check_topic_spec,
    partition_for,
)

STATE_PREFIX = "__gpurec_state."


def encode_key(key: int) -> bytes:
    return key.to_bytes(8, "big", signed=True)


def decode_key(raw: bytes | None) -> int:
    if raw is None or len(raw) != 8:
        raise GpurecError(
            f"record key is not an 8-byte int64 ({raw!r:.40}): topic written by another producer?"
        )
    return int.from_bytes(raw, "big", signed=True)


def state_topic(group: str, topic: str) -> str:
    """The compacted changelog holding `group`'s state for input `topic` (a hash keeps names that
    differ only in where the '.' falls apart)."""
    digest = hashlib.blake2b(f"{group}\0{topic}".encode(), digest_size=4).hexdigest()
    return f"{STATE_PREFIX}{group}.{topic}.{digest}"


class KafkaEventLog(EventLog):
    """The event log on a Kafka cluster at `bootstrap` ("host:port[,host:port]").

    `topic_config` is added to every topic this log creates (e.g. {"segment.ms": "100"} in tests,
    so that a small broker rolls segments and compacts within seconds); `replication_factor` is 1
    for a single broker, 3 for a production cluster.
    """

    retention_clock = "wall"  # the broker expires records against its own clock

    def __init__(
        self,
        bootstrap: str,
        *,
        instance: str = "0",
        replication_factor: int | str = 1,
        topic_config: Mapping[str, str] | None = None,
        timeout_s: float | str = 30.0,
        read_wait_s: float | str = 1.0,
        client_config: Mapping[str, Any] | None = None,
    ):
        self.bootstrap = bootstrap
        self.instance = check_name(instance, "instance")
        self.replication_factor = int(replication_factor)
        self.topic_config = dict(topic_config or {})
        self.timeout_s = float(timeout_s)
        self.read_wait_s = float(read_wait_s)
        self._base = {"bootstrap.servers": bootstrap, **(client_config or {})}
        self._admin = AdminClient(dict(self._base))
        self._lock = threading.RLock()
        self._partitions: dict[str, int] = {}
        self._producer: Producer | None = None
        self._tx_producers: dict[str, Producer] = {}
        self._group_consumers: dict[str, Consumer] = {}
        self._reader: Consumer | None = None
        self._reader_at: tuple[str, int, int] | None = None  # (topic, partition, next offset) when continuing
        self._closed = False

    # -- clients ----------------------------------------------------------------------------------

    def _consumer(self, group: str, **extra: Any) -> Consumer:
        return Consumer(
            {
                **self._base,
                "group.id": group,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                **extra,
            }
        )

    def _group_consumer(self, group: str) -> Consumer:
        # Never subscribes: it only reads committed offsets and supplies the group's metadata to
        # send_offsets_to_transaction, so there is no membership (static or not) to manage.
        if group not in self._group_consumers:
            self._group_consumers[group] = self._consumer(group)
        return self._group_consumers[group]

    def _plain_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer({**self._base, "enable.idempotence": True, "linger.ms": 5})
        return self._producer

    def _tx_producer(self, group: str) -> Producer:
        producer = self._tx_producers.get(group)
        if producer is None:
            producer = Producer(
                {**self._base, "transactional.id": f"gpurec.{group}.{self.instance}", "linger.ms": 5}
            )
            producer.init_transactions(
                self.timeout_s
            )  # fences older producers and aborts their open transaction
            self._tx_producers[group] = producer
        return producer

    # -- topics -----------------------------------------------------------------------------------

    def _create(self, name: str, partitions: int, config: dict[str, str], exist_ok: bool) -> None:
        future = self._admin.create_topics(
            [NewTopic(name, partitions, self.replication_factor, config=config)],
            request_timeout=self.timeout_s,
        )[name]
        try:
            future.result()
        except KafkaException as e:
            if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            existing = self._fetch_partitions(name)
            if not exist_ok or existing != partitions:
                raise InvalidInput(f"topic {name!r} already exists with {existing} partitions") from None
        self._partitions[name] = partitions

    def create_topic(
        self,
        name: str,
        partitions: int,
        retention_ms: int | None = None,
        compacted: bool = False,
        *,
        exist_ok: bool = False,
    ) -> None:
        check_topic_spec(name, partitions, retention_ms)
        config = dict(self.topic_config)
        config["cleanup.policy"] = "compact" if compacted else "delete"
        config["message.timestamp.type"] = "CreateTime"  # our event time: what retention goes by
        # No retention asked: keep forever, as the local backend does (Kafka's default is 7 days).
        config["retention.ms"] = str(retention_ms if retention_ms is not None else -1)
        with self._lock:
            self._create(name, partitions, config, exist_ok)

    def _fetch_partitions(self, topic: str) -> int | None:
        meta = self._admin.list_topics(timeout=self.timeout_s).topics.get(topic)
        return None if meta is None or meta.error is not None else len(meta.partitions)

    def topics(self) -> list[str]:
        names = self._admin.list_topics(timeout=self.timeout_s).topics
        return sorted(n for n in names if not n.startswith("__"))

    def partitions(self, topic: str) -> int:
        with self._lock:
            count = self._partitions.get(topic)
            if count is None:
                check_name(topic, "topic")
                count = self._fetch_partitions(topic)
                if count is None:
                    raise InvalidInput(
                        f"unknown topic {topic!r} (create it first; existing: {self.topics()})"
                    )
                self._partitions[topic] = count  # partition counts never change in this log
            return count

    # -- records ----------------------------------------------------------------------------------

    def _produce(
        self, producer: Producer, items: Iterable[tuple[str, Any]], checked: bool = False
    ) -> list[list[Any]]:
        """Produce (topic, record) pairs; returns one [partition, offset, error] slot per record,
        filled by the delivery reports (after a flush)."""
        slots: list[list[Any]] = []
        for topic, raw in items:
            partitions = self.partitions(topic)
            key, value, ts = raw if checked else check_record(raw)
            slot = [partition_for(key, partitions), None, None]
            slots.append(slot)
            self._send(producer, topic, slot[0], encode_key(key), value, ts, slot)
        return slots

    @staticmethod
    def _send(
        producer: Producer,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | None,
        ts: int | None,
        slot: list[Any],
    ) -> None:
        def delivered(err: KafkaError | None, msg: Any, slot: list[Any] = slot) -> None:
            slot[1], slot[2] = (None, err) if err is not None else (msg.offset(), None)

        kwargs = {} if ts is None else {"timestamp": ts}
        while True:
            try:
                producer.produce(topic, value, key, partition=partition, on_delivery=delivered, **kwargs)
                return
            except BufferError:  # local queue full: serve delivery reports, then retry
                producer.poll(0.1)

    def _flush(self, producer: Producer, slots: list[list[Any]]) -> list[tuple[int, int]]:
        remaining = producer.flush(self.timeout_s)
        if remaining:
            raise GpurecError(
                f"{remaining} records not delivered to {self.bootstrap} within {self.timeout_s} s"
            )
        for partition, offset, err in slots:
            if err is not None:
                raise KafkaException(err)
            if offset is None:
                raise GpurecError(f"no delivery report for a record to partition {partition}")
        return [(p, o) for p, o, _ in slots]

    def append(self, topic: str, records: Iterable[Record]) -> list[tuple[int, int]]:
        with self._lock:
            self.partitions(topic)
            # Checked before any is sent: without a transaction a bad record half-way would leave
            # the ones before it appended.
            checked = [check_record(r) for r in records]
            producer = self._plain_producer()
            return self._flush(producer, self._produce(producer, ((topic, r) for r in checked), checked=True))

    def _reader_consumer(self) -> Consumer:
        if self._reader is None:
            self._reader = self._consumer(
                f"gpurec-reader-{uuid.uuid4().hex}", **{"enable.partition.eof": True}
            )
        return self._reader

    def _read_raw(self, topic: str, partition: int, offset: int, max_records: int) -> tuple[list[Any], bool]:
        """Committed messages of one partition from `offset` on, up to `max_records`, stopping at the
        partition's end (the last stable offset) or after `read_wait_s`; and whether it reached the end."""
        reader = self._reader_consumer()
        low, high = reader.get_watermark_offsets(
            KafkaTopicPartition(topic, partition), timeout=self.timeout_s, cached=False
        )
        if offset > high:
            raise InvalidInput(f"offset {offset} is past the end ({high}) of {topic!r} partition {partition}")
        if offset >= high:
            return [], True
        if self._reader_at != (topic, partition, offset):  # else the prefetched stream continues
            reader.assign([KafkaTopicPartition(topic, partition, max(offset, low))])
        self._reader_at = None
        out: list[Any] = []
        at_end = False
        deadline = time.monotonic() + self.read_wait_s
        while len(out) < max_records and not at_end and time.monotonic() < deadline:
            for msg in reader.consume(min(max_records - len(out), 10_000), timeout=0.02):
                err = msg.error()
                if err is None:
                    out.append(msg)
                elif err.code() == KafkaError._PARTITION_EOF:
                    at_end = True
                else:
                    raise KafkaException(err)
        if out and not at_end:  # after an end-of-partition event, re-seek so the next one is reported
            self._reader_at = (topic, partition, out[-1].offset() + 1)
        return out, at_end

    def read(self, topic: str, partition: int, offset: int, max_records: int = 1000) -> list[StoredRecord]:
        with self._lock:
            check_partition(topic, partition, self.partitions(topic))
            check_offset(offset)
            if not isinstance(max_records, int) or max_records < 1:
                raise InvalidInput(f"max_records must be a positive int, got {max_records!r}")
            return [
                StoredRecord(partition, m.offset(), decode_key(m.key()), m.value(), m.timestamp()[1])
                for m in self._read_raw(topic, partition, offset, max_records)[0]
            ]

    def _list_offsets(self, topic: str, spec: OffsetSpec) -> dict[int, int]:
        partitions = self.partitions(topic)
        futures = self._admin.list_offsets(
            {KafkaTopicPartition(topic, p): spec for p in range(partitions)},
            isolation_level=IsolationLevel.READ_COMMITTED,
            request_timeout=self.timeout_s,
        )
        return {tp.partition: f.result().offset for tp, f in futures.items()}

    def end_offsets(self, topic: str) -> dict[int, int]:
        return self._list_offsets(topic, OffsetSpec.latest())  # read_committed: the last stable offset

    def start_offsets(self, topic: str) -> dict[int, int]:
        return self._list_offsets(topic, OffsetSpec.earliest())

    # -- groups -----------------------------------------------------------------------------------

    def committed(self, group: str, topic: str) -> dict[int, int]:
        check_name(group, "group")
        with self._lock:
            partitions = self.partitions(topic)
            tps = self._group_consumer(group).committed(
                [KafkaTopicPartition(topic, p) for p in range(partitions)], timeout=self.timeout_s
            )
            return {tp.partition: tp.offset for tp in tps if tp.offset >= 0}

    def _ensure_state_topic(self, group: str, topic: str) -> str:
        name = state_topic(group, topic)
        if name not in self._partitions:
            config = {**self.topic_config, "cleanup.policy": "compact"}
            self._create(name, self.partitions(topic), config, exist_ok=True)
        return name

    def commit(
        self,
        group: str,
        offsets: Mapping[TopicPartition, int] | None = None,
        outputs: Iterable[tuple[str, Record]] = (),
        state_changes: StateChanges | None = None,
    ) -> list[tuple[int, int]]:
        check_name(group, "group")
        with self._lock:
            producer = self._tx_producer(group)
            producer.begin_transaction()
            try:
                slots = self._produce(producer, outputs)
                for (topic, partition), changes in (state_changes or {}).items():
                    check_partition(topic, partition, self.partitions(topic))
                    changelog = self._ensure_state_topic(group, topic)
                    for key, value in changes.items():
                        check_state_entry(key, value)
                        self._send(producer, changelog, partition, key, value, None, [partition, None, None])
                kafka_offsets = []
                for (topic, partition), next_offset in (offsets or {}).items():
                    check_partition(topic, partition, self.partitions(topic))
                    kafka_offsets.append(
                        KafkaTopicPartition(topic, partition, check_offset(next_offset, "committed offset"))
                    )
                placed = self._flush(producer, slots)
                if kafka_offsets:
                    producer.send_offsets_to_transaction(
                        kafka_offsets, self._group_consumer(group).consumer_group_metadata(), self.timeout_s
                    )
                producer.commit_transaction(self.timeout_s)
            except BaseException:
                self._abort(group, producer)
                raise
            return placed

    def _abort(self, group: str, producer: Producer) -> None:
        try:
            producer.abort_transaction(self.timeout_s)
        except KafkaException:
            # Fatal (fenced) or broker gone: drop the producer; the next commit re-initialises, which
            # aborts whatever this one left open.
            self._tx_producers.pop(group, None)

    def load_state(self, group: str, topic: str, partition: int) -> dict[bytes, bytes]:
        check_name(group, "group")
        with self._lock:
            check_partition(topic, partition, self.partitions(topic))
            changelog = state_topic(group, topic)
            if changelog not in self._partitions and self._fetch_partitions(changelog) is None:
                return {}
            self._partitions[changelog] = self.partitions(topic)
            state: dict[bytes, bytes] = {}
            offset = 0
            deadline = time.monotonic() + self.timeout_s
            while (
                True
            ):  # to the partition's end, not to the first empty answer (aborted records read as none)
                batch, at_end = self._read_raw(changelog, partition, offset, 10_000)
                if not batch and at_end:
                    return state
                if not batch and time.monotonic() > deadline:
                    raise GpurecError(
                        f"state of group {group!r} in {changelog!r}: no progress in {self.timeout_s} s"
                    )
                for msg in batch:
                    if msg.value() is None:  # tombstone: the key was deleted
                        state.pop(msg.key(), None)
                    else:
                        state[msg.key()] = msg.value()
                if batch:
                    offset, deadline = batch[-1].offset() + 1, time.monotonic() + self.timeout_s
                if at_end:
                    return state

    def set_retention(self, topic: str, retention_ms: int | None) -> None:
        check_topic_spec(topic, self.partitions(topic), retention_ms)
        entry = ConfigEntry("retention.ms", str(retention_ms if retention_ms is not None else -1),
                            incremental_operation=AlterConfigOpType.SET)  # fmt: skip
        resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
        for future in self._admin.incremental_alter_configs([resource], request_timeout=self.timeout_s).values():
            future.result()

    def cleanup(self, now_ms: int | None = None) -> None:
        """The broker applies retention and compaction itself."""

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for producer in [self._producer, *self._tx_producers.values()]:
                if producer is not None:
                    producer.flush(self.timeout_s)
            for consumer in [self._reader, *self._group_consumers.values()]:
                if consumer is not None:
                    consumer.close()
            # Dropping the clients ends librdkafka's threads now rather than at garbage collection.
            self._producer, self._reader = None, None
            self._tx_producers.clear()
            self._group_consumers.clear()
