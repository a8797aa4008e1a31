"""What each embedding table is: one sparse feature's table, its size, width and pooling.

Defined here, below the model, because both the id maps (`gpurec.embedding`) and the model
(`gpurec.model`) build on it: the id maps size their row blocks from it, the model its tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gpurec.errors import InvalidInput

Pooling = Literal["sum", "mean"]
POOLINGS: tuple[str, ...] = ("sum", "mean")


@dataclass(frozen=True)
class SparseFeatureSpec:
    """One sparse feature and the embedding table (``t_<name>``) that serves it.

    ``multi_valued`` features (hashtags) have a variable number of ids per example that the
    table pools with ``pooling``; single-valued features have exactly one id per example.
    """

    name: str
    num_embeddings: int
    embedding_dim: int
    multi_valued: bool = False
    pooling: Pooling = "sum"

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("sparse feature name must be non-empty")
        require_positive_int(f"sparse feature {self.name!r} num_embeddings", self.num_embeddings)
        require_positive_int(f"sparse feature {self.name!r} embedding_dim", self.embedding_dim)
        if self.pooling not in POOLINGS:
            raise InvalidInput(
                f"sparse feature {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}"
            )

    @property
    def table_name(self) -> str:
        """Name of the embedding table; sharding plans and checkpoints refer to tables by it."""
        return f"t_{self.name}"


def require_positive_int(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInput(f"{what} must be a positive integer, got {value!r}")
