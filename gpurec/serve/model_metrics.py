"""Prometheus metrics of the python-backend models (feed, consent), buffered in the model.

A Triton metric update is an IPC round trip, so the models' code records into a `ModelMetrics`
and the model flushes it to Triton's metrics endpoint periodically (`MetricSpec` names each family
a model registers).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

LATENCY_BUCKETS_MS: Final = (1, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 150, 250, 500, 1000, 2500)
CANDIDATE_BUCKETS: Final = (0, 25, 50, 100, 150, 200, 250, 300, 400, 500, 1000)



@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    description: str
    buckets: tuple[float, ...] = ()


class ModelMetrics:
    """Metric updates buffered for a periodic flush (a Triton metric update is an IPC round trip)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple, float] = {}
        self._gauges: dict[tuple, float] = {}
        self._observed: dict[tuple, list[float]] = {}
        self.totals: dict[tuple, float] = {}
        """Every counter's running total, by (name, sorted labels): for in-process checks."""

    @staticmethod
    def key(name: str, labels: Mapping[str, str]) -> tuple:
        return name, tuple(sorted(labels.items()))

    def add(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = self.key(name, labels)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0.0) + value
            self.totals[key] = self.totals.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._gauges[self.key(name, labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._observed.setdefault(self.key(name, labels), []).append(value)

    def total(self, name: str, **labels: str) -> float:
        return self.totals.get(self.key(name, labels), 0.0)

    def drain(self) -> tuple[dict[tuple, float], dict[tuple, float], dict[tuple, list[float]]]:
        """Counter increments, gauge values and observations since the last drain."""
        with self._lock:
            out = self._counts, self._gauges, self._observed
            self._counts, self._gauges, self._observed = {}, {}, {}
        return out


class TritonMetrics:
    """A model's `MetricSpec` families registered with Triton, and the flush of a `ModelMetrics`
    buffer into them. `pb_utils` is the python backend's module, passed in: it exists only inside
    the backend's stub, so this module stays importable (and testable) anywhere."""

    def __init__(self, pb_utils: Any, specs: Sequence[MetricSpec], labels: Mapping[str, str]) -> None:
        kinds = {
            "counter": pb_utils.MetricFamily.COUNTER,
            "gauge": pb_utils.MetricFamily.GAUGE,
            "histogram": pb_utils.MetricFamily.HISTOGRAM,
        }
        self._families = {
            spec.name: pb_utils.MetricFamily(name=spec.name, description=spec.description, kind=kinds[spec.kind])
            for spec in specs
        }
        self._buckets = {spec.name: list(map(float, spec.buckets)) for spec in specs if spec.buckets}
        self._labels = dict(labels)
        self._metrics: dict[tuple, Any] = {}

    def _metric(self, key: tuple) -> Any:
        metric = self._metrics.get(key)
        if metric is None:
            name, labels = key
            options = {"buckets": self._buckets[name]} if name in self._buckets else {}
            metric = self._metrics[key] = self._families[name].Metric(labels={**self._labels, **dict(labels)}, **options)
        return metric

    def flush(self, buffer: ModelMetrics) -> None:
        """Everything `buffer` recorded since the last flush: counter increments, gauge values, observations."""
        counts, gauges, observed = buffer.drain()
        for key, value in counts.items():
            self._metric(key).increment(value)
        for key, value in gauges.items():
            self._metric(key).set(value)
        for key, values in observed.items():
            metric = self._metric(key)
            for value in values:
                metric.observe(value)

    def close(self) -> None:
        """Drop the metrics, then their families: Triton refuses the other order."""
        self._metrics.clear()
        self._families.clear()
