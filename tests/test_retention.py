"""Retention: windows per topic and dataset, validated from workspace.toml and enforced by `gpurec retention`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from gpurec.cli import main
from gpurec.data.generate import generate_synthetic
from gpurec.data.logs import day_files, list_days
from gpurec.data.schema import MS_PER_DAY, day_start_ms
from gpurec.data.world import WorldConfig
from gpurec.errors import InvalidInput
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.run import preprocess
from gpurec.privacy.retention import DATASET_RETENTION_DAYS, enforce, retention_policy
from gpurec.serve.consent import CONSENT_TOPIC
from gpurec.serve.items import ITEMS_TOPIC
from gpurec.stream.join import ACTIONS, CONSENT, DEAD_LETTER, EXAMPLES, SERVED, ensure_topics
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import Record
from gpurec.stream.quix_join import TICKS
from gpurec.stream.retention import TOPIC_RETENTION_DAYS, retention_ms
from gpurec.sync.deltafile import list_deltas, write_delta
from gpurec.sync.online import DEAD_LETTER_TOPIC
from gpurec.sync.publish import SYNC_TOPIC
from gpurec.workspace import Workspace

DAY = MS_PER_DAY
START = day_start_ms("2026-01-05")  # the world's first day; it has days 01-05 .. 01-07
NOW = "2026-01-07T12:00:00Z"  # with 1-day windows: cutoff 01-06 12:00, so day 01-05 expires, 01-06 stays
NOW_MS = START + 2 * DAY + DAY // 2
EXPIRED = b"an-expired-served-row-0123456789"


def _records(log: LocalEventLog, topic: str) -> list[int]:
    """Timestamps of every record still held in `topic`."""
    out = []
    for partition in log.end_offsets(topic):
        out += [r.timestamp_ms for r in log.read(topic, partition, 0, 10_000)]
    return sorted(out)


# ---- the policy ----------------------------------------------------------------------------------


def test_topic_names_match_the_stages_that_create_them():
    stages = {SERVED, ACTIONS, EXAMPLES, DEAD_LETTER, CONSENT, CONSENT_TOPIC, SYNC_TOPIC, DEAD_LETTER_TOPIC, ITEMS_TOPIC, TICKS}
    assert stages == set(TOPIC_RETENTION_DAYS)
    assert TOPIC_RETENTION_DAYS[CONSENT] > max(DATASET_RETENTION_DAYS["raw_days"], TOPIC_RETENTION_DAYS[SERVED])


def test_policy_defaults_overrides_and_refusals():
    policy = retention_policy({"raw_days": 30, "topics": {"served": 2.5}})
    assert policy.datasets["raw_days"] == 30 and policy.datasets["features_days"] == DATASET_RETENTION_DAYS["features_days"]
    assert policy.topics["served"] == 2.5 and policy.topics["actions"] == TOPIC_RETENTION_DAYS["actions"]
    for bad, message in [
        ({"raw_dayz": 3}, "unknown keys ['raw_dayz']"),
        ({"raw_days": 0}, "raw_days must be a number of days > 0"),
        ({"raw_days": -1}, "> 0"),
        ({"raw_days": True}, "> 0"),
        ({"raw_days": "90"}, "> 0"),
        ({"topics": {"servd": 3}}, "unknown topics ['servd']"),
        ({"topics": {"served": 0}}, "> 0"),
        ({"topics": 3}, "must be a table"),
    ]:
        with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
            retention_policy(bad)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[retention]\nraw_dayz = 3\n", "unknown keys ['raw_dayz']"),
        ("[retention]\nraw_days = 0\n", "raw_days must be a number of days > 0"),
        ("[retention.topics]\nserved = -2\n", "served must be a number of days > 0"),
        ("retention = 5\n", "[retention] must be a table"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, toml, message):
    (tmp_path / "workspace.toml").write_text(toml)
    assert main(["retention", "--workspace", str(tmp_path), "--now", NOW]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpurec retention: ") and message in err and err.count("\n") == 1


def test_bad_now_and_missing_workspace_are_exit_2(tmp_path, capsys):
    assert main(["retention", "--workspace", str(tmp_path), "--now", "yesterday"]) == 2
    assert "--now must be an ISO-8601" in capsys.readouterr().err
    assert main(["retention", "--workspace", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["retention", "--workspace", str(tmp_path)]) == 2  # empty: not a workspace at all
    assert "not a gpurec workspace" in capsys.readouterr().err
    (tmp_path / "raw").mkdir()
    assert main(["retention", "--workspace", str(tmp_path)]) == 2  # no events to date "now" from
    assert "give --now" in capsys.readouterr().err


def test_topics_are_created_with_their_retention(tmp_path):
    """The joiner's topics carry the default windows from creation: cleanup alone expires old records."""
    with LocalEventLog(tmp_path / "log.db", cleanup_interval_s=None) as log:
        ensure_topics(log, 1)
        now = START + 30 * DAY
        old, young = now - 8 * DAY, now - 6 * DAY  # served keeps 7 days
        log.append(SERVED, [Record(1, b"old", old), Record(1, b"young", young)])
        log.cleanup(now)
        assert _records(log, SERVED) == [young]
    assert retention_ms(SERVED) == 7 * DAY and retention_ms(ITEMS_TOPIC) is None
    assert retention_ms(SERVED, {SERVED: 0.5}) == DAY // 2


def test_automatic_cleanup_measures_windows_in_the_topics_event_time(tmp_path):
    """A simulated world dated months before the wall clock keeps its young records when the log
    cleans up by itself; a bogus future timestamp does not expire the topic (wall-clock cap)."""
    with LocalEventLog(tmp_path / "log.db", cleanup_interval_s=None) as log:
        ensure_topics(log, 1)
        old, young = START + 3_600_000, START + 8 * DAY + 3_600_000  # January 2026, well in the past
        log.append(SERVED, [Record(1, b"old", old), Record(1, b"young", young)])
        log.cleanup()
        assert _records(log, SERVED) == [young]
        future = int(time.time() * 1000) + 3650 * DAY
        log.append(ACTIONS, [Record(1, b"now", int(time.time() * 1000) - DAY), Record(1, b"bogus", future)])
        log.cleanup()
        assert len(_records(log, ACTIONS)) == 2


def test_expired_records_are_overwritten_in_the_file(tmp_path):
    """Retention deletes the bytes, not only the rows: the SQLite file keeps no readable copy."""
    with LocalEventLog(tmp_path / "log.db", cleanup_interval_s=None) as log:
        log.create_topic(SERVED, 1)
        log.append(SERVED, [Record(1, EXPIRED, START), Record(1, b"young", START + 3 * DAY)])
    with LocalEventLog(tmp_path / "log.db", cleanup_interval_s=None) as log:
        log.set_retention(SERVED, DAY)
        log.cleanup()
        assert _records(log, SERVED) == [START + 3 * DAY]
    assert EXPIRED not in (tmp_path / "log.db").read_bytes()


# ---- enforcement -----------------------------------------------------------------------------------


def _snapshot(directory: Path, seq: int, kind: str, newest_event_ms: int) -> Path:
    return write_delta(directory, seq, kind, [("w", None, torch.zeros(2))], {"newest_event_ms": newest_event_ms})


@pytest.fixture
def workspace(tmp_path_factory) -> Path:
    """A tiny world's raw logs and features, an event log whose topics predate any retention,
    deltas, process logs and an old export."""
    root = tmp_path_factory.mktemp("ws")
    generate_synthetic(WorldConfig(users=50, items=100, days=3, seed=5), root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    (root / "live").mkdir()
    with LocalEventLog(root / "live" / "log.db", cleanup_interval_s=None) as log:
        for topic in (SERVED, CONSENT):
            log.create_topic(topic, 2)  # no retention: created before windows existed
        log.append(SERVED, [Record(1, EXPIRED, START + 3_600_000), Record(1, b"young", NOW_MS - 3_600_000)])
        log.append(CONSENT, [Record(1, b"old", START + 3_600_000)])
    sync = root / "live" / "sync"
    _snapshot(sync, 1, "snapshot", START)
    _snapshot(sync, 2, "rows", START + DAY // 2)
    _snapshot(sync, 3, "snapshot", START + DAY)
    _snapshot(sync, 4, "rows", NOW_MS)
    torn = _snapshot(sync, 5, "snapshot", NOW_MS)
    torn.write_bytes(torn.read_bytes()[:-3])  # not rebuildable: the snapshot before it stays the base
    old = time.time() - 40 * 86_400
    for name in ("live/joiner.log", "privacy/export-7.json"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("x\n")
        os.utime(root / name, (old, old))
    (root / "live" / "feed.log").write_text("fresh\n")
    (root / "workspace.toml").write_text(
        "[retention]\nraw_days = 1\nfeatures_days = 1\nsync_days = 1\n[retention.topics]\nserved = 1\n"
    )
    return root


def test_retention_deletes_what_is_older_than_its_window_and_keeps_the_rest(workspace, capsys):
    before = {log: list_days(workspace / "raw", log) for log in ("impressions", "actions", "oracle", "users")}
    expired_files = sum(len(day_files(workspace / "raw", log, ["2026-01-05"])) for log in ("impressions", "actions", "oracle"))

    assert main(["retention", "--workspace", str(workspace), "--now", NOW, "--dry-run", "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert {log: list_days(workspace / "raw", log) for log in before} == before  # a dry run deletes nothing
    assert len(list_deltas(workspace / "live" / "sync")) == 5

    assert main(["retention", "--workspace", str(workspace), "--now", NOW, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["now"] == "2026-01-07T12:00:00.000Z" and report["now_source"] == "--now"
    assert {k: v["count"] for k, v in report["deleted"].items()} == {k: v["count"] for k, v in dry["deleted"].items()}

    # Raw: the day older than the window is gone from every event log, younger days stay; the users
    # log (a dimension, partitioned by signup day) is not expired.
    for log in ("impressions", "actions", "oracle"):
        assert list_days(workspace / "raw", log) == [d for d in before[log] if d != "2026-01-05"]
    assert list_days(workspace / "raw", "users") == before["users"]
    assert report["deleted"]["raw"]["count"] == expired_files > 0

    # Features: the expired day's file is deleted and the manifest no longer names it.
    manifest = load_manifest(workspace / "features")
    assert manifest.splits["train"].days == [] and manifest.splits["train"].rows == 0
    assert manifest.splits["valid"].days == ["2026-01-06"] and manifest.splits["valid"].rows > 0
    assert all(path.exists() for split in manifest.splits for path in manifest.split_files(split, workspace / "features"))
    assert not (workspace / "features" / "train" / "day=2026-01-05").exists()

    # Topics: the configured window is put on the existing topic and applied; consent keeps its default.
    with LocalEventLog(workspace / "live" / "log.db", cleanup_interval_s=None) as log:
        assert _records(log, SERVED) == [NOW_MS - 3_600_000]
        assert _records(log, CONSENT) == [START + 3_600_000]
        log.cleanup(NOW_MS + 2 * DAY)  # the window stays on the topic for the log's own cleanups
        assert _records(log, SERVED) == []
    assert report["topics"][SERVED] == {"retention_days": 1.0, "count": 1, "bytes": len(EXPIRED) + 16}

    # Sync: files before the newest rebuildable snapshot (3, since 5 is torn) older than a day go.
    assert [seq for seq, _, _ in list_deltas(workspace / "live" / "sync")] == [3, 4, 5]
    # Files by their own (wall-clock) time: the 40-day-old process log and export go, a fresh log stays.
    assert not (workspace / "live" / "joiner.log").exists() and not (workspace / "privacy" / "export-7.json").exists()
    assert (workspace / "live" / "feed.log").exists()
    assert report["total"]["count"] == sum(v["count"] for v in report["deleted"].values()) + 1

    # Idempotent: a second run finds nothing more.
    assert main(["retention", "--workspace", str(workspace), "--now", NOW, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["count"] == 0


def test_now_defaults_to_the_newest_event_in_the_workspace(workspace):
    import pyarrow.compute as pc

    from gpurec.data.logs import read

    newest_raw = max(pc.max(read(workspace / "raw", log)["ts"]).cast("int64").as_py() for log in ("impressions", "actions"))
    report = enforce(Workspace.open(workspace), dry_run=True)
    assert report["now_source"] == "newest event in the workspace"
    expected = max(newest_raw, NOW_MS - 3_600_000)
    assert report["now"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(expected / 1000)) + f".{expected % 1000:03d}Z"


def test_kafka_topics_get_their_window_from_set_retention_not_at_creation(tmp_path):
    """On Kafka the broker expires records against its wall clock: stages create topics without a
    window (a simulated world's records would go as they arrive), `set_retention` puts one on."""
    from gpurec.stream.broker import KafkaBroker
    from gpurec.stream.kafka import KafkaEventLog

    wall = int(time.time() * 1000)
    with KafkaBroker(tmp_path / "kafka") as broker, KafkaEventLog(broker.bootstrap, topic_config={"segment.ms": "100"}) as log:
        ensure_topics(log, 1)
        log.append(SERVED, [Record(1, b"old", wall - 2 * DAY)])
        time.sleep(0.3)  # the next append rolls the segment (segment.ms=100): only closed ones expire
        log.append(SERVED, [Record(1, b"young", wall)])
        time.sleep(1.0)
        assert log.start_offsets(SERVED) == {0: 0}  # no window at creation: nothing expired
        log.set_retention(SERVED, DAY)
        deadline = time.monotonic() + 30
        while log.start_offsets(SERVED) != {0: 1} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert log.start_offsets(SERVED) == {0: 1}
        assert [r.value for r in log.read(SERVED, 0, 0)] == [b"young"]
