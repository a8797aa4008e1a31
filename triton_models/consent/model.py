"""Triton python-backend model `consent`: one user's consent change, effective at their next request.

The logic lives in `gpurec.serve.consent.ConsentService` (the profile in the online feature store,
then a `ConsentChange` on the event log's `consent` topic); this file maps Triton requests onto it.
Inputs: `user_id` INT64 [1]; `personalisation` BOOL [1] and `training` BOOL [1], each optional
(a flag left out keeps its value; at least one); optional `ts_ms` INT64 [1] (event time; default
now); optional `forget` BOOL [1]: true erases the user (`ConsentService.forget`; the flags are ignored). Outputs: `personalisation`, `training` (the consent after the change), `ts_ms`. A bad request
or an unknown user gets INVALID_ARG; no store or log, or one failing, UNAVAILABLE (the change is
idempotent: retry). Where the store and the log are: `consent/config.pbtxt` parameters (export
writes the feed's), overridden by GPUREC_FEATURE_STORE / GPUREC_EVENT_LOG.

Metrics (`gpurec_consent_requests_total{outcome}`, `gpurec_consent_changes_total{personalisation,
training}`) are flushed after each request: consent changes are rare, so the IPC round trip is too.
"""

from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.service = None
        self.broken = ""
        try:
            from gpurec.serve.consent import (
                CONSENT_METRICS,
                ConsentRequestError,
                ConsentService,
                ConsentUnavailable,
            )
            from gpurec.serve.feed_settings import FeedSettings
            from gpurec.serve.model_metrics import ModelMetrics, TritonMetrics
        except ImportError as err:
            self.broken = f"consent needs gpurec and its serving dependencies in the server's Python: {err}"
            pb_utils.Logger.log_error(self.broken)
            return
        self.errors = {
            ConsentRequestError: pb_utils.TritonError.INVALID_ARG,
            ConsentUnavailable: pb_utils.TritonError.UNAVAILABLE,
        }
        try:
            settings = FeedSettings.from_model_config(args["model_config"], os.environ)
        except Exception as err:
            self.broken = f"misconfigured: {err}"
            pb_utils.Logger.log_error(self.broken)
            return
        self.metrics = TritonMetrics(pb_utils, CONSENT_METRICS, {"model": args["model_name"], "version": args["model_version"]})
        self.service = ConsentService(settings, ModelMetrics())

    def execute(self, requests: list) -> list:
        responses = [self._respond(request) for request in requests]
        if self.service is not None:
            try:
                self.metrics.flush(self.service.metrics)
            except Exception as err:  # metrics must never fail a change
                pb_utils.Logger.log_warn(f"consent: metrics flush failed: {err}")
        return responses

    def _respond(self, request) -> pb_utils.InferenceResponse:
        if self.service is None:
            return _error(f"consent: {self.broken}", pb_utils.TritonError.UNAVAILABLE)
        try:
            user_id = _scalar(request, "user_id", required=True)
            personalisation, training = (_scalar(request, name) for name in ("personalisation", "training"))
            ts_ms = _scalar(request, "ts_ms")
            forget = _scalar(request, "forget")
            if forget is not None and bool(forget):
                change = self.service.forget(int(user_id), None if ts_ms is None else int(ts_ms))
            else:
                change = self.service.apply(
                    int(user_id),
                    None if personalisation is None else bool(personalisation),
                    None if training is None else bool(training),
                    None if ts_ms is None else int(ts_ms),
                )
        except Exception as err:
            code = next((c for kind, c in self.errors.items() if isinstance(err, kind)), pb_utils.TritonError.INTERNAL)
            if code == pb_utils.TritonError.INTERNAL:
                pb_utils.Logger.log_error(f"consent: request failed: {type(err).__name__}: {err}")
            return _error(f"consent: {err}" if not str(err).startswith("consent:") else str(err), code)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("personalisation", np.array([bool(change.personalisation)], dtype=np.bool_)),
                pb_utils.Tensor("training", np.array([change.training], dtype=np.bool_)),
                pb_utils.Tensor("ts_ms", np.array([change.ts_ms], dtype=np.int64)),
            ]
        )

    def finalize(self) -> None:
        if self.service is not None:
            self.service.close()
            self.metrics.close()


def _scalar(request, name: str, required: bool = False):
    from gpurec.serve.consent import ConsentRequestError

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ConsentRequestError(f"missing input {name!r}")
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.shape != (1,):
        raise ConsentRequestError(f"input {name!r} must hold one value, got {values.shape[0]}")
    return values[0]


def _error(message: str, code) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
