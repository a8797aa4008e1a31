"""Triton python-backend model `ranker`: scores candidate rows with the exported TorchScript ranker.

`gpurec export` copies this file into `REPO/ranker/<version>/` next to `model.pt` (remap + DLRM
+ combined score, see gpurec/serve/artifact.py) and `contract.json`; `config.pbtxt` is generated.
Self-contained on purpose (numpy, torch, fbgemm_gpu, the backend's utils; no gpurec import), so
a model repository runs in any Triton image that has torch.

Dynamic batching hands `execute` several requests at once: they are validated one by one (a bad
request gets its own error response, the others are still served), concatenated, scored in one
forward pass and split back. Inputs per row, in `contract.json` order: `dense` FP32 [D], one
INT64 [1] per single-valued sparse feature, and each multi-valued feature as INT64 [K] padded
with -1 (requests may use different K; they are padded to the widest). Outputs: FP32 [1] per task
probability and `score`.

Parameter sync: when the server's environment names a sync directory (`GPUREC_SYNC_DIR`, set by
`gpurec serve --sync-dir`), `initialize` loads its newest snapshot and the deltas after it before
the model reports ready, and a background thread applies every new delta in place (the module's
tensors, `index_copy_`) under the same lock `execute` holds while scoring, so a request sees all of
a delta or none. The code that reads and applies deltas is `gpurec_deltas.py`, copied next to this
file by export (gpurec/sync/deltafile.py). The gauge `gpurec_ranker_sync_version` reports the seq
served, counters the deltas applied and refused (corrupt, torn, out of sequence).

Hostile inputs: a request with NaN/inf dense values is refused before scoring (INVALID_ARG,
kind `non_finite_input`); a request whose finite inputs still drive the model to NaN/inf (a dense
value of 1e38 overflows the first layer) gets an INTERNAL error (kind `non_finite_output`), never
a success with NaN scores. Rows are scored independently (eval mode), so such a request in a
dynamic batch fails alone; the others are answered. Every refusal is counted by kind in
`gpurec_ranker_errors_total` (Triton's own failure counters miss what this code refuses), with
the message prefix `ranker: <kind>:` that clients map onto typed errors.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Kinds of refused requests, the `kind` label of gpurec_ranker_errors_total and the word after
# "ranker: " in the error message (gpurec.client maps the non-finite kinds onto typed errors).
ERROR_KINDS = ("missing_input", "bad_shape", "non_finite_input", "non_finite_output", "scoring_failed")


class RequestRefused(ValueError):
    """One request's inputs are unusable: INVALID_ARG for it alone, counted under `kind`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        try:  # registers fbgemm's operators that the scripted KeyedJaggedTensor code calls
            import fbgemm_gpu  # noqa: F401
        except ImportError as err:
            raise pb_utils.TritonModelException(f"ranker needs fbgemm_gpu (fbgemm-gpu or fbgemm-gpu-cpu): {err}") from err
        self.torch = torch
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.contract = json.loads((version_dir / "contract.json").read_text())
        if args.get("model_instance_kind") == "GPU":
            self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        else:
            self.device = torch.device("cpu")
        self.module = torch.jit.load(str(version_dir / "model.pt"), map_location=self.device).eval()
        self.num_dense = len(self.contract["dense_features"])
        self.single = list(self.contract["sparse_features"])
        self.multi = list(self.contract["multi_valued_features"])
        self.outputs = [*self.contract["tasks"], "score"]
        self.pad_id = int(self.contract["pad_id"])
        self.lock = threading.Lock()  # scoring and applying deltas never interleave
        self.applier = None
        # One counter per kind, made at load so each series exists (at 0) before the first error.
        self.error_family = pb_utils.MetricFamily(
            name="gpurec_ranker_errors_total",
            description="Ranker requests refused or failed by the model's own checks, by kind",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.error_counters = {kind: self.error_family.Metric(labels={**labels, "kind": kind}) for kind in ERROR_KINDS}
        sync_dir = os.environ.get("GPUREC_SYNC_DIR", "")
        if sync_dir:
            self._start_sync(version_dir, Path(sync_dir), args.get("model_instance_name", "ranker"))

    def _start_sync(self, version_dir: Path, sync_dir: Path, instance: str) -> None:
        sys.path.insert(0, str(version_dir))
        import gpurec_deltas

        labels = {"model": "ranker", "instance": instance}  # each instance applies every delta itself
        family = pb_utils.MetricFamily
        specs = {
            "version": ("gpurec_ranker_sync_version", "seq of the last parameter delta applied (-1: none)", family.GAUGE),
            "applied": ("gpurec_ranker_sync_applied_total", "parameter deltas applied", family.COUNTER),
            "refused": ("gpurec_ranker_sync_refused_total", "deltas refused: corrupt, torn or out of sequence", family.COUNTER),
            "reloads": ("gpurec_ranker_sync_reloads_total", "reloads from a snapshot", family.COUNTER),
        }
        # A family must outlive its metrics (Triton refuses updates otherwise): keep both.
        self.metric_families = {key: family(name=name, description=text, kind=kind) for key, (name, text, kind) in specs.items()}
        self.metrics = {key: fam.Metric(labels=labels) for key, fam in self.metric_families.items()}
        self.applier = gpurec_deltas.DeltaApplier(self.module, sync_dir, self.lock)
        self.applier.poll()  # serve the newest parameters from the first request on
        self._report_sync()
        self._sync_stop = threading.Event()
        self._server_pid = os.getppid()
        self._sync_thread = threading.Thread(target=self._follow_deltas, name="gpurec-ranker-sync", daemon=True)
        self._sync_thread.start()

    def _follow_deltas(self) -> None:
        while not self._sync_stop.wait(0.005):
            if os.getppid() != self._server_pid:
                # The server died (kill -9): a metric update now is an IPC call nobody answers, and it
                # would keep this stub, with the whole model, alive forever. Stop; the stub exits.
                return
            try:
                if self.applier.poll():
                    self._report_sync()
            except Exception as err:  # a bad delta never stops serving; it is counted and logged
                self.applier.refused += 1
                self._report_sync()
                pb_utils.Logger.log_warn(f"ranker: parameter delta not applied: {type(err).__name__}: {err}")

    def _report_sync(self) -> None:
        applier = self.applier
        self.metrics["version"].set(applier.version)
        for name in ("applied", "refused", "reloads"):
            total = getattr(applier, name)
            reported = getattr(self, f"_reported_{name}", 0)
            if total > reported:
                self.metrics[name].increment(total - reported)
                setattr(self, f"_reported_{name}", total)

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        errors: dict[str, int] = {}

        def refuse(i: int, kind: str, message: str, code) -> None:
            responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ranker: {kind}: {message}", code))
            errors[kind] = errors.get(kind, 0) + 1

        parsed: list[tuple[int, dict[str, np.ndarray]]] = []
        for i, request in enumerate(requests):
            try:
                parsed.append((i, self._read(request)))
            except RequestRefused as err:
                refuse(i, err.kind, str(err), pb_utils.TritonError.INVALID_ARG)
        if parsed:
            try:
                scores = self._score([arrays for _, arrays in parsed])
            except Exception as err:  # a failed forward pass fails these requests, not the server
                for i, _ in parsed:
                    refuse(i, "scoring_failed", f"{type(err).__name__}: {err}", pb_utils.TritonError.INTERNAL)
                parsed = []
            start = 0
            for i, arrays in parsed:
                rows = arrays["dense"].shape[0]
                mine = {name: scores[name][start : start + rows] for name in self.outputs}
                start += rows
                bad = np.zeros(rows, dtype=bool)
                for values in mine.values():
                    bad |= ~np.isfinite(values.reshape(rows, -1)).all(axis=1)
                if bad.any():  # never a success carrying NaN/inf; the request's own rows only
                    refuse(
                        i,
                        "non_finite_output",
                        f"the model produced NaN or infinite scores for {int(bad.sum())} of {rows} rows "
                        f"(first row {int(np.flatnonzero(bad)[0])}); its inputs are out of the range the model handles",
                        pb_utils.TritonError.INTERNAL,
                    )
                    continue
                tensors = [pb_utils.Tensor(name, mine[name].reshape(rows, 1)) for name in self.outputs]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        # Counted before the responses leave: a client that saw the error also sees the count.
        for kind, count in errors.items():
            self.error_counters[kind].increment(count)
        return responses

    def _read(self, request) -> dict[str, np.ndarray]:
        """One request's inputs as numpy, checked beyond what Triton checks (shape agreement, finiteness)."""
        arrays: dict[str, np.ndarray] = {}
        for name in ["dense", *self.single, *self.multi]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestRefused("missing_input", f"missing input {name!r}")
            arrays[name] = tensor.as_numpy()
        dense = arrays["dense"]
        if dense.ndim != 2 or dense.shape[1] != self.num_dense:
            raise RequestRefused("bad_shape", f"'dense' must be [rows, {self.num_dense}] float32, got {list(dense.shape)}")
        rows = dense.shape[0]
        for name in self.single:
            if arrays[name].shape != (rows, 1):
                raise RequestRefused("bad_shape", f"{name!r} must be [{rows}, 1] int64, got {list(arrays[name].shape)}")
        for name in self.multi:
            if arrays[name].ndim != 2 or arrays[name].shape[0] != rows:
                raise RequestRefused(
                    "bad_shape", f"{name!r} must be [{rows}, K] int64 padded with {self.pad_id}, got {list(arrays[name].shape)}"
                )
        if not np.isfinite(dense).all():
            raise RequestRefused("non_finite_input", "'dense' has NaN or infinite values")
        return arrays

    def _score(self, batch: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        torch = self.torch
        dense = np.concatenate([a["dense"] for a in batch]).astype(np.float32, copy=False)
        single = np.concatenate([np.concatenate([a[n] for n in self.single], axis=1) for a in batch]).astype(np.int64, copy=False)
        multi = []
        for name in self.multi:
            width = max(1, *(a[name].shape[1] for a in batch))
            padded = [np.pad(a[name], ((0, 0), (0, width - a[name].shape[1])), constant_values=self.pad_id) for a in batch]
            multi.append(torch.from_numpy(np.concatenate(padded).astype(np.int64, copy=False)).to(self.device))
        with self.lock, torch.inference_mode():
            out = self.module(torch.from_numpy(dense).to(self.device), torch.from_numpy(single).to(self.device), multi)
            return {name: out[name].to("cpu", torch.float32).numpy() for name in self.outputs}

    def finalize(self) -> None:
        if self.applier is not None:
            self._sync_stop.set()
            self._sync_thread.join(timeout=5)
        self.module = None
        # Metrics before their family (Triton refuses the other order).
        self.error_counters.clear()
        self.error_family = None
