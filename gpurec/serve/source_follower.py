"""Following the event log into a `CandidateSource`: a background thread tailing three topics.

`SourceFollower` runs inside every feed model instance (started in `initialize`, stopped in
`finalize`); it reads the `items`, `actions` and `served` topics from their start, every partition,
decodes the records (`apply_records`; an undecodable record is counted and skipped) and rebuilds the
source's pools after new records. Tests drive `TopicTail` and `apply_records` directly.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from gpurec.errors import InvalidInput
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC, CandidateSource
from gpurec.serve.items import ITEMS_TOPIC, Item, decode_item
from gpurec.stream.log import EventLog, StoredRecord
from gpurec.stream.records import Action, ServedRow, decoder

BACKOFF_S: Final = 0.5  # the first wait after a failed read of the log, doubling up to 10 s


class TopicTail:
    """Reads new records of some topics, every partition from its start, remembering where it is.

    Topics that do not exist yet are looked for again at most every `rescan_s` seconds.
    """

    def __init__(self, log: EventLog, topics: Sequence[str], rescan_s: float = 1.0) -> None:
        self.log = log
        self.topics = tuple(topics)
        self.rescan_s = rescan_s
        self.next: dict[tuple[str, int], int] = {}
        self._present: set[str] = set()
        self._scanned = float("-inf")

    def _scan(self) -> None:
        if len(self._present) == len(self.topics) or time.monotonic() - self._scanned < self.rescan_s:
            return
        self._scanned = time.monotonic()
        existing = set(self.log.topics())
        for topic in self.topics:
            if topic in existing and topic not in self._present:
                self._present.add(topic)
                for partition in range(self.log.partitions(topic)):
                    self.next[(topic, partition)] = 0  # below the start offset reads from the start

    def poll(self, max_records: int = 1000) -> list[tuple[str, StoredRecord]]:
        """Up to `max_records` new records per partition, as (topic, record)."""
        self._scan()
        out: list[tuple[str, StoredRecord]] = []
        moved: dict[tuple[str, int], int] = {}
        for (topic, partition), offset in self.next.items():
            records = self.log.read(topic, partition, offset, max_records)
            if records:
                moved[(topic, partition)] = records[-1].offset + 1
                out.extend((topic, r) for r in records)
        self.next.update(moved)  # only once every read succeeded: a failed poll is retried whole
        return out

    def lag(self) -> dict[str, int]:
        """Records not read yet, per followed topic that exists."""
        out: dict[str, int] = {}
        for topic in self._present:
            ends = self.log.end_offsets(topic)
            out[topic] = sum(max(0, end - self.next.get((topic, p), 0)) for p, end in ends.items())
        return out


_DECODE_ACTION = decoder(Action)
_DECODE_SERVED = decoder(ServedRow)


def apply_records(source: CandidateSource, records: Iterable[tuple[str, StoredRecord]]) -> int:
    """Decode tailed records into the source; returns how many were invalid (skipped, counted)."""
    items: list[Item] = []
    actions: list[Action] = []
    served: list[ServedRow] = []
    invalid = 0
    for topic, record in records:
        try:
            if topic == ITEMS_TOPIC:
                items.append(decode_item(record.value))
            elif topic == ACTIONS_TOPIC:
                actions.append(_DECODE_ACTION(record.value))
            elif topic == SERVED_TOPIC:
                served.append(_DECODE_SERVED(record.value))
        except InvalidInput:
            invalid += 1
    source.add_items(items)  # items first: engagement of a just-uploaded item finds its region
    source.add_actions(actions)
    source.add_served(served)
    source.counts["invalid"] += invalid
    return invalid


class SourceFollower:
    """A background thread that tails the `items`, `actions` and `served` topics into a source.

    `open_log` is called on the thread until it succeeds (with backoff); after that, a failed
    read is retried on the same log from the same offsets (with backoff), so nothing is read
    twice. Meanwhile the last pools keep serving: a broken log costs freshness, not requests.
    `on_error` is told of each failure; `lag` holds the records not read yet per topic (updated
    every `lag_interval_s`).
    """

    def __init__(
        self,
        source: CandidateSource,
        open_log: Callable[[], EventLog],
        *,
        interval_s: float = 0.1,
        refresh_interval_s: float = 1.0,
        lag_interval_s: float = 1.0,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.source = source
        self.open_log = open_log
        self.interval_s = interval_s
        self.refresh_interval_s = refresh_interval_s
        self.lag_interval_s = lag_interval_s
        self.on_error = on_error
        self.lag: dict[str, int] = {}
        self.errors = 0
        self.caught_up = threading.Event()
        """Set once every followed topic that exists has been read to its end (or reading failed)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff = BACKOFF_S
        self._dirty = False  # records read since the pools were last rebuilt (kept across read failures)
        self._refreshed = float("-inf")

    def start(self) -> SourceFollower:
        self._thread = threading.Thread(target=self._run, name="gpurec-feed-candidates", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        log: EventLog | None = None
        tail: TopicTail | None = None
        try:
            while not self._stop.is_set():
                try:
                    if log is None:
                        log = self.open_log()
                        tail = TopicTail(log, (ITEMS_TOPIC, ACTIONS_TOPIC, SERVED_TOPIC))
                    assert tail is not None
                    self._follow(tail)
                except Exception as err:  # down or broken: keep serving the last pools, try again
                    self.errors += 1
                    self.caught_up.set()
                    if self.on_error is not None:
                        self.on_error(err)
                    self._stop.wait(self._backoff)
                    self._backoff = min(10.0, self._backoff * 2)
        finally:
            if log is not None:
                with contextlib.suppress(Exception):
                    log.close()

    def _follow(self, tail: TopicTail) -> None:
        lag_checked = float("-inf")
        while not self._stop.is_set():
            records = tail.poll()
            self._backoff = BACKOFF_S
            if records:
                apply_records(self.source, records)
                # Served rows change users' history, read live; only uploads and engagement move the pools.
                self._dirty = self._dirty or any(topic != SERVED_TOPIC for topic, _ in records)
            now = time.monotonic()
            first_catch_up = not records and not self.caught_up.is_set()
            if self._dirty and (first_catch_up or now - self._refreshed >= self.refresh_interval_s):
                self.source.refresh()
                self._refreshed, self._dirty = now, False
            if now - lag_checked >= self.lag_interval_s:
                self.lag = tail.lag()
                lag_checked = now
            if not records:
                self.caught_up.set()
                self._stop.wait(self.interval_s)


__all__ = ["SourceFollower", "TopicTail", "apply_records"]
