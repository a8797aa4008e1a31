"""Time splits and shards over day partitions: pure functions of the sorted day list.

Every shard computes the same assignments from the directory listing alone, which is what lets
shards run with no coordination: shard i knows which days are its own, which split each day goes
to, and which days before its block it must replay to rebuild its starting counters.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass

SPLITS: tuple[str, ...] = ("train", "valid", "test")
_SHARD = re.compile(r"^(\d+)/(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): a contiguous block of the impression days."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'i/N' with 0 <= i < N."""
        match = _SHARD.match(text.strip())
        if not match:
            raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"shard {text!r}: need 0 <= i < N and N >= 1")
        return cls(index, count)

    def block(self, days: list[str]) -> list[str]:
        """This shard's days: block i of N near-equal contiguous blocks (empty when N > days)."""
        n = len(days)
        return days[self.index * n // self.count : (self.index + 1) * n // self.count]

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"


SINGLE = Shard(0, 1)


def _days_for(fraction: float, n_days: int) -> int:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fractions must be in [0, 1), got {fraction}")
    k = math.floor(fraction * n_days + 0.5)
    return max(1, k) if fraction > 0 and n_days >= 3 else k


def split_days(days: list[str], valid_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, list[str]]:
    """Sorted days -> {train, valid, test}: the last test_fraction of days are test, the valid_fraction
    before them valid, the rest train. With >= 3 days each non-zero fraction gets at least one day,
    and train always keeps at least one day.
    """
    ordered = sorted(days)
    n = len(ordered)
    n_test, n_valid = _days_for(test_fraction, n), _days_for(valid_fraction, n)
    while n and n_test + n_valid > n - 1:  # keep one training day: shrink the larger held-out split
        if n_valid >= n_test and n_valid > 0:
            n_valid -= 1
        elif n_test > 0:
            n_test -= 1
        else:
            break
    n_train = n - n_valid - n_test
    return {
        "train": ordered[:n_train],
        "valid": ordered[n_train : n_train + n_valid],
        "test": ordered[n_train + n_valid :],
    }


def split_of(days: list[str], valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """day -> split name."""
    return {day: name for name, chosen in split_days(days, valid_fraction, test_fraction).items() for day in chosen}


def owner_of(day: str, impression_days: list[str], shard_count: int) -> int:
    """Which shard owns (validates, dead-letters and counts) a partition `day` of a day-keyed log.

    An impression day belongs to the shard whose block holds it; any other day (an actions day
    with no impressions, e.g. late actions after the last day) to the owner of the latest impression
    day before it, or shard 0 when there is none.
    """
    if not impression_days:
        return 0
    pos = max(bisect.bisect_right(impression_days, day) - 1, 0)
    for index in range(shard_count):
        if pos < (index + 1) * len(impression_days) // shard_count:
            return index
    return shard_count - 1


__all__ = ["SINGLE", "SPLITS", "Shard", "owner_of", "split_days", "split_of"]
