"""The live feed's logic, without Triton: candidates -> features -> ranker -> top n -> served rows.

`triton_models/feed/model.py` wraps a `FeedService` in the python backend and gives it the
ranker as a BLS call; a test or a benchmark can give it any scoring function. One request:

1. `CandidateSource.candidates(user, ts)`: a few hundred distinct items (fresh, regional and
   global trending, minus what the user was just shown), followed from the event log;
2. `store.read(user, candidates, ts)`: the ranker's inputs, on a worker thread with a timeout. A
   read that fails, times out, or finds the store unreachable degrades to default features (the
   store's priors: counters 0; the item metadata the candidate source has; unknown user) and is
   counted; degraded rows carry `consent_training=False`, so they are never trained on;
3. `score(inputs)`: the ranker's scores (the BLS call to `ranker`, whose dynamic batcher merges
   concurrent users);
4. the top n; one `ServedRow` per shown item (exactly the inputs the ranker scored) handed to the
   `ServedLogWriter` (a failure to log never fails the request; it is counted).

Bad requests raise `FeedRequestError` (INVALID_ARG); an unknown user is a cold start, not an error.
Metrics are buffered in `FeedMetrics` and flushed by the model to Triton's metrics endpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import numpy as np

from gpurec.errors import GpurecError, InvalidInput
from gpurec.features.layout import Layout
from gpurec.features.rows import StoredRows, assemble, dimension_rows
from gpurec.features.store import FeatureRows, OnlineFeatureStore, open_feature_store
from gpurec.preprocess.counters import COUNTS
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC, Candidates, CandidateSource
from gpurec.serve.contract import DENSE_INPUT, ServingContract
from gpurec.serve.feed_settings import FeedSettings
from gpurec.serve.items import items_table
from gpurec.serve.served_log import ServedLogWriter
from gpurec.serve.source_follower import SourceFollower
from gpurec.stream.log import EventLog, Record, open_event_log
from gpurec.stream.records import ModelInputs, ServedRow, encode, encode_inputs

STORE_RETRY_S: Final = 5.0
LATENCY_BUCKETS_MS: Final = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 250, 500, 1000, 2500)
CANDIDATE_BUCKETS: Final = (0, 25, 50, 100, 150, 200, 250, 300, 400, 500, 1000)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    buckets: tuple[float, ...] = ()


METRICS: Final = (
    MetricSpec("gpurec_feed_requests_total", "counter", "Feed requests by outcome (ok, invalid, unavailable, failed)"),
    MetricSpec("gpurec_feed_errors_total", "counter", "Feed requests that failed, by kind of error"),
    MetricSpec("gpurec_feed_latency_ms", "histogram", "Feed request latency inside the model (ms)", LATENCY_BUCKETS_MS),
    MetricSpec("gpurec_feed_stage_ms", "histogram", "Time per step of a feed request (ms)", LATENCY_BUCKETS_MS),
    MetricSpec("gpurec_feed_candidates", "histogram", "Candidates ranked per feed request", CANDIDATE_BUCKETS),
    MetricSpec("gpurec_feed_degraded_reads_total", "counter", "Feature-store reads replaced by defaults, by reason"),
    MetricSpec("gpurec_feed_log_failures_total", "counter", "Served rows not logged to the event log, by reason"),
    MetricSpec("gpurec_feed_served_rows_total", "counter", "Served rows appended to the event log"),
    MetricSpec("gpurec_feed_log_write_delay_ms", "histogram", "Request to durable append of its served rows (ms)", LATENCY_BUCKETS_MS),
    MetricSpec("gpurec_feed_log_queue_batches", "gauge", "Requests whose served rows wait to be logged, per instance"),
    MetricSpec("gpurec_feed_source_lag_records", "gauge", "Records of the followed topics not read yet, per instance"),
    MetricSpec("gpurec_feed_source_errors_total", "counter", "Failures reading the event log for candidates"),
)


class FeedMetrics:
    """Metric updates buffered for a periodic flush (a Triton metric update is an IPC round trip)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple, float] = {}
        self._gauges: dict[tuple, float] = {}
        self._observed: dict[tuple, list[float]] = {}
        self.totals: dict[tuple, float] = {}
        """Every counter's running total, by (name, sorted labels): for in-process checks."""

    @staticmethod
    def key(name: str, labels: Mapping[str, str]) -> tuple:
        return name, tuple(sorted(labels.items()))

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = self.key(name, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value
            self.totals[key] = self.totals.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[self.key(name, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._observed.setdefault(self.key(name, labels), []).append(value)

    def total(self, name: str, **labels: str) -> float:
        return self.totals.get(self.key(name, labels), 0.0)

    def drain(self) -> tuple[dict[tuple, float], dict[tuple, float], dict[tuple, list[float]]]:
        """Counter increments, gauge values and observations since the last drain."""
        with self._lock:
            out = self._counts, self._gauges, self._observed
            self._counts, self._gauges, self._observed = {}, {}, {}
        return out


class FeedRequestError(InvalidInput):
    """A bad feed request (n out of range, a negative time): the caller's error, INVALID_ARG."""


class FeedUnavailable(GpurecError):
    """The feed cannot answer now (not configured, no candidates yet): UNAVAILABLE, try later."""


class RankerFailed(GpurecError):
    """The ranker refused or failed the candidates' rows."""


@dataclass(frozen=True)
class FeedPlan:
    """What one request will rank: its candidates, their features and the ranker's inputs."""

    request_id: int
    user_id: int
    ts_ms: int
    n: int
    candidates: Candidates
    rows: FeatureRows
    inputs: dict[str, np.ndarray]
    degraded: str | None

    @property
    def item_ids(self) -> np.ndarray:
        return self.candidates.item_ids


@dataclass(frozen=True)
class FeedAnswer:
    request_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: str


def _sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL or plain path (None for network backends)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        return Path(parts.path[1:])
    return None if parts.scheme and len(parts.scheme) > 1 else Path(url)


def _open_existing(url: str, what: str, opener: Callable[[str], object]) -> object:
    """Open a store or log, refusing to create a SQLite file: the feed is a reader of both, and a
    mistyped path would otherwise serve from (or log into) an empty new file."""
    path = _sqlite_path(url)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (yet)")
    return opener(url)


def random_request_id() -> int:
    """A random positive int64: unique across instances and restarts with no coordination."""
    return int.from_bytes(os.urandom(8), "little") >> 1


class FeedService:
    """One feed model instance's state: candidate source, store, log writer, metrics."""

    def __init__(
        self,
        settings: FeedSettings,
        contract: ServingContract,
        model_version: str,
        metrics: FeedMetrics | None = None,
        instance: str = "0",
    ) -> None:
        self.settings = settings
        self.contract = contract
        self.model_version = model_version
        self.metrics = metrics or FeedMetrics()
        self.instance = instance
        self.source = CandidateSource(settings.candidate_config())
        self.layout = Layout.from_features()
        self.unusable = self._check_contract()
        self._dense_order = self._dense_permutation()
        self._store: OnlineFeatureStore | None = None
        self._store_error = ""
        self._store_retry_at = 0.0
        self._reads = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpurec-feed-store")
        self._pending_read: concurrent.futures.Future | None = None
        self._lock = threading.Lock()
        self.follower: SourceFollower | None = None
        self.writer: ServedLogWriter | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, catch_up_s: float = 30.0) -> FeedService:
        """Open the store, start following the log and the served-row writer; wait (up to
        `catch_up_s`) until the log has been read once to its end, so the first request has candidates."""
        # The first feature assembly imports what Polars converts through (pandas, about 1-3 s):
        # done here, not in the first request's store read, which would time out.
        self.default_rows(0, np.zeros(1, np.int64), 0)
        if self.settings.feature_store:
            self._reopen_store()
        url = self.settings.event_log
        if url:
            self.follower = SourceFollower(
                self.source,
                lambda: _open_existing(url, "event log", open_event_log),  # type: ignore[return-value]
                on_error=lambda err: self.metrics.add("gpurec_feed_source_errors_total"),
            ).start()
            self.writer = ServedLogWriter(
                lambda: _open_existing(url, "event log", open_event_log),  # type: ignore[return-value]
                SERVED_TOPIC,
                prepare=self._create_served_topic,
                on_failure=lambda rows, reason: self.metrics.add("gpurec_feed_log_failures_total", rows, reason=reason),
                on_written=self._written,
            )
            self.follower.caught_up.wait(catch_up_s)
        return self

    def close(self) -> None:
        if self.follower is not None:
            self.follower.stop()
        if self.writer is not None:
            self.writer.close()
        self._reads.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.close()

    def _create_served_topic(self, log: EventLog) -> None:
        """`served` as partitioned as `actions` (the joiner meets a user's rows and actions in one
        partition number), or `served_partitions` when there are no actions yet."""
        topics = log.topics()
        if SERVED_TOPIC not in topics:
            partitions = log.partitions(ACTIONS_TOPIC) if ACTIONS_TOPIC in topics else self.settings.served_partitions
            with contextlib.suppress(InvalidInput):  # another instance created it meanwhile
                log.create_topic(SERVED_TOPIC, partitions, exist_ok=True)

    def _written(self, rows: int, delay_ms: float) -> None:
        self.metrics.add("gpurec_feed_served_rows_total", rows)
        self.metrics.observe("gpurec_feed_log_write_delay_ms", delay_ms)

    def update_gauges(self) -> None:
        """Per-instance gauges (the model calls this before each metrics flush)."""
        if self.writer is not None:
            self.metrics.set("gpurec_feed_log_queue_batches", self.writer.queued, instance=self.instance)
        if self.follower is not None:
            for topic, lag in self.follower.lag.items():
                self.metrics.set("gpurec_feed_source_lag_records", lag, topic=topic, instance=self.instance)

    # ---- checks -------------------------------------------------------------------------------

    def _check_contract(self) -> str | None:
        """Why the store's features cannot feed this ranker (None when they can)."""
        from gpurec.preprocess.features import HASHING_SCHEME

        if self.contract.hashing and self.contract.hashing != HASHING_SCHEME:
            return f"the ranker was trained on hashing {self.contract.hashing!r}, the feature store serves {HASHING_SCHEME!r}"
        store_dense = {f.name for f in self.layout.dense}
        store_sparse = {f.name for f in self.layout.sparse}
        wanted_sparse = {*self.contract.sparse_features, *self.contract.multi_valued_features}
        if set(self.contract.dense_features) != store_dense or not wanted_sparse <= store_sparse:
            return (
                f"the ranker's features (dense {list(self.contract.dense_features)}, sparse {sorted(wanted_sparse)}) are not "
                f"the feature store's (dense {sorted(store_dense)}, sparse {sorted(store_sparse)})"
            )
        return None

    def _dense_permutation(self) -> np.ndarray | None:
        """Store dense columns -> the contract's (manifest) order; None when they already agree."""
        if self.unusable:
            return None
        names = [f.name for f in self.layout.dense]
        order = np.array([names.index(n) for n in self.contract.dense_features])
        return None if np.array_equal(order, np.arange(len(names))) else order

    # ---- one request --------------------------------------------------------------------------

    def serve(
        self,
        user_id: int,
        n: int,
        score: Callable[[dict[str, np.ndarray]], np.ndarray],
        ts_ms: int | None = None,
        request_id: int | None = None,
    ) -> FeedAnswer:
        """One feed request, counted: plan, `score(inputs)`, answer."""
        started = time.perf_counter()
        try:
            plan = self.plan(user_id, n, ts_ms, request_id)
            ranked = time.perf_counter()
            try:
                scores = np.asarray(score(plan.inputs), np.float32).reshape(-1)
            except RankerFailed:
                raise
            except Exception as err:
                raise RankerFailed(f"ranker: {type(err).__name__}: {err}") from err
            self.metrics.observe("gpurec_feed_stage_ms", (time.perf_counter() - ranked) * 1e3, stage="rank")
            answer = self.answer(plan, scores)
        except FeedRequestError:
            self._count_failure("invalid", "invalid_argument")
            raise
        except FeedUnavailable:
            self._count_failure("unavailable", "unavailable")
            raise
        except RankerFailed:
            self._count_failure("failed", "ranker")
            raise
        except Exception:
            self._count_failure("failed", "internal")
            raise
        self.metrics.add("gpurec_feed_requests_total", outcome="ok")
        self.metrics.observe("gpurec_feed_latency_ms", (time.perf_counter() - started) * 1e3)
        return answer

    def _count_failure(self, outcome: str, kind: str) -> None:
        self.metrics.add("gpurec_feed_requests_total", outcome=outcome)
        self.metrics.add("gpurec_feed_errors_total", kind=kind)

    def plan(self, user_id: int, n: int, ts_ms: int | None = None, request_id: int | None = None) -> FeedPlan:
        """Candidates and their features for one request (raises FeedRequestError, FeedUnavailable)."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= self.settings.max_n:
            raise FeedRequestError(f"n must be an integer in 1..{self.settings.max_n}, got {n!r}")
        ts_ms = int(time.time() * 1000) if ts_ms is None else int(ts_ms)
        if ts_ms < 0:
            raise FeedRequestError(f"ts_ms must be an event time in epoch milliseconds (>= 0), got {ts_ms}")
        if self.unusable:
            raise FeedUnavailable(f"feed: {self.unusable}")
        for setting, what in (("feature_store", "feature store"), ("event_log", "event log")):
            if not getattr(self.settings, setting):
                raise FeedUnavailable(
                    f"feed: no {what} configured (export with --{setting.replace('_', '-')} URL, "
                    f"or serve with --{setting.replace('_', '-')} URL)"
                )
        t0 = time.perf_counter()
        candidates = self.source.candidates(int(user_id), ts_ms, limit=self.contract.max_batch_size)
        if not len(candidates):
            raise FeedUnavailable(
                f"feed: no candidates yet: no items read from the event log's items topic ({self._log_state()})"
            )
        t1 = time.perf_counter()
        rows, degraded = self._read(int(user_id), candidates.item_ids, ts_ms)
        t2 = time.perf_counter()
        self.metrics.observe("gpurec_feed_stage_ms", (t1 - t0) * 1e3, stage="candidates")
        self.metrics.observe("gpurec_feed_stage_ms", (t2 - t1) * 1e3, stage="features")
        self.metrics.observe("gpurec_feed_candidates", len(candidates))
        if degraded:
            self.metrics.add("gpurec_feed_degraded_reads_total", reason=degraded)
        elif rows.user_known:
            region = [rows.sparse.get(name) for name in ("user_region", "user_language")]
            if all(r is not None and len(r) for r in region):
                self.source.note_user_region(int(user_id), (int(region[0][0]), int(region[1][0])))  # type: ignore[index]
        rid = random_request_id() if request_id is None else int(request_id)
        return FeedPlan(rid, int(user_id), ts_ms, int(n), candidates, rows, self._ranker_inputs(rows), degraded)

    def answer(self, plan: FeedPlan, scores: np.ndarray) -> FeedAnswer:
        """The top n of the plan by `scores`, its served rows handed to the log writer."""
        if scores.shape != (len(plan.candidates),):
            raise RankerFailed(f"ranker: {scores.shape[0]} scores for {len(plan.candidates)} candidates")
        top = np.argsort(-scores, kind="stable")[: plan.n]
        item_ids = plan.item_ids[top]
        t0 = time.perf_counter()
        self._log_served(plan, top)
        self.source.note_shown(plan.user_id, plan.request_id, item_ids.tolist())
        self.metrics.observe("gpurec_feed_stage_ms", (time.perf_counter() - t0) * 1e3, stage="log")
        return FeedAnswer(plan.request_id, item_ids, scores[top].astype(np.float32), self.model_version)

    def _log_served(self, plan: FeedPlan, top: np.ndarray) -> None:
        if self.writer is None:
            return
        try:
            records = [
                Record(plan.user_id, encode(row), plan.ts_ms)
                for row in self.served_rows(plan, top)
            ]
        except Exception:  # never fails the request: counted like a failed append
            self.metrics.add("gpurec_feed_log_failures_total", len(top), reason="encode_failed")
            return
        self.writer.submit(records)

    def served_rows(self, plan: FeedPlan, top: np.ndarray) -> list[ServedRow]:
        """One row per shown item, in shown order, holding exactly the inputs the ranker scored."""
        dense = plan.inputs[DENSE_INPUT]
        single, multi = self.contract.sparse_features, self.contract.multi_valued_features
        rows = []
        for position, index in enumerate(top.tolist()):
            item_id = int(plan.item_ids[index])
            sparse = {name: (int(plan.inputs[name][index, 0]),) for name in single}
            sparse.update({name: tuple(plan.rows.multi_valued[name][index].tolist()) for name in multi})
            item = self.source.item(item_id)
            rows.append(
                ServedRow(
                    request_id=plan.request_id,
                    item_id=item_id,
                    user_id=plan.user_id,
                    ts_ms=plan.ts_ms,
                    position=position,
                    model_version=self.model_version,
                    duration_ms=item.duration_ms if item is not None else 0,
                    consent_training=bool(plan.rows.consent_training),
                    inputs=encode_inputs(ModelInputs(tuple(dense[index].tolist()), sparse)),
                )
            )
        return rows

    def _ranker_inputs(self, rows: FeatureRows) -> dict[str, np.ndarray]:
        arrays = rows.model_inputs()
        dense = arrays[DENSE_INPUT] if self._dense_order is None else arrays[DENSE_INPUT][:, self._dense_order]
        out = {DENSE_INPUT: np.ascontiguousarray(dense, dtype=np.float32)}
        for name in (*self.contract.sparse_features, *self.contract.multi_valued_features):
            out[name] = np.ascontiguousarray(arrays[name], dtype=np.int64)
        return out

    def _log_state(self) -> str:
        follower = self.follower
        if follower is None:
            return "not followed"
        return f"{follower.errors} read failures, {self.source.counts['items']} items read"

    # ---- features -----------------------------------------------------------------------------

    def _reopen_store(self) -> None:
        self._store_retry_at = time.monotonic() + STORE_RETRY_S
        try:
            timeout_s = max(1.0, 20 * self.settings.store_timeout_ms / 1000)  # the client's own bound on a hung call
            self._store = _open_existing(  # type: ignore[assignment]
                self.settings.feature_store, "feature store", lambda url: open_feature_store(url, timeout_s=timeout_s)
            )
            self._store_error = ""
        except Exception as err:
            self._store, self._store_error = None, f"{type(err).__name__}: {err}"

    def _read(self, user_id: int, item_ids: np.ndarray, ts_ms: int) -> tuple[FeatureRows, str | None]:
        """The store's rows, or the defaults and why (unavailable, busy, timeout, error)."""
        with self._lock:
            if self._store is None and time.monotonic() >= self._store_retry_at:
                self._reopen_store()
            store = self._store
            if store is None:
                return self.default_rows(user_id, item_ids, ts_ms), "unavailable"
            if self._pending_read is not None and not self._pending_read.done():
                return self.default_rows(user_id, item_ids, ts_ms), "busy"  # the last read still hangs
            future = self._reads.submit(store.read, user_id, item_ids, ts_ms)
            self._pending_read = future
        try:
            return future.result(timeout=self.settings.store_timeout_ms / 1000), None
        except concurrent.futures.TimeoutError:
            return self.default_rows(user_id, item_ids, ts_ms), "timeout"
        except Exception as err:
            self._store_error = f"{type(err).__name__}: {err}"
            return self.default_rows(user_id, item_ids, ts_ms), "error"

    def default_rows(self, user_id: int, item_ids: np.ndarray, ts_ms: int) -> FeatureRows:
        """Features without the store: counters 0 (the priors), item metadata from the candidate
        source (hashed as the store would), the user unknown (no consent, so never trained on)."""
        layout = self.layout
        known = [item for i in item_ids.tolist() if (item := self.source.item(i)) is not None]
        found: list[tuple] = []
        if known:
            dims = dimension_rows(layout.items, items_table(known))
            zeros = (0,) * len(COUNTS)
            numeric = dims.numeric.tolist()
            blobs = [dims.blobs[c] for c in layout.items.blob_columns]
            found = [(key, *zeros, *numeric[j], *(b[j] for b in blobs)) for j, key in enumerate(dims.keys)]
        items = StoredRows.from_found(layout.items, item_ids.tolist(), found)
        user = StoredRows.from_found(layout.users, [user_id], [])
        return assemble(layout, user_id, user, item_ids, items, ts_ms)


__all__ = [
    "METRICS",
    "FeedAnswer",
    "FeedMetrics",
    "FeedPlan",
    "FeedRequestError",
    "FeedService",
    "FeedUnavailable",
    "MetricSpec",
    "RankerFailed",
    "random_request_id",
]
