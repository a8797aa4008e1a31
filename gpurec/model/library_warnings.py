"""Quiet the torch/torchrec/fbgemm stack for console output: one place, for every command."""

from __future__ import annotations


def quiet_library_warnings() -> None:
    """Silence the torch/torchrec/fbgemm stack's warnings about its own internals (deprecations,
    planner heuristics), which would otherwise bury the command's output. Errors still show."""
    import logging
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=".*TorchScript.*", category=UserWarning)
    for name in ("torchrec", "torch.fx._symbolic_trace", "torch.distributed", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
