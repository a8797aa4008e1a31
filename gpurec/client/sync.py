"""`RankerClient`: the blocking client, over HTTP or gRPC.

    with RankerClient("127.0.0.1:8000", contract="runs/demo/repo") as client:
        scores = client.rank(user, candidates)            # RankResult: .tasks["like"], .score
        top = client.recommend(user, 5, candidates)       # Recommendation: .item_ids, .scores
        feed = client.feed(user_id=7, n=6)                # FeedResult: .item_ids, .scores, .request_id

`rank_many` / `recommend_many` send many users' requests concurrently (up to `max_concurrency`
in flight, through tritonclient's own async_infer), so the server's dynamic batcher can merge them.
Use it as a context manager or call `close()`: Triton's shutdown waits on idle keep-alive HTTP
connections, so a client left open holds a stopping server for its whole drain timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from gpurec.client import _transport as tr
from gpurec.client.base import RankerClientBase
from gpurec.client.errors import ClientError, ServerUnavailable
from gpurec.client.features import (
    ConsentResult,
    Features,
    FeedRequest,
    FeedResult,
    RankRequest,
    RankResult,
    Recommendation,
    RecommendRequest,
    build_rows,
    check_consent,
    check_feed,
    check_forget,
)
from gpurec.serve.contract import DENSE_INPUT

T = TypeVar("T")


class RankerClient(RankerClientBase):
    """Blocking client of the `ranker` and `recommend` models of one Triton server.

    `contract` is what the model was exported with (a `ServingContract`, its `contract.json`, a
    version directory or the model repository): requests are checked against it before sending.
    `timeout` bounds each call in seconds; a call that cannot reach the server is retried
    `retries` times with exponential backoff (`backoff`, doubling) before `ServerUnavailable`.

    One client per thread: tritonclient's HTTP client runs on gevent and works only on the thread
    that created it (use `rank_many`, or `AsyncRankerClient`, for concurrency from one thread).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # arguments: RankerClientBase
        super().__init__(*args, **kwargs)
        self._client = self._connect()

    def _connect(self) -> Any:
        if self.protocol == "http":
            return self._tensors.InferenceServerClient(
                self.url, concurrency=self.max_concurrency, connection_timeout=self.timeout, network_timeout=self.timeout
            )
        return self._tensors.InferenceServerClient(self.url)

    # ---- one user ---------------------------------------------------------------------------

    def rank(self, user: Features | None, candidates: Features) -> RankResult:
        """Per-task probabilities and the combined score of each candidate, in candidate order."""
        rows = build_rows(self.contract, user, candidates)
        result = self._with_retries(self.ranker_model, lambda: self._infer(self.ranker_model, rows, self._rank_outputs()))
        return tr.parse_rank(result, self.contract, rows[DENSE_INPUT].shape[0])

    def recommend(
        self, user: Features | None, k: int, candidates: Features, item_ids: Sequence[int] | np.ndarray | None = None
    ) -> Recommendation:
        """The top `k` candidates by combined score, best first (all of them, ranked, if k > N)."""
        arrays = self._recommend_arrays(RecommendRequest(user or {}, candidates, k, item_ids))
        result = self._with_retries(
            self.recommend_model, lambda: self._infer(self.recommend_model, arrays, tr.recommend_outputs(self._tensors))
        )
        return tr.parse_recommend(result)

    def feed(self, user_id: int, n: int, ts_ms: int | None = None, request_id: int | None = None) -> FeedResult:
        """The user's live feed from the `feed` model: n item ids with scores, best first.

        The server picks the candidates, reads their features, ranks them and logs what it shows;
        `ts_ms` is the request's event time (default: the server's clock), `request_id` the id the
        served rows are logged under (default: the server's). An unknown user gets a cold-start feed.
        """
        arrays = check_feed(FeedRequest(self._at_edge(user_id), n, ts_ms, request_id))
        result = self._with_retries(self.feed_model, lambda: self._infer(self.feed_model, arrays, tr.feed_outputs(self._tensors)))
        return tr.parse_feed(result)

    def set_consent(
        self, user_id: int, personalisation: bool | None = None, training: bool | None = None, ts_ms: int | None = None
    ) -> ConsentResult:
        """Change a user's consent (None: keep that flag), effective at their next feed request.

        Without personalisation consent the feed ranks without their profile (popular items of their
        region and language); without training consent nothing they are shown becomes a training
        example. `ts_ms` is the change's event time (default: the server's clock). Idempotent, so a
        retry after `ServerUnavailable` is safe; an unknown user raises `InvalidRequest`.
        """
        arrays = check_consent(self._at_edge(user_id), personalisation, training, ts_ms)
        result = self._with_retries(
            self.consent_model, lambda: self._infer(self.consent_model, arrays, tr.consent_outputs(self._tensors))
        )
        return tr.parse_consent(result, user_id)

    def forget(self, user_id: int, ts_ms: int | None = None) -> ConsentResult:
        """Erase a user (GDPR Art. 17), the request step: their next feed request is non-profiled and
        not logged, their profile is deleted and their id deny-listed, and the online trainer resets
        their embedding row within one sync interval. The purge of every stored artifact is
        `gpurec forget --workspace`. Idempotent: a retry after `ServerUnavailable` is safe."""
        arrays = check_forget(self._at_edge(user_id), ts_ms)
        result = self._with_retries(
            self.consent_model, lambda: self._infer(self.consent_model, arrays, tr.consent_outputs(self._tensors))
        )
        return tr.parse_consent(result, user_id)

    # ---- many users, concurrently -------------------------------------------------------------

    def rank_many(self, requests: Sequence[RankRequest | tuple[Features, Features]]) -> list[RankResult]:
        """`rank` for many users at once, results in request order; the first failure is raised."""
        prepared = [build_rows(self.contract, *_pair(r)) for r in requests]
        results = self._infer_many(self.ranker_model, prepared, self._rank_outputs)
        return [tr.parse_rank(res, self.contract, rows[DENSE_INPUT].shape[0]) for res, rows in zip(results, prepared, strict=True)]

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[Recommendation]:
        """`recommend` for many users at once, results in request order; the first failure is raised."""
        prepared = [self._recommend_arrays(r) for r in requests]
        results = self._infer_many(self.recommend_model, prepared, lambda: tr.recommend_outputs(self._tensors))
        return [tr.parse_recommend(res) for res in results]

    def feed_many(self, requests: Sequence[FeedRequest]) -> list[FeedResult]:
        """`feed` for many users at once, results in request order; the first failure is raised."""
        prepared = [check_feed(r) for r in requests]
        results = self._infer_many(self.feed_model, prepared, lambda: tr.feed_outputs(self._tensors))
        return [tr.parse_feed(res) for res in results]

    # ---- server state -------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """True when the server and the ranker answer ready (never raises)."""
        try:
            return bool(self._client.is_server_ready()) and bool(self._client.is_model_ready(self.ranker_model, self.model_version))
        except Exception:
            return False

    def close(self) -> None:
        """Close the connections (idempotent); the server can then shut down without waiting on us."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> RankerClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------

    def _live(self) -> Any:
        if self._client is None:
            raise ClientError(f"{self!r} is closed")
        return self._client

    def _infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list) -> Any:
        inputs = tr.make_inputs(self._tensors, arrays)
        try:
            if self.protocol == "http":
                return self._live().infer(model, inputs, model_version=self.model_version, outputs=outputs)
            return self._live().infer(model, inputs, model_version=self.model_version, outputs=outputs, client_timeout=self.timeout)
        except ClientError:
            raise
        except Exception as err:
            raise tr.translate(err, model, self.url, self.protocol) from err

    def _with_retries(self, model: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        for attempt in range(self.retry.retries + 1):
            try:
                return call()
            except ServerUnavailable as err:
                if attempt == self.retry.retries:
                    raise ServerUnavailable(
                        f"{err} (gave up on {model!r} after {attempt + 1} attempts in {time.monotonic() - started:.1f} s)"
                    ) from err.__cause__
                time.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")

    def _infer_many(self, model: str, prepared: list[dict[str, np.ndarray]], outputs: Callable[[], list]) -> list[Any]:
        """Send every request without waiting for the previous ones; retry the unreachable ones one by one."""
        if not prepared:
            return []
        results: list[Any] = [None] * len(prepared)
        errors: list[BaseException | None] = [None] * len(prepared)
        if self.protocol == "http":
            pending = []
            for i, arrays in enumerate(prepared):
                try:
                    pending.append((i, self._live().async_infer(model, tr.make_inputs(self._tensors, arrays), model_version=self.model_version, outputs=outputs())))
                except Exception as err:
                    errors[i] = err
            for i, handle in pending:
                try:
                    results[i] = handle.get_result()
                except Exception as err:
                    errors[i] = err
        else:
            slots = threading.BoundedSemaphore(self.max_concurrency)
            done = [threading.Event() for _ in prepared]

            def callback(i: int, result: Any, error: BaseException | None) -> None:
                results[i], errors[i] = result, error
                slots.release()
                done[i].set()

            for i, arrays in enumerate(prepared):
                slots.acquire()
                try:
                    self._live().async_infer(
                        model,
                        tr.make_inputs(self._tensors, arrays),
                        callback=lambda result, error, i=i: callback(i, result, error),
                        model_version=self.model_version,
                        outputs=outputs(),
                        client_timeout=self.timeout,
                    )
                except Exception as err:
                    callback(i, None, err)
            for event in done:
                event.wait()
        for i, error in enumerate(errors):
            if error is None:
                continue
            typed = error if isinstance(error, ClientError) else tr.translate(error, model, self.url, self.protocol)
            if typed is error:
                raise typed
            if not isinstance(typed, ServerUnavailable):
                raise typed from error
            arrays = prepared[i]
            results[i] = self._with_retries(model, lambda arrays=arrays: self._infer(model, arrays, outputs()))
        return results


def _pair(request: RankRequest | tuple[Features, Features]) -> tuple[Features, Features]:
    if isinstance(request, RankRequest):
        return request.user, request.candidates
    user, candidates = request
    return user, candidates
