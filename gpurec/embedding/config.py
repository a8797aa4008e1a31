"""How ids get embedding rows: the `[model.ids]` table of the model config.

    [model.ids]
    kind = "collisionless"        # or "hashed": row = id mod rows, no state (gpurec.embedding.modulo)
    admit_after = 2               # occurrences before an id earns its own row (frequency filter)
    expire_after_hours = 0        # event-time hours without an occurrence before the row is freed; 0 = never
    eviction = "lru"              # which ids give their rows back when a table is full: lru | lfu
    unadmitted = "default_row"    # what a not-yet-admitted or unknown id reads: default_row | zero
    forget_filter_bits = 1048576  # per partition: the Bloom filter of forgotten ids (gpurec.embedding.denylist)

    [model.ids.features.item_id]  # per-feature overrides of admit_after, expire_after_hours, unadmitted
    expire_after_hours = 72

`default_row` reserves row 0 of the table as one shared, trained embedding for every id without
a row of its own (the cold-start vector); `zero` drops such ids from their bag, so they add
nothing (an all-unknown single-valued feature pools to the zero vector).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

IdTableKind = Literal["collisionless", "hashed"]
EvictionPolicy = Literal["lru", "lfu"]
Unadmitted = Literal["default_row", "zero"]

KINDS: tuple[str, ...] = ("collisionless", "hashed")
EVICTIONS: tuple[str, ...] = ("lru", "lfu")
UNADMITTED: tuple[str, ...] = ("default_row", "zero")
ROW_ALIGNMENT = 8  # table rows are a multiple of this, so 1, 2, 4 or 8 ranks split them evenly
DEFAULT_ROW = 0  # the shared row of unadmitted ids, when `unadmitted = "default_row"`


@dataclass(frozen=True)
class FeatureIdPolicy:
    """The admission/expiry rules of one feature's table (global settings + its overrides)."""

    admit_after: int
    expire_after_hours: float
    unadmitted: Unadmitted

    @property
    def expire_after_ms(self) -> int:
        return int(self.expire_after_hours * 3_600_000)

    @property
    def reserved_rows(self) -> int:
        """Rows at the start of partition 0 that ids never get."""
        return 1 if self.unadmitted == "default_row" else 0


_OVERRIDABLE = ("admit_after", "expire_after_hours", "unadmitted")


@dataclass(frozen=True)
class IdTableConfig:
    kind: IdTableKind = "collisionless"
    admit_after: int = 2
    expire_after_hours: float = 0.0
    eviction: EvictionPolicy = "lru"
    unadmitted: Unadmitted = "default_row"
    sketch_width: int = 1 << 16  # count-min counters per row, per counting feature and partition
    sketch_depth: int = 4
    forget_filter_bits: int = 1 << 20  # deny-list of forgotten ids, per partition (a multiple of 8)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", {k: dict(v) for k, v in _mapping("ids.features", self.features).items()})
        if self.kind not in KINDS:
            raise ValueError(f"ids.kind must be one of {KINDS}, got {self.kind!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"ids.eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        for name in ("sketch_width", "sketch_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ids.{name} must be a positive integer, got {value!r}")
        bits = self.forget_filter_bits
        if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0 or bits % 8:
            raise ValueError(f"ids.forget_filter_bits must be a positive multiple of 8, got {bits!r}")
        self._check_policy("ids", self.admit_after, self.expire_after_hours, self.unadmitted)
        for feature, overrides in self.features.items():
            unknown = set(overrides) - set(_OVERRIDABLE)
            if unknown:
                raise ValueError(
                    f"ids.features.{feature}: unknown keys {sorted(unknown)} (per-feature keys: {', '.join(_OVERRIDABLE)})"
                )
            policy = self.policy(feature)
            self._check_policy(f"ids.features.{feature}", policy.admit_after, policy.expire_after_hours, policy.unadmitted)

    @staticmethod
    def _check_policy(where: str, admit_after: object, expire_after_hours: object, unadmitted: object) -> None:
        if isinstance(admit_after, bool) or not isinstance(admit_after, int) or admit_after < 1:
            raise ValueError(f"{where}.admit_after must be an integer >= 1, got {admit_after!r}")
        if isinstance(expire_after_hours, bool) or not isinstance(expire_after_hours, int | float) or expire_after_hours < 0:
            raise ValueError(f"{where}.expire_after_hours must be a number >= 0 (0 = never), got {expire_after_hours!r}")
        if unadmitted not in UNADMITTED:
            raise ValueError(f"{where}.unadmitted must be one of {UNADMITTED}, got {unadmitted!r}")

    def policy(self, feature: str) -> FeatureIdPolicy:
        values = {name: getattr(self, name) for name in _OVERRIDABLE}
        values.update(self.features.get(feature, {}))
        return FeatureIdPolicy(**values)

    def check_features(self, names: list[str]) -> None:
        """Per-feature overrides must name real features (a typo would silently do nothing)."""
        unknown = set(self.features) - set(names)
        if unknown:
            raise ValueError(f"ids.features names unknown features {sorted(unknown)} (features: {names})")

    @classmethod
    def from_value(cls, value: IdTableConfig | Mapping[str, Any]) -> IdTableConfig:
        if isinstance(value, IdTableConfig):
            return value
        known = {f.name for f in fields(cls)}
        unknown = set(_mapping("ids", value)) - known
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in model.ids config (known keys: {', '.join(sorted(known))})")
        return cls(**value)


def aligned_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of ROW_ALIGNMENT."""
    return -(-rows // ROW_ALIGNMENT) * ROW_ALIGNMENT


def _mapping(what: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a table/mapping, got {type(value).__name__}")
    return value
