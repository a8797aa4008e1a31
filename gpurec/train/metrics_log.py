"""Training metrics to JSON-lines files (for scripts) and TensorBoard (for people), rank 0 only:
`metrics.jsonl` (a record per `log_every` steps: losses, samples/s) and `validation.jsonl` (a record
per validation: valid AUC per task, the best step so far)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        self._out_dir = Path(out_dir)
        if not enabled:
            return
        self._out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self._out_dir / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time; the JSON lines carry everything
            return
        self._tensorboard = SummaryWriter(log_dir=str(self._out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """One record per call; numeric fields other than `step` become TensorBoard scalars."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"time": time.time(), **record}) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def write_validation(self, record: dict[str, Any]) -> None:
        """One validation's record (a separate file: metrics.jsonl stays one shape, the losses);
        numeric fields other than `step` become TensorBoard scalars under `valid/`."""
        if not self.enabled:
            return
        with (self._out_dir / "validation.jsonl").open("a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
        if self._tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tensorboard.add_scalar(f"valid/{key}", value, record["step"])

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
