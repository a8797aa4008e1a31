"""`AsyncRankerClient`: the asyncio client, over HTTP (aiohttp) or gRPC (grpc.aio).

    async with AsyncRankerClient("127.0.0.1:8001", contract=repo, protocol="grpc") as client:
        results = await client.rank_many([(user, candidates), ...])

Same requests, results, errors and retry policy as `RankerClient`; many users are sent with
`asyncio.gather`, at most `max_concurrency` in flight. Close it (or use `async with`): an open
HTTP session holds a stopping Triton server for its drain timeout.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Sequence
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


class AsyncRankerClient(RankerClientBase):
    """Asyncio client of the `ranker` and `recommend` models; arguments as for `RankerClient`.

    The transport is created on first use: aiohttp wants a running event loop.
    """

    def _live(self) -> Any:
        if self._client is None:
            aio = importlib.import_module(f"tritonclient.{self.protocol}.aio")
            if self.protocol == "http":
                self._client = aio.InferenceServerClient(self.url, conn_limit=self.max_concurrency, conn_timeout=self.timeout)
            else:
                self._client = aio.InferenceServerClient(self.url)
        return self._client

    async def rank(self, user: Features | None, candidates: Features) -> RankResult:
        """Per-task probabilities and the combined score of each candidate, in candidate order."""
        rows = build_rows(self.contract, user, candidates)
        result = await self._with_retries(self.ranker_model, lambda: self._infer(self.ranker_model, rows, self._rank_outputs()))
        return tr.parse_rank(result, self.contract, rows[DENSE_INPUT].shape[0])

    async def recommend(
        self, user: Features | None, k: int, candidates: Features, item_ids: Sequence[int] | np.ndarray | None = None
    ) -> Recommendation:
        """The top `k` candidates by combined score, best first."""
        arrays = self._recommend_arrays(RecommendRequest(user or {}, candidates, k, item_ids))
        result = await self._with_retries(
            self.recommend_model, lambda: self._infer(self.recommend_model, arrays, tr.recommend_outputs(self._tensors))
        )
        return tr.parse_recommend(result)

    async def feed(self, user_id: int, n: int, ts_ms: int | None = None, request_id: int | None = None) -> FeedResult:
        """The user's live feed from the `feed` model (see `RankerClient.feed`)."""
        arrays = check_feed(FeedRequest(self._at_edge(user_id), n, ts_ms, request_id))
        result = await self._with_retries(
            self.feed_model, lambda: self._infer(self.feed_model, arrays, tr.feed_outputs(self._tensors))
        )
        return tr.parse_feed(result)

    async def set_consent(
        self, user_id: int, personalisation: bool | None = None, training: bool | None = None, ts_ms: int | None = None
    ) -> ConsentResult:
        """Change a user's consent, effective at their next feed request (see `RankerClient.set_consent`)."""
        arrays = check_consent(self._at_edge(user_id), personalisation, training, ts_ms)
        result = await self._with_retries(
            self.consent_model, lambda: self._infer(self.consent_model, arrays, tr.consent_outputs(self._tensors))
        )
        return tr.parse_consent(result, user_id)

    async def forget(self, user_id: int, ts_ms: int | None = None) -> ConsentResult:
        """Erase a user, the request step (see `RankerClient.forget`)."""
        arrays = check_forget(self._at_edge(user_id), ts_ms)
        result = await self._with_retries(
            self.consent_model, lambda: self._infer(self.consent_model, arrays, tr.consent_outputs(self._tensors))
        )
        return tr.parse_consent(result, user_id)

    async def feed_many(self, requests: Sequence[FeedRequest]) -> list[FeedResult]:
        """`feed` for many users concurrently, results in request order; the first failure is raised."""
        for request in requests:
            check_feed(request)
        return await self._gather([self.feed(r.user_id, r.n, r.ts_ms, r.request_id) for r in requests])

    async def rank_many(self, requests: Sequence[RankRequest | tuple[Features, Features]]) -> list[RankResult]:
        """`rank` for many users concurrently, results in request order; the first failure is raised."""
        pairs = [(r.user, r.candidates) if isinstance(r, RankRequest) else r for r in requests]
        for user, candidates in pairs:  # every request is checked before any is sent
            build_rows(self.contract, user, candidates)
        return await self._gather([self.rank(user, candidates) for user, candidates in pairs])

    async def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[Recommendation]:
        """`recommend` for many users concurrently, results in request order; the first failure is raised."""
        for request in requests:
            self._recommend_arrays(request)
        return await self._gather([self.recommend(r.user, r.k, r.candidates, r.item_ids) for r in requests])

    async def is_ready(self) -> bool:
        """True when the server and the ranker answer ready (never raises)."""
        try:
            client = self._live()
            return bool(await client.is_server_ready()) and bool(await client.is_model_ready(self.ranker_model, self.model_version))
        except Exception:
            return False

    async def close(self) -> None:
        """Close the session/channel (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> AsyncRankerClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # ---- internals ----------------------------------------------------------------------------

    async def _gather(self, calls: list[Awaitable[T]]) -> list[T]:
        slots = asyncio.Semaphore(self.max_concurrency)

        async def bounded(call: Awaitable[T]) -> T:
            async with slots:
                return await call

        return list(await asyncio.gather(*(bounded(c) for c in calls)))

    async def _infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list) -> Any:
        inputs = tr.make_inputs(self._tensors, arrays)
        try:
            client = self._live()
            if self.protocol == "http":
                call = client.infer(model, inputs, model_version=self.model_version, outputs=outputs)
                return await asyncio.wait_for(call, self.timeout)
            return await client.infer(model, inputs, model_version=self.model_version, outputs=outputs, client_timeout=self.timeout)
        except ClientError:
            raise
        except Exception as err:
            raise tr.translate(err, model, self.url, self.protocol) from err

    async def _with_retries(self, model: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.monotonic()
        for attempt in range(self.retry.retries + 1):
            try:
                return await call()
            except ServerUnavailable as err:
                if attempt == self.retry.retries:
                    raise ServerUnavailable(
                        f"{err} (gave up on {model!r} after {attempt + 1} attempts in {time.monotonic() - started:.1f} s)"
                    ) from err.__cause__
                await asyncio.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")
