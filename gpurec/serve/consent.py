"""Consent changes, effective at the next request: the `consent` model's logic, without Triton.

`triton_models/consent/model.py` wraps a `ConsentService`; the client calls it with
`client.set_consent(user_id, personalisation=..., training=...)`. One change, synchronously:

1. the user's profile in the online feature store (`OnlineFeatureStore.set_consent`, one atomic
   write; a flag not given keeps its value): the feed reads consent with the features of every
   request, so the very next request is personalised or not, and its served rows carry the new
   training consent;
2. one `ConsentChange` with the user's whole consent after the change on the event log's `consent`
   topic (keyed by user, partitioned like `served` and `actions`): the joiner follows it and strips
   the rows it still holds of a user who revoked training consent, and it is the audit trail.

The store is written first because it returns the state after the change (a flag not given is
read and written in one statement) and because it is what the next request reads. A failure of
either step answers an error and the caller retries: both steps are idempotent (the same flags
again; a repeated `ConsentChange` changes nothing in the joiner). A user the store has no profile
of is refused: an unknown user is served non-profiled and never trained on anyway.

Where the store and the log are: the same settings as the feed (`consent/config.pbtxt`
parameters, overridden by GPUREC_FEATURE_STORE / GPUREC_EVENT_LOG).
"""

from __future__ import annotations

import contextlib
import operator
import threading
import time
from collections.abc import Callable
from typing import Final

from gpurec.errors import GpurecError, InvalidInput
from gpurec.features.store import OnlineFeatureStore, open_feature_store
from gpurec.serve.candidates import ACTIONS_TOPIC, SERVED_TOPIC
from gpurec.serve.feed_settings import FeedSettings, open_existing
from gpurec.serve.model_metrics import MetricSpec, ModelMetrics
from gpurec.stream.join import CONSENT
from gpurec.stream.log import EventLog, Record, open_event_log
from gpurec.stream.records import INT64_MAX, INT64_MIN, ConsentChange, encode
from gpurec.stream.retention import default_retention_ms

CONSENT_TOPIC: Final = CONSENT

CONSENT_METRICS: Final = (
    MetricSpec("gpurec_consent_requests_total", "counter", "Consent change requests by outcome (ok, invalid, unavailable, failed)"),
    MetricSpec("gpurec_consent_changes_total", "counter", "Consent changes applied, by the flags after the change (on, off)"),
)


class ConsentRequestError(InvalidInput):
    """A bad consent change (no flag given, an unknown user, a negative time): INVALID_ARG."""


class ConsentUnavailable(GpurecError):
    """No store or log configured, or one of them failed: UNAVAILABLE, the caller may retry."""


class ConsentService:
    """Applies consent changes to the online store and the event log; thread-safe."""

    def __init__(self, settings: FeedSettings, metrics: ModelMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ModelMetrics()
        self._lock = threading.Lock()
        self._store: OnlineFeatureStore | None = None
        self._log: EventLog | None = None

    def apply(
        self,
        user_id: int,
        personalisation: bool | None = None,
        training: bool | None = None,
        ts_ms: int | None = None,
    ) -> ConsentChange:
        """Change the user's consent; returns the `ConsentChange` logged (their whole consent after it)."""
        change = self._counted(self._apply, user_id, personalisation, training, ts_ms)
        self.metrics.add(
            "gpurec_consent_changes_total",
            personalisation=_on_off(bool(change.personalisation)),
            training=_on_off(change.training),
        )
        return change

    def forget(self, user_id: int, ts_ms: int | None = None) -> ConsentChange:
        """The request step of an erasure (`gpurec.privacy.forget`): the store forgets the user (next
        request non-profiled and unlogged, the id deny-listed) and a `ConsentChange(forget=True)` goes
        on the `consent` topic (the joiner and the online trainer act on it). Idempotent; a user the
        store does not know is forgotten all the same (they may have been forgotten before)."""
        change = self._counted(self._forget, user_id, ts_ms)
        self.metrics.add("gpurec_consent_changes_total", personalisation="forgotten", training="forgotten")
        return change

    def _counted(self, change: Callable[..., ConsentChange], *args: object) -> ConsentChange:
        """Run one change, counting the request by its outcome (ok, invalid, unavailable, failed)."""
        try:
            result = change(*args)
        except ConsentRequestError:
            self.metrics.add("gpurec_consent_requests_total", outcome="invalid")
            raise
        except ConsentUnavailable:
            self.metrics.add("gpurec_consent_requests_total", outcome="unavailable")
            raise
        except Exception:
            self.metrics.add("gpurec_consent_requests_total", outcome="failed")
            raise
        self.metrics.add("gpurec_consent_requests_total", outcome="ok")
        return result

    def _forget(self, user_id: int, ts_ms: int | None) -> ConsentChange:
        user_id, ts_ms = self._checked(user_id, ts_ms)
        with self._lock:
            store = self._open_store()
            try:
                store.forget_user(user_id)
            except Exception as err:
                self._drop_store()
                raise ConsentUnavailable(f"consent: feature store: {type(err).__name__}: {err}") from err
            change = ConsentChange(user_id=user_id, training=False, ts_ms=ts_ms, personalisation=False, forget=True)
            self._append(user_id, change)
        return change

    def _checked(self, user_id: int, ts_ms: int | None) -> tuple[int, int]:
        try:
            user_id = operator.index(user_id) if not isinstance(user_id, bool) else None  # type: ignore[assignment]
        except TypeError:
            user_id = None  # type: ignore[assignment]
        if user_id is None or not INT64_MIN <= user_id <= INT64_MAX:
            raise ConsentRequestError(f"user_id must be a 64-bit integer, got {user_id!r}")
        ts_ms = int(time.time() * 1000) if ts_ms is None else int(ts_ms)
        if not 0 <= ts_ms <= INT64_MAX:
            raise ConsentRequestError(f"ts_ms must be an event time in epoch milliseconds (>= 0), got {ts_ms}")
        for setting, what in (("feature_store", "feature store"), ("event_log", "event log")):
            if not getattr(self.settings, setting):
                raise ConsentUnavailable(f"consent: no {what} configured (export or serve with --{setting.replace('_', '-')} URL)")
        return user_id, ts_ms

    def _append(self, user_id: int, change: ConsentChange) -> None:
        try:
            log = self._open_log()
            log.append(CONSENT_TOPIC, [Record(user_id, encode(change), change.ts_ms)])
        except Exception as err:
            self._drop_log()
            raise ConsentUnavailable(
                f"consent: the profile is changed but the event log failed ({type(err).__name__}: {err}); retry"
            ) from err

    def _apply(
        self, user_id: int, personalisation: bool | None, training: bool | None, ts_ms: int | None
    ) -> ConsentChange:
        if personalisation is None and training is None:
            raise ConsentRequestError("give personalisation, training or both")
        user_id, ts_ms = self._checked(user_id, ts_ms)
        with self._lock:  # one change at a time per instance: the store and log clients are shared
            store = self._open_store()
            try:
                flags = store.set_consent(user_id, personalisation=personalisation, training=training)
            except InvalidInput as err:
                raise ConsentRequestError(str(err)) from err
            except Exception as err:
                self._drop_store()
                raise ConsentUnavailable(f"consent: feature store: {type(err).__name__}: {err}") from err
            if flags is None:
                raise ConsentRequestError(f"unknown user {user_id}: the feature store has no profile of them")
            change = ConsentChange(user_id=user_id, training=flags[1], ts_ms=ts_ms, personalisation=flags[0])
            self._append(user_id, change)
        return change

    def _open_store(self) -> OnlineFeatureStore:
        if self._store is None:
            try:
                self._store = open_existing(self.settings.feature_store, "feature store", open_feature_store)  # type: ignore[assignment]
            except Exception as err:
                raise ConsentUnavailable(f"consent: feature store: {type(err).__name__}: {err}") from err
        assert self._store is not None
        return self._store

    def _open_log(self) -> EventLog:
        if self._log is None:
            log = open_existing(self.settings.event_log, "event log", open_event_log)
            try:
                create_consent_topic(log, self.settings.served_partitions)  # type: ignore[arg-type]
            except Exception:
                with contextlib.suppress(Exception):
                    log.close()  # type: ignore[union-attr]
                raise
            self._log = log  # type: ignore[assignment]
        assert self._log is not None
        return self._log

    def _drop_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    def _drop_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            with contextlib.suppress(Exception):
                log.close()

    def close(self) -> None:
        with self._lock:
            self._drop_store()
            self._drop_log()


def create_consent_topic(log: EventLog, default_partitions: int) -> None:
    """`consent` partitioned like `served` / `actions` (a user's records meet in one partition
    number), or `default_partitions` when neither exists yet. A joiner follows `consent` when the
    topic exists at its start: created here on the first change, a running joiner picks it up at its
    next restart (rows served after a change carry the new training consent either way)."""
    topics = log.topics()
    if CONSENT_TOPIC in topics:
        return
    partitions = next((log.partitions(t) for t in (SERVED_TOPIC, ACTIONS_TOPIC) if t in topics), default_partitions)
    with contextlib.suppress(InvalidInput):  # another instance created it meanwhile
        log.create_topic(CONSENT_TOPIC, partitions, retention_ms=default_retention_ms(log, CONSENT_TOPIC), exist_ok=True)


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"


__all__ = [
    "CONSENT_METRICS",
    "CONSENT_TOPIC",
    "ConsentRequestError",
    "ConsentService",
    "ConsentUnavailable",
    "create_consent_topic",
]
