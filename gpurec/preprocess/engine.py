"""Which Polars engine runs the pipeline: the GPU (cudf-polars) when it can, else the CPU.

The pipeline is one lazy Polars plan; only the `collect` differs. `auto` must never pick a GPU that
is not there, and must decide without importing torch or initialising CUDA (that costs seconds and
grabs device memory), so it looks for the cudf-polars package and for an NVIDIA device node or
`nvidia-smi`.
"""

from __future__ import annotations

import glob
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from typing import Literal

import polars as pl

from gpurec.errors import GpurecError, InvalidInput

EngineName = Literal["auto", "cpu", "gpu"]
ENGINES: tuple[str, ...] = ("auto", "cpu", "gpu")
GPU_INSTALL_HINT = "pip install cudf-polars-cu13==26.10.2 (or the project's extra: pip install 'gpurec[gpu]')"


class EngineUnavailableError(GpurecError, RuntimeError):
    """The requested engine cannot run here; the message says why and how to fix it."""


@dataclass(frozen=True)
class EngineChoice:
    """The engine that will run (`cpu` or `gpu`) and why it was picked (logged and kept in the manifest)."""

    name: Literal["cpu", "gpu"]
    reason: str

    def polars_engine(self, streaming: bool = False) -> pl.GPUEngine | str:
        """The value for `LazyFrame.collect(engine=...)`.

        GPU: unsupported operations fall back to the CPU instead of failing (raise_on_fail=False).
        CPU: the streaming engine (faster for joins, gathers and group_by here) or the in-memory
        one (faster for the counters' sorts and running sums); a day fits in memory either way.
        """
        if self.name == "gpu":
            return pl.GPUEngine(raise_on_fail=False)
        return "streaming" if streaming else "in-memory"


def cudf_polars_installed() -> bool:
    return importlib.util.find_spec("cudf_polars") is not None


def cuda_device_present() -> bool:
    """True when an NVIDIA GPU is visible, checked without importing any CUDA library."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def resolve_engine(requested: str) -> EngineChoice:
    """Map `auto|cpu|gpu` to the engine that will run; `gpu` that cannot run raises with a fix."""
    if requested not in ENGINES:
        raise InvalidInput(f"unknown engine {requested!r}; expected one of {ENGINES}")
    if requested == "cpu":
        return EngineChoice("cpu", "requested")
    has_package, has_device = cudf_polars_installed(), cuda_device_present()
    if requested == "gpu":
        if not has_package:
            raise EngineUnavailableError(f"--engine gpu needs the cudf-polars package, which is not installed: {GPU_INSTALL_HINT}")
        if not has_device:
            raise EngineUnavailableError("--engine gpu: cudf-polars is installed but no NVIDIA GPU is visible (no /dev/nvidia*, no nvidia-smi); use --engine cpu")
        return EngineChoice("gpu", "requested")
    if has_package and has_device:
        return EngineChoice("gpu", "auto: cudf-polars installed and a CUDA device is present")
    missing = "cudf-polars not installed" if not has_package else "no CUDA device"
    return EngineChoice("cpu", f"auto: {missing}")


__all__ = [
    "ENGINES",
    "GPU_INSTALL_HINT",
    "EngineChoice",
    "EngineUnavailableError",
    "cuda_device_present",
    "cudf_polars_installed",
    "resolve_engine",
]
