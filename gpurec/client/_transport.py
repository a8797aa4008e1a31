"""What the sync and asyncio clients share: tensors for each protocol, results, error translation, retries.

tritonclient reports failures in several shapes: `InferenceServerException` with a status string
(HTTP code or gRPC status), raw socket/gevent errors from the HTTP client, aiohttp errors from the
asyncio HTTP client, `grpc.RpcError`s. `translate` maps all of them onto the four typed errors
of `gpurec.client.errors` and keeps the original as the cause. Only `ServerUnavailable` is retried:
an invalid request or an unknown model would fail the same way again.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np

from gpurec.client.errors import (
    ClientError,
    InvalidRequest,
    NonFiniteInput,
    NonFiniteOutput,
    ServerError,
    ServerUnavailable,
    UnknownModel,
)
from gpurec.client.features import ConsentResult, FeedResult, RankResult, Recommendation
from gpurec.serve.contract import (
    CANDIDATE_IDS_INPUT,
    K_INPUT,
    SCORE_OUTPUT,
    TOPK_IDS_OUTPUT,
    TOPK_INDICES_OUTPUT,
    TOPK_SCORES_OUTPUT,
    ServingContract,
)
from gpurec.serve.feed_contract import (
    ITEM_IDS_OUTPUT,
    MODEL_VERSION_OUTPUT,
    PERSONALISATION,
    REQUEST_ID_OUTPUT,
    SCORES_OUTPUT,
    TRAINING,
    TS_INPUT,
)

Protocol = Literal["http", "grpc"]
_TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL"}
# Substrings of server/transport messages that mean "not reachable now" (worth a retry).
_UNAVAILABLE = (
    "unavailable",
    "deadline exceeded",
    "failed to connect",
    "connection refused",
    "connect call failed",
    "timed out",
    "timeout",
    "connection reset",
    "broken pipe",
    "server disconnected",
    "socket closed",
    "cannot connect",
)
_UNKNOWN_MODEL = ("unknown model", "is not found", "not found", "unavailable model", "is not ready")


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first, sleeping `backoff * 2**i` (capped) before retry i."""

    retries: int = 2
    backoff: float = 0.1
    max_backoff: float = 2.0

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2**attempt))


def check_protocol(protocol: str) -> Protocol:
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return protocol  # type: ignore[return-value]


def check_url(url: str) -> str:
    """tritonclient wants host:port without a scheme; accept http:// and grpc:// too."""
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    return url.rstrip("/")


def tensors_module(protocol: Protocol) -> ModuleType:
    """`tritonclient.http` or `tritonclient.grpc` (InferInput / InferRequestedOutput live there)."""
    return importlib.import_module(f"tritonclient.{protocol}")


def make_inputs(module: ModuleType, arrays: Mapping[str, np.ndarray]) -> list:
    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), _TRITON_DTYPES[array.dtype])
        tensor.set_data_from_numpy(np.ascontiguousarray(array))
        inputs.append(tensor)
    return inputs


def rank_outputs(module: ModuleType, contract: ServingContract) -> list:
    return [module.InferRequestedOutput(name) for name in (*contract.tasks, SCORE_OUTPUT)]


def recommend_arrays(rows: Mapping[str, np.ndarray], ids: np.ndarray, k: int) -> dict[str, np.ndarray]:
    return {**rows, CANDIDATE_IDS_INPUT: ids, K_INPUT: np.array([k], dtype=np.int32)}


def recommend_outputs(module: ModuleType) -> list:
    return [module.InferRequestedOutput(n) for n in (TOPK_IDS_OUTPUT, TOPK_SCORES_OUTPUT, TOPK_INDICES_OUTPUT)]


def feed_outputs(module: ModuleType) -> list:
    return [module.InferRequestedOutput(n) for n in (ITEM_IDS_OUTPUT, SCORES_OUTPUT, REQUEST_ID_OUTPUT, MODEL_VERSION_OUTPUT)]


def parse_feed(result: Any) -> FeedResult:
    item_ids = _output(result, ITEM_IDS_OUTPUT).reshape(-1)
    scores = _output(result, SCORES_OUTPUT).reshape(-1)
    if item_ids.shape != scores.shape:
        raise ServerError(f"the feed returned {item_ids.shape[0]} item ids with {scores.shape[0]} scores")
    version = _output(result, MODEL_VERSION_OUTPUT).reshape(-1)[0]
    return FeedResult(
        request_id=int(_output(result, REQUEST_ID_OUTPUT).reshape(-1)[0]),
        item_ids=item_ids.astype(np.int64),
        scores=scores.astype(np.float32),
        model_version=version.decode() if isinstance(version, bytes) else str(version),
    )


def consent_outputs(module: ModuleType) -> list:
    return [module.InferRequestedOutput(n) for n in (PERSONALISATION, TRAINING, TS_INPUT)]


def parse_consent(result: Any, user_id: int) -> ConsentResult:
    return ConsentResult(
        user_id=int(user_id),
        personalisation=bool(_output(result, PERSONALISATION).reshape(-1)[0]),
        training=bool(_output(result, TRAINING).reshape(-1)[0]),
        ts_ms=int(_output(result, TS_INPUT).reshape(-1)[0]),
    )


def parse_rank(result: Any, contract: ServingContract, rows: int) -> RankResult:
    out = {name: _output(result, name).reshape(-1) for name in (*contract.tasks, SCORE_OUTPUT)}
    if any(v.shape[0] != rows for v in out.values()):
        raise ServerError(f"the server returned {[v.shape[0] for v in out.values()]} scores for {rows} candidates")
    score = out.pop(SCORE_OUTPUT)
    return RankResult(tasks=out, score=score)


def parse_recommend(result: Any) -> Recommendation:
    return Recommendation(
        item_ids=_output(result, TOPK_IDS_OUTPUT).reshape(-1),
        scores=_output(result, TOPK_SCORES_OUTPUT).reshape(-1),
        indices=_output(result, TOPK_INDICES_OUTPUT).reshape(-1),
    )


def _output(result: Any, name: str) -> np.ndarray:
    array = result.as_numpy(name)
    if array is None:
        raise ServerError(f"the server's response has no output {name!r}")
    return array


def translate(err: BaseException, model: str, url: str, protocol: str) -> ClientError:
    """The typed error for any failure of one call (the caller chains `err` as the cause)."""
    if isinstance(err, ClientError):
        return err
    where = f"{protocol}://{url}"
    text = _message(err)
    lowered = text.lower()
    status = _status(err).lower()
    if isinstance(err, TimeoutError | asyncio.TimeoutError | ConnectionError | OSError) or _is_transport(err):
        return ServerUnavailable(f"Triton server at {where} is unreachable: {type(err).__name__}: {text or 'no details'}")
    if any(s in status for s in ("unavailable", "deadline_exceeded")) or (
        not status.startswith("4") and any(s in lowered for s in _UNAVAILABLE) and "ranker:" not in lowered
    ):
        return ServerUnavailable(f"Triton server at {where} is unreachable: {text}")
    # The models' own kinds (`ranker: non_finite_output: ...`), also when relayed by recommend or feed.
    if "non_finite_output" in lowered:
        return NonFiniteOutput(f"model {model!r} on {where} refused to return NaN/inf scores: {text}")
    if "non_finite_input" in lowered:
        return NonFiniteInput(f"the server refused the request to {model!r}: {text}")
    if (any(s in lowered for s in _UNKNOWN_MODEL) and model in text) or "not_found" in status:
        return UnknownModel(f"model {model!r} is not available on the Triton server at {where}: {text}")
    if status == "503":  # the model answered UNAVAILABLE (the feed has no candidates yet)
        return ServerUnavailable(f"model {model!r} on {where} cannot answer now: {text}")
    if status == "400" or "invalid_argument" in status or "unexpected shape" in lowered or "unexpected datatype" in lowered:
        return InvalidRequest(f"the server refused the request to {model!r}: {text}")
    return ServerError(f"model {model!r} on {where} failed: {text or type(err).__name__}")


def _accessor(err: BaseException, name: str, fallback: str) -> str:
    """tritonclient exceptions expose `message()` / `status()` methods; other errors do not."""
    method = getattr(err, name, None)
    if callable(method):
        try:
            return str(method() or "")
        except Exception:
            return fallback
    return fallback


def _message(err: BaseException) -> str:
    return _accessor(err, "message", str(err))


def _status(err: BaseException) -> str:
    return _accessor(err, "status", "")


def _is_transport(err: BaseException) -> bool:
    """aiohttp / grpc / gevent errors that mean the connection failed, without importing those packages."""
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(err).__mro__}
    return bool(
        names
        & {
            "aiohttp.ClientConnectionError",
            "aiohttp.ServerTimeoutError",
            "aiohttp.ServerDisconnectedError",
            "gevent.Timeout",
            "grpc.RpcError",
        }
    )
