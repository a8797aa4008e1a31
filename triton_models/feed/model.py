"""Triton python-backend model `feed`: one user's live feed, end to end, as a BLS model.

    candidates (followed from the event log) -> features (online store, timeout -> defaults)
    -> `ranker` of the same version (a BLS request; its dynamic batcher merges concurrent users)
    -> top n -> one ServedRow per shown item to the event log's `served` topic -> respond

The logic lives in `gpurec.serve.feed.FeedService` (this model imports gpurec: it needs the store
and log clients); this file maps Triton requests onto it. Inputs: `user_id` INT64 [1], `n` INT32
[1], optional `ts_ms` INT64 [1] (event time; default now) and `request_id` INT64 [1] (default:
generated). Outputs: `item_ids` INT64 [n'], `scores` FP32 [n'], `request_id` INT64 [1],
`model_version` BYTES [1]. A bad request gets INVALID_ARG, a feed that cannot answer yet (no
store or log configured, no candidates) UNAVAILABLE, a ranker failure INTERNAL; nothing raised
here takes the server down. Where the store and the log are: `feed/config.pbtxt` parameters,
overridden by GPUREC_FEATURE_STORE / GPUREC_EVENT_LOG in the server's environment
(`gpurec.serve.feed_settings`).

Metrics (Prometheus, on Triton's metrics port) are buffered by the service and flushed every
`METRICS_FLUSH_S` by a background thread: a metric update is an IPC round trip to the server.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

METRICS_FLUSH_S = 0.5


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.version = args["model_version"]
        self.service = None
        self.broken = ""
        try:  # a server image without gpurec still serves the other models; feed answers why not
            from gpurec.serve.contract import ServingContract
            from gpurec.serve.feed import (
                METRICS,
                FeedRequestError,
                FeedService,
                FeedUnavailable,
                RankerFailed,
            )
            from gpurec.serve.feed_settings import FeedSettings
            from gpurec.serve.model_metrics import ModelMetrics, TritonMetrics
        except ImportError as err:
            self.broken = f"feed needs gpurec and its serving dependencies in the server's Python: {err}"
            pb_utils.Logger.log_error(self.broken)
            return
        self.errors = {
            FeedRequestError: pb_utils.TritonError.INVALID_ARG,
            FeedUnavailable: pb_utils.TritonError.UNAVAILABLE,
            RankerFailed: pb_utils.TritonError.INTERNAL,
        }
        try:  # a bad parameter fails this model's requests, not the whole server's start
            settings = FeedSettings.from_model_config(args["model_config"], os.environ)
            contract = ServingContract.load(Path(args["model_repository"]) / self.version)
            service = FeedService(settings, contract, self.version, ModelMetrics(), instance=args["model_instance_name"])
        except Exception as err:
            self.broken = f"version {self.version} is misconfigured: {err}"
            pb_utils.Logger.log_error(self.broken)
            return
        self.metrics = TritonMetrics(pb_utils, METRICS, {"model": args["model_name"], "version": self.version})
        self.service = service.start()
        pb_utils.Logger.log_info(
            f"feed {self.version}: store {settings.feature_store or '(none)'}, log {settings.event_log or '(none)'}, "
            f"{self.service.source.counts['items']} items read"
        )
        self.stop_flushing = threading.Event()
        self.flusher = threading.Thread(target=self._flush_metrics_loop, name="gpurec-feed-metrics", daemon=True)
        self.flusher.start()

    def execute(self, requests: list) -> list:
        return [self._respond(request) for request in requests]

    def _respond(self, request) -> pb_utils.InferenceResponse:
        if self.service is None:
            return _error(f"feed: {self.broken}", pb_utils.TritonError.UNAVAILABLE)
        try:
            user_id, n, ts_ms, request_id = self._read_inputs(request)
            answer = self.service.serve(user_id, n, self._rank, ts_ms=ts_ms, request_id=request_id)
        except Exception as err:
            code = next((c for kind, c in self.errors.items() if isinstance(err, kind)), pb_utils.TritonError.INTERNAL)
            if code == pb_utils.TritonError.INTERNAL:  # a bug or a failing ranker: the server log keeps it
                pb_utils.Logger.log_error(f"feed: request failed: {type(err).__name__}: {err}")
            return _error(f"feed: {err}" if not str(err).startswith("feed:") else str(err), code)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("item_ids", answer.item_ids.astype(np.int64)),
                pb_utils.Tensor("scores", answer.scores.astype(np.float32)),
                pb_utils.Tensor("request_id", np.array([answer.request_id], dtype=np.int64)),
                pb_utils.Tensor("model_version", np.array([answer.model_version.encode()], dtype=np.object_)),
            ]
        )

    def _read_inputs(self, request) -> tuple[int, int, int | None, int | None]:
        from gpurec.serve.feed import FeedRequestError

        def scalar(name: str, required: bool) -> int | None:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                if required:
                    raise FeedRequestError(f"missing input {name!r}")
                return None
            values = tensor.as_numpy().reshape(-1)
            if values.shape != (1,):
                raise FeedRequestError(f"input {name!r} must hold one value, got {values.shape[0]}")
            return int(values[0])

        user_id, n = scalar("user_id", True), scalar("n", True)
        assert user_id is not None and n is not None
        return user_id, n, scalar("ts_ms", False), scalar("request_id", False)

    def _rank(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        from gpurec.serve.feed import RankerFailed

        ranked = pb_utils.InferenceRequest(
            model_name="ranker",
            model_version=int(self.version),
            requested_output_names=["score"],
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
        ).exec()
        if ranked.has_error():  # rows the feed built itself: a refusal is the feed's failure
            raise RankerFailed.from_ranker(ranked.error().message())
        return pb_utils.get_output_tensor_by_name(ranked, "score").as_numpy().reshape(-1)

    # ---- metrics ------------------------------------------------------------------------------

    def _flush_metrics(self) -> None:
        self.service.update_gauges()
        self.metrics.flush(self.service.metrics)

    def _flush_metrics_loop(self) -> None:
        while not self.stop_flushing.wait(METRICS_FLUSH_S):
            try:
                self._flush_metrics()
            except Exception as err:  # metrics must never take the model down
                pb_utils.Logger.log_warn(f"feed: metrics flush failed: {err}")

    def finalize(self) -> None:
        if self.service is None:
            return
        self.stop_flushing.set()
        self.flusher.join(5)
        self.service.close()  # writes the served rows still queued
        with contextlib.suppress(Exception):
            self._flush_metrics()
        self.metrics.close()


def _error(message: str, code) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
