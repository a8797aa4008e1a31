"""Event-time watermark over several input partitions, with idle inputs advanced by processing time.

The joiner closes windows when the watermark passes them; this computes that watermark from what a
runner has read. Each input partition (e.g. ("served", 3) and ("actions", 3)) contributes the
largest event time seen on it minus the allowed out-of-orderness; the watermark is the minimum over
partitions, so no partition's in-order data is declared late. A partition that has had no record
for `idle_ms` of processing time would hold the watermark forever (a quiet partition at night), so
it is taken to be caught up: its event time is assumed to advance with processing time from its
last record (largest event time + processing time since that record). A partition never seen holds
the watermark back until it has been idle `idle_ms` since it was added, then stops counting until
its first record. The watermark never goes back.

Pure: processing time is passed in (`now_ms`), never read, so tests and replays are deterministic.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from gpurec.errors import InvalidInput


@dataclass
class _Partition:
    max_event_ms: int | None
    last_record_ms: int  # processing time of the last record (or of being added)


class WatermarkTracker:
    """Watermark = min over partitions of (max event time - out_of_order_ms), idle ones advanced."""

    def __init__(
        self, partitions: Iterable[Hashable], *, out_of_order_ms: int, idle_ms: int, now_ms: int
    ) -> None:
        if out_of_order_ms < 0 or idle_ms <= 0:
            raise InvalidInput(
                f"out_of_order_ms must be >= 0 and idle_ms > 0, got {out_of_order_ms} and {idle_ms}"
            )
        self.out_of_order_ms = out_of_order_ms
        self.idle_ms = idle_ms
        self._partitions: dict[Hashable, _Partition] = {}
        self._watermark: int | None = None
        for partition in partitions:
            self.add(partition, now_ms)

    def add(self, partition: Hashable, now_ms: int) -> None:
        """Track a partition (e.g. one assigned by a rebalance); it holds the watermark until seen or idle."""
        self._partitions.setdefault(partition, _Partition(None, now_ms))

    def remove(self, partition: Hashable) -> None:
        """Stop tracking a partition (revoked by a rebalance)."""
        self._partitions.pop(partition, None)

    def observe(self, partition: Hashable, event_ms: int, now_ms: int) -> None:
        """A record with event time event_ms was read from partition at processing time now_ms."""
        state = self._partitions.get(partition)
        if state is None:
            raise InvalidInput(f"partition {partition!r} is not tracked: add() it first")
        if state.max_event_ms is None or event_ms > state.max_event_ms:
            state.max_event_ms = event_ms
        state.last_record_ms = now_ms

    def watermark(self, now_ms: int) -> int | None:
        """The watermark at processing time now_ms (None until some partition gives one)."""
        lowest: int | None = None
        for state in self._partitions.values():
            idle_for = now_ms - state.last_record_ms
            if state.max_event_ms is None:
                if idle_for < self.idle_ms:
                    return self._watermark  # a partition not read yet may still hold older events
                continue
            event_ms = state.max_event_ms + (idle_for if idle_for >= self.idle_ms else 0)
            if lowest is None or event_ms < lowest:
                lowest = event_ms
        if lowest is not None:
            candidate = lowest - self.out_of_order_ms
            if self._watermark is None or candidate > self._watermark:
                self._watermark = candidate
        return self._watermark


__all__ = ["WatermarkTracker"]
