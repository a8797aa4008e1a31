"""Retention: how long each dataset and topic of a workspace is kept, and its enforcement.

    [retention]                 # workspace.toml; every key optional, days > 0
    raw_days = 90               # raw impressions / actions / oracle day partitions
    features_days = 90          # preprocessed split day partitions (and their manifest entries)
    sync_days = 1               # deltas and snapshots superseded by the newest readable snapshot
    process_logs_days = 30      # live/*.log, by file time (wall clock: the processes write them)
    exports_days = 30           # privacy/export-*.json, by file time (a copy handed to a user)
    [retention.topics]          # event-log topics (defaults: gpurec.stream.retention)
    served = 7

Time. Every window but the last two goes by event time, measured back from "now": by default the
newest event time found in the workspace (raw logs and the served / actions / examples topics),
since a simulated world's clock is not the wall clock (the demo's events are dated January 2026
whatever day it runs); `--now` sets it. Consent changes and sync notices are left out of that
newest time: a server may stamp them with its wall clock. A raw or feature day partition expires
once its whole day is older than the window. Topic records expire by the event log's own rule
(from the start of each partition, up to the first record young enough to keep) through
`EventLog.cleanup`; on Kafka the broker applies the windows itself, against its wall clock, on its
own schedule, so they are put on only while event time and wall clock agree (within a day).

Datasets not expired here: the users and items logs are dimension tables (a profile is removed by
`gpurec forget`, not by its signup date); checkpoints are pruned to each run's `keep` when they are
written (`gpurec.model.checkpoint`), so their bound is keep x checkpoint interval: they are
reported, not deleted. A feature split's `dense_moments` keep describing the split as it was
preprocessed (aggregates over all users: the normalisation the deployed model was trained with).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpurec.data.schema import MS_PER_DAY, day_start_ms
from gpurec.errors import InvalidInput
from gpurec.stream.retention import TOPIC_RETENTION_DAYS, days_to_ms
from gpurec.workspace import Workspace

DATASET_RETENTION_DAYS: dict[str, float] = {
    "raw_days": 90,
    "features_days": 90,
    "sync_days": 1,
    "process_logs_days": 30,
    "exports_days": 30,
}
RAW_EVENT_LOGS = ("impressions", "actions", "oracle")  # per-event logs, partitioned by event day
# What "now" is dated from: the traffic's topics (sync and consent changes may carry wall-clock stamps).
TRAFFIC_TOPICS = ("served", "actions", "examples")


@dataclass(frozen=True)
class RetentionPolicy:
    """Windows in days: per dataset (`DATASET_RETENTION_DAYS` keys) and per topic (None: keep)."""

    datasets: Mapping[str, float] = field(default_factory=lambda: dict(DATASET_RETENTION_DAYS))
    topics: Mapping[str, float | None] = field(default_factory=lambda: dict(TOPIC_RETENTION_DAYS))


def _days(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
        raise InvalidInput(f"{where} must be a number of days > 0, got {value!r}")
    return float(value)


def retention_policy(config: Mapping[str, Any], source: str = "[retention]") -> RetentionPolicy:
    """The policy of a `[retention]` table (defaults where it names nothing); InvalidInput for an
    unknown key or a window that is not a positive number of days."""
    unknown = sorted(set(config) - set(DATASET_RETENTION_DAYS) - {"topics"})
    if unknown:
        known = ", ".join([*DATASET_RETENTION_DAYS, "topics"])
        raise InvalidInput(f"{source}: unknown keys {unknown} (known keys: {known})")
    datasets = dict(DATASET_RETENTION_DAYS)
    for key in DATASET_RETENTION_DAYS:
        if key in config:
            datasets[key] = _days(config[key], f"{source} {key}")
    topics: dict[str, float | None] = dict(TOPIC_RETENTION_DAYS)
    table = config.get("topics", {})
    if not isinstance(table, Mapping):
        raise InvalidInput(f"{source}: topics must be a table ([retention.topics])")
    unknown = sorted(set(table) - set(TOPIC_RETENTION_DAYS))
    if unknown:
        raise InvalidInput(f"{source}.topics: unknown topics {unknown} (known: {', '.join(TOPIC_RETENTION_DAYS)})")
    for topic, value in table.items():
        topics[topic] = _days(value, f"{source}.topics {topic}")
    return RetentionPolicy(datasets, topics)


def workspace_policy(workspace: Workspace) -> RetentionPolicy:
    return retention_policy(workspace.retention, f"{workspace.config_path} [retention]")


# ---- now ------------------------------------------------------------------------------------------


def parse_now(text: str) -> int:
    """`--now`: an ISO-8601 date or time (UTC unless it says otherwise) as epoch ms."""
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"--now must be an ISO-8601 date or time such as 2026-01-12T00:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def newest_event_ms(workspace: Workspace) -> int | None:
    """The newest event time in the workspace: raw impressions / actions and the traffic topics."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gpurec.data.logs import day_files, list_days

    newest: list[int] = []
    for log in ("impressions", "actions"):
        days = list_days(workspace.raw, log)
        for path in day_files(workspace.raw, log, days[-1:]):
            column = pq.read_table(path, columns=["ts"])["ts"]
            if len(column):
                newest.append(int(pc.max(column).cast("int64").as_py()))
    log = open_existing_log(workspace)
    if log is not None:
        from gpurec.client.simulate_log import newest_event_ms as newest_on_log

        with log:
            found = newest_on_log(log, TRAFFIC_TOPICS)
        if found is not None:
            newest.append(found)
    return max(newest) if newest else None


def open_existing_log(workspace: Workspace):  # -> EventLog | None (stream imported lazily)
    """The workspace's event log, or None when it is the embedded one and was never created
    (opening it would create an empty one)."""
    from gpurec.stream.log import open_event_log

    url = workspace.event_log_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :].split("?")[0]).exists():
        return None
    return open_event_log(url)


# ---- enforcement ---------------------------------------------------------------------------------


@dataclass
class _Tally:
    count: int = 0
    bytes: int = 0
    items: list[str] = field(default_factory=list)

    def add(self, name: str, size: int, count: int = 1) -> None:
        self.count += count
        self.bytes += size
        self.items.append(name)

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "items": self.items}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _expired_day(day: str, cutoff_ms: int) -> bool:
    """A day partition whose every event is older than the cutoff."""
    try:
        return day_start_ms(day) + MS_PER_DAY <= cutoff_ms
    except ValueError:  # not a day= directory of ours
        return False


def _raw(workspace: Workspace, cutoff_ms: int, dry_run: bool) -> _Tally:
    from gpurec.data.logs import list_days, log_dir

    tally = _Tally()
    for log in RAW_EVENT_LOGS:
        for day in list_days(workspace.raw, log):
            if _expired_day(day, cutoff_ms):
                directory = log_dir(workspace.raw, log) / f"day={day}"
                tally.add(f"raw/{log}/day={day}", _size(directory), len(list(directory.glob("*.parquet"))))
                if not dry_run:
                    shutil.rmtree(directory)
    return tally


def _features(workspace: Workspace, cutoff_ms: int, dry_run: bool) -> _Tally:
    """Expired day files of every split, removed from the manifest(s) first (a reader never finds a
    manifest naming a deleted file), then deleted."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from gpurec.preprocess.manifest import Manifest

    tally = _Tally()
    root = workspace.features
    for path in sorted([*root.glob("manifest.json"), *root.glob("manifest.shard-*-of-*.json")]):
        manifest = Manifest.from_json(path.read_text())
        doomed: list[Path] = []
        for split in manifest.splits.values():
            keep = [i for i, day in enumerate(split.days) if not _expired_day(day, cutoff_ms)]
            if len(keep) == len(split.days):
                continue
            for i in sorted(set(range(len(split.days))) - set(keep)):
                file = root / split.files[i]
                if file.exists():
                    split.rows -= pq.ParquetFile(file).metadata.num_rows
                    tally.add(split.files[i], file.stat().st_size)
                    doomed.append(file)
            split.days = [split.days[i] for i in keep]
            split.files = [split.files[i] for i in keep]
            split.ts_min = split.ts_max = None
            if split.files:  # the new time range, from the first and last remaining files
                first = pq.read_table(root / split.files[0], columns=["ts"])["ts"]
                last = pq.read_table(root / split.files[-1], columns=["ts"])["ts"]
                split.ts_min = iso(pc.min(first).cast("int64").as_py()) if len(first) else None
                split.ts_max = iso(pc.max(last).cast("int64").as_py()) if len(last) else None
        if doomed and not dry_run:
            manifest.write(root)  # named by its own shard field: the file it was read from
            for file in doomed:
                file.unlink(missing_ok=True)
                if file.parent.is_dir() and not any(file.parent.iterdir()):
                    file.parent.rmdir()
    return tally


def _delta_header(path: Path, verify: bool) -> dict[str, Any] | None:
    """A delta file's header (`gpurec.sync.deltafile` format), None when unreadable or, with
    `verify`, when the payload does not match its checksum (a server could not rebuild from it)."""
    try:
        data = path.read_bytes() if verify else path.open("rb").readline()
        newline = data.find(b"\n")
        header = json.loads(data[:newline] if newline >= 0 else data)
    except (OSError, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    if verify:
        payload = data[newline + 1 :]
        if len(payload) != header.get("length") or hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            return None
    return header


def _sync(workspace: Workspace, cutoff_ms: int, dry_run: bool) -> _Tally:
    """Deltas and snapshots before the newest snapshot a server can rebuild from, once their newest
    trained event is older than the window (headers without one count as old)."""
    import re

    name = re.compile(r"^(\d{9})\.(rows|dense|snapshot)\.delta$")  # gpurec.sync.deltafile's names
    files = sorted(
        (int(m.group(1)), m.group(2), p) for p in workspace.sync.glob("*.delta") if (m := name.match(p.name))
    ) if workspace.sync.is_dir() else []  # fmt: skip
    newest = next(
        (seq for seq, kind, p in reversed(files) if kind == "snapshot" and _delta_header(p, verify=True) is not None),
        None,
    )
    tally = _Tally()
    if newest is None:
        return tally
    for seq, _kind, path in files:
        if seq >= newest:
            break
        header = _delta_header(path, verify=False) or {}
        if int(header.get("newest_event_ms") or 0) < cutoff_ms:
            tally.add(f"live/sync/{path.name}", path.stat().st_size)
            if not dry_run:
                path.unlink(missing_ok=True)
    return tally


def _by_file_time(paths: list[Path], root: Path, window_days: float, dry_run: bool) -> _Tally:
    cutoff_s = time.time() - window_days * 86_400
    tally = _Tally()
    for path in paths:
        info = path.stat()
        if info.st_mtime < cutoff_s:
            tally.add(str(path.relative_to(root)), info.st_size)
            if not dry_run:
                path.unlink(missing_ok=True)
    return tally


def _topics(workspace: Workspace, policy: RetentionPolicy, now_ms: int, dry_run: bool) -> dict[str, Any]:
    """Put the configured windows on the existing topics, count what they expire, then clean up."""
    log = open_existing_log(workspace)
    if log is None:
        return {}
    report: dict[str, Any] = {}
    with log:
        # A broker expires records against its wall clock: windows put on while the event time runs
        # far behind it (a simulated world) would delete records as they arrive, so they wait.
        behind_ms = int(time.time() * 1000) - now_ms
        apply = log.retention_clock == "event" or abs(behind_ms) < MS_PER_DAY
        present = set(log.topics())
        for topic, days in policy.topics.items():
            if topic not in present:
                continue
            window = days_to_ms(days)
            if not dry_run and apply:
                log.set_retention(topic, window)
            count = size = 0
            if window is not None:
                count, size = _expiring(log, topic, now_ms - window)
            report[topic] = {"retention_days": days, "count": count, "bytes": size}
            if not apply:
                report[topic]["skipped"] = f"the broker's clock is {behind_ms / MS_PER_DAY:.1f} days past the event time"
        if not dry_run:
            log.cleanup(now_ms)
    return report


def _expiring(log: Any, topic: str, cutoff_ms: int) -> tuple[int, int]:
    """Records the log's retention rule deletes at `cutoff_ms`: from each partition's start up to
    the first record at or after the cutoff (as `gpurec.stream.log` specifies it)."""
    count = size = 0
    starts = log.start_offsets(topic)
    for partition, end in log.end_offsets(topic).items():
        offset = starts[partition]
        while offset < end:
            batch = log.read(topic, partition, offset, 5_000)
            if not batch:
                break
            for record in batch:
                if record.timestamp_ms >= cutoff_ms:
                    offset = end
                    break
                count += 1
                size += len(record.value) + 16  # key and timestamp: 8 bytes each
            else:
                offset = batch[-1].offset + 1
    return count, size


def enforce(workspace: Workspace, now_ms: int | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Delete (or with `dry_run` only count) everything older than its window; returns the report."""
    policy = workspace_policy(workspace)
    source = "--now"
    if now_ms is None:
        now_ms, source = newest_event_ms(workspace), "newest event in the workspace"
        if now_ms is None:
            raise InvalidInput(f"workspace {workspace.root} holds no events to date 'now' from; give --now")
    days = policy.datasets
    cutoff = {key: now_ms - days_to_ms(value) for key, value in days.items()}  # type: ignore[operator]
    deleted = {
        "raw": _raw(workspace, cutoff["raw_days"], dry_run).to_json(),
        "features": _features(workspace, cutoff["features_days"], dry_run).to_json(),
        "sync": _sync(workspace, cutoff["sync_days"], dry_run).to_json(),
        "process_logs": _by_file_time(sorted(workspace.live.glob("*.log")), workspace.root, days["process_logs_days"], dry_run).to_json(),
        "exports": _by_file_time(sorted(workspace.privacy.glob("export-*.json")), workspace.root, days["exports_days"], dry_run).to_json(),
    }
    topics = _topics(workspace, policy, now_ms, dry_run)
    checkpoints = [p for run in workspace.runs for p in sorted((run / "checkpoints").glob("step-*")) if p.is_dir()]
    return {
        "workspace": str(workspace.root),
        "now": iso(now_ms),
        "now_source": source,
        "dry_run": dry_run,
        "windows_days": {**days, "topics": dict(policy.topics)},
        "deleted": deleted,
        "topics": topics,
        "total": {
            "count": sum(d["count"] for d in deleted.values()) + sum(t["count"] for t in topics.values()),
            "bytes": sum(d["bytes"] for d in deleted.values()) + sum(t["bytes"] for t in topics.values()),
        },
        "kept": {"checkpoints": {"count": len(checkpoints), "bytes": sum(_size(p) for p in checkpoints),
                                  "note": "pruned to each run's keep when written"}},
    }  # fmt: skip


__all__ = [
    "DATASET_RETENTION_DAYS",
    "RetentionPolicy",
    "enforce",
    "newest_event_ms",
    "parse_now",
    "retention_policy",
    "workspace_policy",
]
