"""Counting ids that have not earned a row yet: a count-min sketch in a tensor.

An id is admitted to its table after ``admit_after`` occurrences (Monolith's frequency filter).
Keeping an exact count for every id ever seen would cost what the filter is meant to save, so
not-yet-admitted ids are counted in ``depth`` rows of ``width`` int32 counters, each row indexed
by its own hash. The estimate (the minimum over rows) is never below the true count, so an id
that has earned a row always gets it; with conservative update (raise a counter only as far as
the id needs) it overestimates rarely, i.e. an id is seldom admitted early. Its owner
(`IdPartition`) halves the counters periodically so that an endless stream of new ids cannot
saturate it: counts are then recent counts.
"""

from __future__ import annotations

import torch

from gpurec.embedding.cuckoo import mix64

_ROW_SEEDS = (0x51ED270B27E3A3A1, 0x2A1B4E9C07D5F3B7, 0x6C8E9CF570932BD5, 0x1F83D9ABFB41BD6B)


class CountMinSketch:
    """``add(ids, counts)`` then ``estimate(ids)``; ids must be distinct within one ``add`` call."""

    def __init__(self, width: int, depth: int, device: torch.device | str = "cpu") -> None:
        if width <= 0 or depth <= 0:
            raise ValueError(f"count-min sketch needs positive width and depth, got {width} x {depth}")
        self.width, self.depth = width, depth
        self.counters = torch.zeros(depth, width, dtype=torch.int32, device=device)

    def _columns(self, ids: torch.Tensor) -> torch.Tensor:
        """[depth, n] counter column of each id in each row."""
        return torch.stack([mix64(ids, _seed(row)) % self.width for row in range(self.depth)])

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        columns = self._columns(ids)
        return self.counters.gather(1, columns).min(dim=0).values.to(torch.int64)

    def add(self, ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Count ``counts[i]`` more occurrences of ``ids[i]``; return the new estimates."""
        columns = self._columns(ids)
        estimate = self.counters.gather(1, columns).min(dim=0).values.to(torch.int64) + counts
        capped = estimate.clamp(max=torch.iinfo(torch.int32).max).to(torch.int32)
        # Conservative update: each counter rises to at most the id's new estimate. Two ids of one
        # batch sharing a counter take the larger, which still bounds both true counts from above.
        self.counters.scatter_reduce_(1, columns, capped.expand(self.depth, -1), reduce="amax")
        return estimate

    def forget(self, ids: torch.Tensor) -> None:
        """Take back what ``ids`` counted, as far as a sketch can: lower each of an id's counters by
        its estimate (the id's own estimate becomes 0). Counters are shared, so an id colliding
        with a forgotten one may lose up to that much count, which only delays its admission."""
        if ids.numel() == 0:
            return
        columns = self._columns(ids)
        current = self.counters.gather(1, columns)
        lowered = current - current.min(dim=0).values
        self.counters.scatter_reduce_(1, columns, lowered, reduce="amin")


def _seed(row: int) -> int:
    return _ROW_SEEDS[row % len(_ROW_SEEDS)] ^ (row // len(_ROW_SEEDS))
