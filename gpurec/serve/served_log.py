"""Writes the feed's served rows to the event log off the request path, as a Kafka producer does.

A request hands its rows to `ServedLogWriter.submit` (a queue put, microseconds) and answers; one
background thread appends whatever has queued up in one `append` per batch. Why not append in the
request: the append waits for durability (a Kafka flush, a SQLite commit behind another writer such
as the joiner), and a slow or broken log must neither slow nor fail a feed. The price: rows still
queued when the process dies are lost, and a response can reach the user before its rows are
durable (the joiner holds early actions until their row comes, see `gpurec.stream.joiner`).

Failures are counted, never raised: an append that fails loses that batch (`failed`; not retried,
so a batch that did reach the log is never written twice; the Kafka client reconnects by itself);
a log that cannot be opened is opened again with backoff while rows wait in the queue, which is
the bound: a full queue drops the new rows (`dropped`, reason `queue_full`), and rows still queued
at `close` while the log is away are counted lost (`log_unavailable`). When the log opens, the
waiting rows are written.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gpurec.stream.log import EventLog, Record


@dataclass
class WriterStats:
    """Rows written, lost to failed appends, dropped on a full queue; the last batch's delay."""

    written: int = 0
    failed: int = 0
    dropped: int = 0
    last_delay_ms: float = 0.0
    last_error: str = ""


class ServedLogWriter:
    """Appends submitted records to `topic` from a background thread (see the module docstring).

    `open_log` runs on the writer thread; `prepare(log)` runs after each successful open (the feed
    creates the topic there). `on_failure(rows, reason)` and `on_written(rows, delay_ms)` are told
    of each outcome, on the writer thread.
    """

    def __init__(
        self,
        open_log: Callable[[], EventLog],
        topic: str,
        *,
        prepare: Callable[[EventLog], None] | None = None,
        max_queue_batches: int = 10_000,
        max_batch_records: int = 5_000,
        on_failure: Callable[[int, str], None] | None = None,
        on_written: Callable[[int, float], None] | None = None,
    ) -> None:
        self.open_log = open_log
        self.topic = topic
        self.prepare = prepare
        self.max_batch_records = max_batch_records
        self.on_failure = on_failure
        self.on_written = on_written
        self.stats = WriterStats()
        self._queue: queue.Queue[tuple[float, Sequence[Record]] | None] = queue.Queue(max_queue_batches)
        self._log: EventLog | None = None
        self._thread = threading.Thread(target=self._run, name="gpurec-feed-served-log", daemon=True)
        self._closing = threading.Event()
        self._thread.start()

    @property
    def queued(self) -> int:
        """Batches waiting to be written."""
        return self._queue.qsize()

    def submit(self, records: Sequence[Record]) -> bool:
        """Queue one request's rows; False (and counted as dropped) when the queue is full or closed."""
        if self._closing.is_set():
            self._fail(len(records), "closed", dropped=True)
            return False
        try:
            self._queue.put_nowait((time.monotonic(), records))
            return True
        except queue.Full:
            self._fail(len(records), "queue_full", dropped=True)
            return False

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to `timeout_s`), then stop and close the log."""
        self._closing.set()
        with contextlib.suppress(queue.Full):
            self._queue.put((time.monotonic(), []), timeout=timeout_s)  # wakes the thread
        self._thread.join(timeout_s)

    def _fail(self, rows: int, reason: str, dropped: bool = False) -> None:
        if dropped:
            self.stats.dropped += rows
        else:
            self.stats.failed += rows
        if self.on_failure is not None:
            self.on_failure(rows, reason)

    def _next_batch(self) -> list[tuple[float, Sequence[Record]]]:
        batch = [self._queue.get()]
        size = len(batch[0][1])
        while size < self.max_batch_records:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            batch.append(item)
            size += len(item[1])
        return batch

    def _connect(self) -> EventLog | None:
        if self._log is None:
            log = self.open_log()
            try:
                if self.prepare is not None:
                    self.prepare(log)
            except BaseException:
                log.close()
                raise
            self._log = log
        return self._log

    def _disconnect(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(Exception):
                log.close()

    def _lose_queued(self, reason: str) -> None:
        """Count every queued row as lost (closing while the log is away)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[1]:
                self._fail(len(item[1]), reason)

    def _run(self) -> None:
        backoff = 0.2
        while True:
            if self._closing.is_set() and self._queue.empty():
                break
            if self._log is None:
                try:
                    self._connect()
                except Exception as err:  # the log is away: rows wait in the (bounded) queue
                    self.stats.last_error = f"{type(err).__name__}: {err}"
                    if self._closing.is_set():
                        self._lose_queued("log_unavailable")
                        break
                    self._closing.wait(backoff)  # do not spin on opening it; `close` wakes it
                    backoff = min(5.0, backoff * 2)
                    continue
                backoff = 0.2
            batch = self._next_batch()
            records = [r for _, batch_records in batch for r in batch_records]
            if not records:
                continue
            try:
                assert self._log is not None
                self._log.append(self.topic, records)
            except Exception as err:
                self.stats.last_error = f"{type(err).__name__}: {err}"
                self._fail(len(records), "append_failed")
                continue
            delay_ms = (time.monotonic() - batch[0][0]) * 1000.0
            self.stats.written += len(records)
            self.stats.last_delay_ms = delay_ms
            if self.on_written is not None:
                self.on_written(len(records), delay_ms)
        self._disconnect()


__all__ = ["ServedLogWriter", "WriterStats"]
