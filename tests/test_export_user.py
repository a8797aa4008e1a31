"""`gpurec export-user`: a user's observed data from every place a workspace keeps it, and nobody else's."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from gpurec.cli import main
from gpurec.data.generate import generate_synthetic
from gpurec.data.logs import read
from gpurec.data.pseudonym import Pseudonymizer, new_key_file
from gpurec.data.schema import day_start_ms
from gpurec.data.world import WorldConfig
from gpurec.features.store import open_feature_store
from gpurec.serve.consent import create_consent_topic
from gpurec.stream.join import ACTIONS, CONSENT, EXAMPLES, SERVED, ensure_topics
from gpurec.stream.local import LocalEventLog
from gpurec.stream.log import Record
from gpurec.stream.records import (
    Action,
    ConsentChange,
    Example,
    ModelInputs,
    ServedRow,
    encode,
    encode_inputs,
)

DAY0 = day_start_ms("2026-01-05")


def _served(user: int, request: int, ts: int) -> ServedRow:
    inputs = encode_inputs(ModelInputs(dense=(0.5, 1.5), sparse={"user_id": (user % 1000,), "item_id": (request,)}))
    return ServedRow(request, 10 + request, user, ts, 0, "1", 30_000, True, inputs)


def _log_user(log: LocalEventLog, user: int, base: int) -> dict[str, int]:
    """Two served rows, one action, one example and two consent changes of `user`."""
    served = [_served(user, base + i, DAY0 + 3_600_000 * (i + 1)) for i in range(2)]
    log.append(SERVED, [Record(user, encode(row), row.ts_ms) for row in served])
    action = Action(base, base, 10 + base, user, served[0].ts_ms + 5_000, 12_000, True, False, False, False, False)
    log.append(ACTIONS, [Record(user, encode(action), action.ts_ms)])
    example = Example(served[0], True, False, False, False, False, False, 12_000, 1, False, action.ts_ms)
    log.append(EXAMPLES, [Record(user, encode(example), served[0].ts_ms)])
    changes = [ConsentChange(user, False, DAY0 + 9_000_000, True), ConsentChange(user, True, DAY0 + 7_000_000, False)]
    log.append(CONSENT, [Record(user, encode(c), c.ts_ms) for c in changes])  # appended out of event order
    return {"served": 2, "actions": 1, "examples": 1, "consent": 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, int, int]:
    """A 3-day, 50-user world's raw logs, an event log and a feature store; (dir, user, other user)."""
    root = tmp_path_factory.mktemp("ws")
    generate_synthetic(WorldConfig(users=50, items=100, days=3, seed=5), root / "raw")
    impressions = read(root / "raw", "impressions")
    counts = pc.value_counts(impressions["user_id"]).to_pylist()
    user, other = (c["values"] for c in sorted(counts, key=lambda c: -c["counts"])[:2])
    (root / "live").mkdir()
    with LocalEventLog(root / "live" / "log.db") as log:
        ensure_topics(log, 4)
        create_consent_topic(log, 4)
        _log_user(log, user, 100)
        _log_user(log, other, 200)
    with open_feature_store(f"sqlite:///{root / 'live' / 'features.db'}") as store:
        store.put_users(read(root / "raw", "users"))
        store.set_consent(user, personalisation=False)
    return root, user, other


def test_export_holds_the_users_data_from_every_source_and_nobody_elses(workspace, capsys):
    root, user, other = workspace
    assert main(["export-user", "--workspace", str(root), "--user", str(user)]) == 0
    path = root / "privacy" / f"export-{user}.json"
    assert str(path) in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # personal data: owner only
    export = json.loads(path.read_text())
    assert export["user"] == {"user_id": user, "pseudonymous_id": None, "pseudonym_key_id": None}

    # Raw logs: exactly the user's impressions, and the actions on them (actions carry no user id).
    impressions = read(root / "raw", "impressions")
    mine = impressions.filter(pc.equal(impressions["user_id"], user))
    raw = export["raw_logs"]
    assert len(raw["impressions"]) == mine.num_rows > 0
    assert {r["user_id"] for r in raw["impressions"]} == {user}
    actions = read(root / "raw", "actions")
    keys = set(zip(mine["request_id"].to_pylist(), mine["item_id"].to_pylist(), strict=True))
    expected = sum((r, i) in keys for r, i in zip(actions["request_id"].to_pylist(), actions["item_id"].to_pylist(), strict=True))
    assert len(raw["actions"]) == expected > 0
    assert [u["user_id"] for u in raw["users"]] == [user]

    # The event log: the user's records only, decoded.
    log = export["event_log"]
    assert (len(log["served"]), len(log["actions"]), len(log["examples"])) == (2, 1, 1)
    assert {r["user_id"] for r in log["served"] + log["actions"]} == {user}
    assert log["served"][0]["inputs"]["dense"] == [0.5, 1.5]
    assert log["examples"][0]["like"] is True and "served" not in log["examples"][0]
    # Consent history in event-time order, whatever order it was appended in.
    assert [(c["training"], c["ts_ms"]) for c in export["consent_history"]] == [(True, DAY0 + 7_000_000), (False, DAY0 + 9_000_000)]

    # The feature store's profile, including the consent change made there.
    profile = export["profile"]
    assert profile["known"] and profile["consent"] == {"personalisation": False, "training": True}
    assert set(profile["counters"]) == {"n", "likes", "finishes"}
    assert "embedding" not in json.dumps({k: v for k, v in export.items() if k != "not_exported"})
    assert str(other) not in path.read_text()


def test_out_file_and_json_summary(workspace, tmp_path, capsys):
    root, user, _ = workspace
    out = tmp_path / "mine.json"
    assert main(["export-user", "--workspace", str(root), "--user", str(user), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"] == str(out) and summary["counts"]["event_log_served"] == 2
    assert json.loads(out.read_text())["user"]["user_id"] == user


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--user", "424242"], "user 424242 is not in workspace"),
        (["--user", "x"], "--user"),
    ],
)
def test_unknown_user_or_bad_id_is_one_line_exit_2(workspace, capsys, argv, message):
    root, _, _ = workspace
    assert main(["export-user", "--workspace", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpurec export-user: ") and message in err and err.count("\n") == 1


def test_bad_workspace_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export-user", "--workspace", str(tmp_path / "missing"), "--user", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpurec export-user: ") and "does not exist" in err and err.count("\n") == 1
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "workspace.toml").write_text("retention_days = 3\n")
    assert main(["export-user", "--workspace", str(tmp_path / "ws"), "--user", "1"]) == 2
    assert "unknown keys" in capsys.readouterr().err


def test_pseudonymous_workspace_is_searched_by_the_users_pseudonym(tmp_path, capsys):
    """Logs keyed by pseudonyms: the raw id finds the user only through the key."""
    key = new_key_file(tmp_path / "key")
    raw_id = 777
    pseudonym = Pseudonymizer(key.read_text().strip().encode()).pseudonym(raw_id)
    (tmp_path / "ws" / "live").mkdir(parents=True)
    with LocalEventLog(tmp_path / "ws" / "live" / "log.db") as log:
        ensure_topics(log, 2)
        create_consent_topic(log, 2)
        _log_user(log, pseudonym, 300)
    argv = ["export-user", "--workspace", str(tmp_path / "ws"), "--user", str(raw_id)]
    assert main(argv) == 2  # without the key nothing is stored under 777
    capsys.readouterr()
    assert main([*argv, "--pseudonym-key-file", str(key), "--json"]) == 0
    export = json.loads(Path(json.loads(capsys.readouterr().out)["path"]).read_text())
    assert export["user"]["pseudonymous_id"] == pseudonym and len(export["event_log"]["served"]) == 2
    assert pa.array([r["user_id"] for r in export["event_log"]["served"]]).unique().to_pylist() == [pseudonym]


def test_raw_logs_of_another_key_are_refused(tmp_path, capsys):
    key, other = new_key_file(tmp_path / "key"), new_key_file(tmp_path / "other")
    generate_synthetic(WorldConfig(users=20, items=40, days=1, seed=9), tmp_path / "ws" / "raw",
                       pseudonymizer=Pseudonymizer(key.read_text().strip().encode()))  # fmt: skip
    argv = ["export-user", "--workspace", str(tmp_path / "ws"), "--user", "3"]
    assert main([*argv, "--pseudonym-key-file", str(other)]) == 2
    assert "different pseudonym keys" in capsys.readouterr().err
    assert main(argv) == 2  # a raw id, no key: the logs hold pseudonyms
    assert "give --pseudonym-key-file" in capsys.readouterr().err
