"""The live simulation's side of the event log and the feature store: topics, users, uploads, lag.

`prepare` runs before the feed server starts (the feed reads the catalogue from the log when it
loads); `upload` runs as event time passes upload times; `join_lag` reads the joiner's progress.
"""

from __future__ import annotations

import numpy as np

from gpurec.client.simulate import LiveWorld
from gpurec.data.schema import MS_PER_DAY
from gpurec.errors import InvalidInput
from gpurec.features.store import OnlineFeatureStore
from gpurec.serve.items import ITEMS_TOPIC, item_record, items_from_table
from gpurec.stream.log import EventLog
from gpurec.stream.retention import default_retention_ms

SERVED_TOPIC, ACTIONS_TOPIC = "served", "actions"


def ensure_topics(log: EventLog, partitions: int) -> None:
    """`items`, `actions` and `served` (the last two partitioned alike, so the joiner meets a user's
    rows and actions in one partition); existing topics are kept."""
    existing = set(log.topics())
    if SERVED_TOPIC in existing and ACTIONS_TOPIC not in existing:
        partitions = log.partitions(SERVED_TOPIC)
    elif ACTIONS_TOPIC in existing:
        partitions = log.partitions(ACTIONS_TOPIC)
    for topic in (ITEMS_TOPIC, ACTIONS_TOPIC, SERVED_TOPIC):
        if topic not in existing:
            log.create_topic(topic, partitions, retention_ms=default_retention_ms(log, topic), exist_ok=True)
    if log.partitions(SERVED_TOPIC) != log.partitions(ACTIONS_TOPIC):
        raise InvalidInput(
            f"the log's {SERVED_TOPIC!r} topic has {log.partitions(SERVED_TOPIC)} partitions and {ACTIONS_TOPIC!r} "
            f"{log.partitions(ACTIONS_TOPIC)}: the joiner needs them partitioned alike"
        )


def newest_event_ms(
    log: EventLog, topics: tuple[str, ...] = (SERVED_TOPIC, ACTIONS_TOPIC), tail: int = 64
) -> int | None:
    """The newest event time among the last `tail` records of each partition of `topics`."""
    newest = None
    present = set(log.topics())
    for topic in topics:
        if topic not in present:
            continue
        starts = log.start_offsets(topic)
        for partition, end in log.end_offsets(topic).items():
            records = (
                log.read(topic, partition, max(starts[partition], end - tail), tail)
                if end > starts[partition]
                else []
            )
            for record in records:
                newest = record.timestamp_ms if newest is None else max(newest, record.timestamp_ms)
    return newest


def start_time(log: EventLog, live: LiveWorld, start_day: int) -> int:
    """Where event time starts: the world's day `start_day`, or just after the newest served row or
    action already in the log (a second run continues the first instead of going back in time)."""
    start = live.start_ms + start_day * MS_PER_DAY
    newest = newest_event_ms(log)
    return start if newest is None else max(start, newest + 1)


def items_on_topic(log: EventLog) -> set[int]:
    """Ids of the items already on the `items` topic."""
    ids: set[int] = set()
    for partition, end in log.end_offsets(ITEMS_TOPIC).items():
        offset = log.start_offsets(ITEMS_TOPIC)[partition]
        while offset < end:
            records = log.read(ITEMS_TOPIC, partition, offset, 10_000)
            if not records:
                break
            ids.update(r.key for r in records)
            offset = records[-1].offset + 1
    return ids


def upload(
    log: EventLog,
    store: OnlineFeatureStore,
    live: LiveWorld,
    rows: np.ndarray,
    skip: set[int] | frozenset[int] = frozenset(),
) -> int:
    """Put world item rows `rows` in the feature store, then on the `items` topic (those not in
    `skip`); returns how many went on the topic."""
    if not len(rows):
        return 0
    table = live.items_table(rows)
    store.put_items(table)
    records = [item_record(item) for item in items_from_table(table) if item.item_id not in skip]
    if records:
        log.append(ITEMS_TOPIC, records)
    return len(records)


def prepare(
    log: EventLog, store: OnlineFeatureStore, live: LiveWorld, *, partitions: int = 4, start_day: int = 0
) -> tuple[int, int]:
    """Topics, the sampled users in the store, the items live at the start in the store and on the
    `items` topic. Returns (start event time, items live at the start). Run it before the feed
    server starts: the feed reads the catalogue from the log when it loads."""
    ensure_topics(log, partitions)
    start_ms = start_time(log, live, start_day)
    store.put_users(live.users_table())
    catalogue = live.uploaded(None, start_ms)
    upload(log, store, live, catalogue, skip=items_on_topic(log))
    return start_ms, len(catalogue)


def join_lag(log: EventLog, group: str) -> int | None:
    """Records of `served` and `actions` appended but not yet committed by `group` (None when the
    group has committed nothing: no joiner runs on this log)."""
    lag, seen = 0, False
    present = set(log.topics())
    for topic in (SERVED_TOPIC, ACTIONS_TOPIC):
        if topic not in present:
            continue
        committed = log.committed(group, topic)
        seen = seen or bool(committed)
        starts = log.start_offsets(topic)
        lag += sum(max(0, end - committed.get(p, starts[p])) for p, end in log.end_offsets(topic).items())
    return lag if seen else None


__all__ = [
    "ACTIONS_TOPIC",
    "SERVED_TOPIC",
    "ensure_topics",
    "items_on_topic",
    "join_lag",
    "newest_event_ms",
    "prepare",
    "start_time",
    "upload",
]
