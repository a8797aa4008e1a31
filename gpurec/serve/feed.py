"""The live feed's logic, without Triton: candidates -> features -> ranker -> top n -> served rows.

`triton_models/feed/model.py` wraps a `FeedService` in the python backend and gives it the
ranker as a BLS call; a test or a benchmark can give it any scoring function. One request:

1. `CandidateSource.candidates(user, ts)`: a few hundred distinct items (fresh, regional and
   global trending, minus what the user was just shown), followed from the event log;
2. `store.read(user, candidates, ts)`: the ranker's inputs, on a worker thread with a timeout. A
   read that fails, times out, or finds the store unreachable degrades to default features (the
   store's priors: counters 0; the item metadata the candidate source has; unknown user) and is
   counted; degraded rows carry `consent_training=False`, so they are never trained on;
   2b. a user without personalisation consent (or unknown, or whose consent could not be read) gets
   the non-profiled feed instead: popular candidates of their region and language plus global
   ones, read without any per-user input but region and language (`_non_profiled`), logged
   with `consent_training=False`;
3. `score(inputs)`: the ranker's scores (the BLS call to `ranker`, whose dynamic batcher merges
   concurrent users);
4. the top n; one `ServedRow` per shown item (exactly the inputs the ranker scored) handed to the
   `ServedLogWriter` (a failure to log never fails the request: while the log cannot be opened
   the rows wait in a bounded queue and are written when it returns; a failed append is counted).

Bad requests raise `FeedRequestError` (INVALID_ARG); an unknown user is a cold start, not an error.
Metrics are buffered in a `ModelMetrics` and flushed by the model to Triton's metrics endpoint.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from gpurec.errors import GpurecError, InvalidInput
from gpurec.features.layout import Layout
from gpurec.features.rows import NON_PROFILED_USER_FEATURES, StoredRows, assemble, dimension_rows
from gpurec.features.store import FeatureRows, OnlineFeatureStore, open_feature_store
from gpurec.preprocess.counters import COUNTS
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC, Candidates, CandidateSource
from gpurec.serve.contract import DENSE_INPUT, ServingContract
from gpurec.serve.feed_settings import FeedSettings, open_existing
from gpurec.serve.items import items_table
from gpurec.serve.model_metrics import CANDIDATE_BUCKETS, LATENCY_BUCKETS_MS, MetricSpec, ModelMetrics
from gpurec.serve.served_log import ServedLogWriter
from gpurec.serve.source_follower import SourceFollower
from gpurec.stream.log import EventLog, Record, open_event_log
from gpurec.stream.records import ModelInputs, ServedRow, encode, encode_inputs
from gpurec.stream.retention import default_retention_ms

STORE_RETRY_S: Final = 5.0
METRICS: Final = (
    MetricSpec("gpurec_feed_requests_total", "counter", "Feed requests by outcome (ok, invalid, unavailable, failed)"),
    MetricSpec("gpurec_feed_errors_total", "counter", "Feed requests that failed, by kind of error (invalid_argument, unavailable, ranker, non_finite_output, non_finite_input, internal)"),
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
    MetricSpec("gpurec_feed_rows_unlogged_total", "counter", "Served rows answered but deliberately not logged, by reason (forgotten: an erased user)"),
    MetricSpec("gpurec_feed_requests_by_mode_total", "counter", "Answered feed requests by mode (personalised, non_profiled)"),
)


class FeedRequestError(InvalidInput):
    """A bad feed request (n out of range, a negative time): the caller's error, INVALID_ARG."""


class FeedUnavailable(GpurecError):
    """The feed cannot answer now (not configured, no candidates yet): UNAVAILABLE, try later."""


class RankerFailed(GpurecError):
    """The ranker refused or failed the candidates' rows; `kind` labels gpurec_feed_errors_total."""

    def __init__(self, message: str, kind: str = "ranker") -> None:
        super().__init__(message)
        self.kind = kind

    @classmethod
    def from_ranker(cls, message: str) -> RankerFailed:
        """The ranker's error message (`ranker: <kind>: ...`) as a failure of that kind: NaN/inf
        scores (`non_finite_output`) or NaN/inf features the feed built (`non_finite_input`)."""
        kind = next((k for k in NON_FINITE_KINDS if f"{k}:" in message), "ranker")
        return cls(message if message.startswith("ranker:") else f"ranker: {message}", kind)


NON_FINITE_KINDS: Final = ("non_finite_output", "non_finite_input")


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
    personalised: bool = True
    """False: ranked without the user's profile (no personalisation consent, unknown user, or a
    store read that failed, so consent could not be checked); see `FeedService.plan`."""

    @property
    def mode(self) -> str:
        return "personalised" if self.personalised else "non_profiled"

    @property
    def item_ids(self) -> np.ndarray:
        return self.candidates.item_ids


@dataclass(frozen=True)
class FeedAnswer:
    request_id: int
    item_ids: np.ndarray
    scores: np.ndarray
    model_version: str


def _region_of(rows: FeatureRows) -> tuple[int, int] | None:
    """The user's hashed (region, language) from their profile, None for an unknown user."""
    if not rows.user_known:
        return None
    ids = [rows.sparse.get(name) for name in NON_PROFILED_USER_FEATURES]  # region, then language
    if not all(i is not None and len(i) for i in ids):
        return None
    return int(ids[0][0]), int(ids[1][0])  # type: ignore[index]


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
        metrics: ModelMetrics | None = None,
        instance: str = "0",
    ) -> None:
        self.settings = settings
        self.contract = contract
        self.model_version = model_version
        self.metrics = metrics or ModelMetrics()
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
                lambda: open_existing(url, "event log", open_event_log),  # type: ignore[return-value]
                on_error=lambda err: self.metrics.add("gpurec_feed_source_errors_total"),
            ).start()
            self.writer = ServedLogWriter(
                lambda: open_existing(url, "event log", open_event_log),  # type: ignore[return-value]
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
                log.create_topic(SERVED_TOPIC, partitions, retention_ms=default_retention_ms(log, SERVED_TOPIC), exist_ok=True)

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
            if not np.isfinite(scores).all():  # never shown, logged or answered with NaN/inf scores
                bad = int((~np.isfinite(scores)).sum())
                raise RankerFailed(f"ranker: non_finite_output: {bad} of {scores.shape[0]} scores are NaN or infinite", "non_finite_output")
            self.metrics.observe("gpurec_feed_stage_ms", (time.perf_counter() - ranked) * 1e3, stage="rank")
            answer = self.answer(plan, scores)
        except FeedRequestError:
            self._count_failure("invalid", "invalid_argument")
            raise
        except FeedUnavailable:
            self._count_failure("unavailable", "unavailable")
            raise
        except RankerFailed as err:
            self._count_failure("failed", err.kind)
            raise
        except Exception:
            self._count_failure("failed", "internal")
            raise
        self.metrics.add("gpurec_feed_requests_total", outcome="ok")
        self.metrics.add("gpurec_feed_requests_by_mode_total", mode=plan.mode)
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
        # Consent is read with the features, in the same round trip, so it is current at every request;
        # without it (or without a profile, or with the store unreadable) the request starts over
        # without the profile: a second read, paid only by those requests.
        personalised = degraded is None and rows.consent_personalisation
        if not personalised:
            candidates, rows, degraded = self._non_profiled(int(user_id), rows, degraded, ts_ms)
        t2 = time.perf_counter()
        self.metrics.observe("gpurec_feed_stage_ms", (t1 - t0) * 1e3, stage="candidates")
        self.metrics.observe("gpurec_feed_stage_ms", (t2 - t1) * 1e3, stage="features")
        self.metrics.observe("gpurec_feed_candidates", len(candidates))
        if degraded:
            self.metrics.add("gpurec_feed_degraded_reads_total", reason=degraded)
        elif personalised and (region := _region_of(rows)) is not None:
            self.source.note_user_region(int(user_id), region)
        rid = random_request_id() if request_id is None else int(request_id)
        return FeedPlan(rid, int(user_id), ts_ms, int(n), candidates, rows, self._ranker_inputs(rows), degraded, personalised)

    def _non_profiled(
        self, user_id: int, rows: FeatureRows, degraded: str | None, ts_ms: int
    ) -> tuple[Candidates, FeatureRows, str | None]:
        """The request without the user's profile (DSA Art. 38's non-profiled option): popular
        candidates of the user's region and language plus global ones (`CandidateSource.popular`),
        read with `profiled=False`, so the ranker sees no user id, device, counters or history, and
        the user's recent items are not excluded. Every user of one region and language gets the same
        feed at one event time. Why the ranker and not popularity alone: the same model ranks both
        modes on everything that is not the user's (the items' quality and freshness, the hour, the
        match with the user's region and language), with one scoring path and one served-row format.
        """
        region = _region_of(rows) if degraded is None else None
        candidates = self.source.popular(region, ts_ms, limit=self.contract.max_batch_size)
        if not len(candidates):
            raise FeedUnavailable(f"feed: no popular candidates yet ({self._log_state()})")
        if degraded is not None:  # the store just failed: do not wait on it twice
            return candidates, self.default_rows(user_id, candidates.item_ids, ts_ms, profiled=False), degraded
        rows, degraded = self._read(user_id, candidates.item_ids, ts_ms, profiled=False)
        return candidates, rows, degraded

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
        if plan.rows.forgotten:  # an erased user: answered non-profiled, nothing of the request kept
            self.metrics.add("gpurec_feed_rows_unlogged_total", len(top), reason="forgotten")
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
                    # Non-profiled rows are never training examples: ranked without the profile,
                    # their inputs hold no user id or history to learn that user from.
                    consent_training=bool(plan.rows.consent_training) and plan.personalised,
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
            self._store = open_existing(  # type: ignore[assignment]
                self.settings.feature_store, "feature store", lambda url: open_feature_store(url, timeout_s=timeout_s)
            )
            self._store_error = ""
        except Exception as err:
            self._store, self._store_error = None, f"{type(err).__name__}: {err}"

    def _read(
        self, user_id: int, item_ids: np.ndarray, ts_ms: int, profiled: bool = True
    ) -> tuple[FeatureRows, str | None]:
        """The store's rows, or the defaults and why (unavailable, busy, timeout, error)."""
        with self._lock:
            if self._store is None and time.monotonic() >= self._store_retry_at:
                self._reopen_store()
            store = self._store
            if store is None:
                return self.default_rows(user_id, item_ids, ts_ms, profiled), "unavailable"
            if self._pending_read is not None and not self._pending_read.done():
                return self.default_rows(user_id, item_ids, ts_ms, profiled), "busy"  # the last read still hangs
            future = self._reads.submit(store.read, user_id, item_ids, ts_ms, profiled)
            self._pending_read = future
        try:
            return future.result(timeout=self.settings.store_timeout_ms / 1000), None
        except concurrent.futures.TimeoutError:
            return self.default_rows(user_id, item_ids, ts_ms, profiled), "timeout"
        except Exception as err:
            self._store_error = f"{type(err).__name__}: {err}"
            return self.default_rows(user_id, item_ids, ts_ms, profiled), "error"

    def default_rows(self, user_id: int, item_ids: np.ndarray, ts_ms: int, profiled: bool = True) -> FeatureRows:
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
        return assemble(layout, user_id, user, item_ids, items, ts_ms, profiled)


__all__ = [
    "METRICS",
    "FeedAnswer",
    "FeedPlan",
    "FeedRequestError",
    "FeedService",
    "FeedUnavailable",
    "RankerFailed",
    "random_request_id",
]
