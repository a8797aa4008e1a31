"""Freshness: from a user's action to the first served score that reflects it, measured end to end.

`FreshnessProbe` watches a running ranker from outside, the way a user would notice: it polls the
server's Prometheus endpoint every `interval_s` for `gpurec_ranker_sync_version` (the lowest over
the ranker's instances: a delta counts as served once every instance serves it) and notes, on the
machine's monotonic clock, when each delta became served. The delta's header says which actions
it carries (each trained example's newest action, in event time, and when it was trained) and
when it was written, so for every action:

    freshness           = served - produced
    action -> trained   = trained - produced  (join window until the row's window closes, joiner
                                                watermark and commit, the trainer's micro-batch wait)
    trained -> written  = written - trained   (the sync interval)
    written -> served   = served - written    (the server noticing and applying the delta)

`produced` is the wall-clock moment of the action's event time on the simulation's clock
(`wall_at`), i.e. when the simulated user acted. The probe's poll interval bounds the error of
`served` (20 ms by default); requests after that moment are scored with the new rows.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpurec.sync.deltafile import CorruptDelta, delta_name, read_header

VERSION_METRIC = "gpurec_ranker_sync_version{"


def served_version(metrics_text: str) -> int | None:
    """The delta every ranker instance serves (the lowest instance version), None if unknown."""
    values = [float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines() if line.startswith(VERSION_METRIC)]
    return int(min(values)) if values else None


class FreshnessProbe:
    def __init__(self, metrics_url: str, sync_dir: str | Path, interval_s: float = 0.02) -> None:
        self.metrics_url, self.sync_dir, self.interval_s = metrics_url, Path(sync_dir), interval_s
        self.version: int | None = None
        self.served: list[tuple[int, float, dict[str, Any]]] = []  # (seq, served at, header)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpurec-freshness-probe", daemon=True)

    def start(self) -> FreshnessProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                text = urllib.request.urlopen(self.metrics_url, timeout=2).read().decode()
            except OSError:
                self.errors += 1
                continue
            self.observe(served_version(text), time.monotonic())

    def observe(self, version: int | None, now: float) -> None:
        """The server serves `version` at monotonic time `now` (the probe's loop calls this)."""
        if version is None or (self.version is not None and version <= self.version):
            return
        first = (self.version + 1) if self.version is not None else version  # the first seen: already there
        self.version = version
        for seq in range(first, version + 1):
            header = self._header(seq)
            if header is not None:
                self.served.append((seq, now, header))

    def _header(self, seq: int) -> dict[str, Any] | None:
        for kind in ("rows", "dense", "snapshot"):
            path = self.sync_dir / delta_name(seq, kind)
            if path.exists():
                try:
                    return read_header(path)
                except (CorruptDelta, OSError):
                    return None
        return None

    def report(self, wall_at: Callable[[int], float]) -> dict[str, Any]:
        """Freshness percentiles (seconds) over every action carried by a served delta."""
        freshness, to_trained, to_written, to_served = [], [], [], []
        deltas = 0
        for _, served_at, header in self.served:
            actions = header.get("actions") or []
            if not actions:
                continue
            deltas += 1
            written = float(header["created_mono"])
            for action_ms, trained_at in actions:
                produced = wall_at(int(action_ms))
                freshness.append(served_at - produced)
                to_trained.append(trained_at - produced)
                to_written.append(written - trained_at)
            to_served.append(served_at - written)

        def pct(values: list[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 3) if values else None

        return {
            "freshness_p50_s": pct(freshness, 50),
            "freshness_p95_s": pct(freshness, 95),
            "freshness_actions": len(freshness),
            "freshness_breakdown_p50_s": {
                "action_to_trained": pct(to_trained, 50),
                "trained_to_written": pct(to_written, 50),
                "written_to_served": pct(to_served, 50),
            },
            "deltas_served": len(self.served),
            "deltas_with_actions": deltas,
            "sync_version": self.version,
        }

