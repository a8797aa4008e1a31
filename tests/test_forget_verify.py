"""The forget verifier (`gpurec.privacy.verify`): finds a user in every kind of artifact of a workspace,
finds nothing once the artifact is rewritten without them, and fails closed on what it cannot read.

Every test works on its own copy of one tiny workspace (a generated 50-user world and its features)
and plants or removes the user's data with the project's own writers (event log, feature store,
DCP, deltas, TorchScript), so the formats are the real ones.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import polars as pl
import pytest
import torch
from test_feature_store import redis_server  # noqa: F401 (fixture)

from gpurec.data.generate import generate_synthetic
from gpurec.data.hashing_core import hash_id
from gpurec.data.pseudonym import Pseudonymizer
from gpurec.data.world import WorldConfig
from gpurec.features.store import open_feature_store
from gpurec.preprocess.run import preprocess
from gpurec.privacy.verify import Trace, find_traces, id_forms, verify_report
from gpurec.stream.joiner_state import (
    CONSENT_PREFIX,
    ROW_PREFIX,
    ConsentState,
    RowState,
    encode_state,
    pack_key,
    pack_user,
)
from gpurec.stream.log import Record, open_event_log
from gpurec.stream.records import (
    Action,
    ConsentChange,
    DeadLetter,
    Example,
    ModelInputs,
    ServedRow,
    encode,
    encode_inputs,
)
from gpurec.sync.deltafile import write_delta
from gpurec.workspace import Workspace

KEY = b"k" * 32  # a test pseudonym key (the key itself is never written into the workspace)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "ws"
    generate_synthetic(WorldConfig(users=50, items=100, days=3, seed=5), root / "raw")
    preprocess(root / "raw", root / "features", engine="cpu")
    return root


@pytest.fixture()
def ws(base, tmp_path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(base, root)
    (root / "live").mkdir()
    return Workspace.open(root)


def users_of(ws: Workspace) -> tuple[int, int]:
    """Two users with impressions in the train split: the one to forget and another."""
    frame = pl.read_parquet(ws.features / "train" / "**" / "*.parquet")
    counts = frame.group_by("user_id").len().sort(["len", "user_id"], descending=True)
    return int(counts["user_id"][0]), int(counts["user_id"][1])


def kinds(traces: list[Trace]) -> set[str]:
    return {t.kind for t in traces}


def rewrite_parquet_without(root: Path, user: int) -> None:
    for path in sorted(root.rglob("*.parquet")):
        frame = pl.read_parquet(path)
        if "user_id" in frame.columns:
            frame.filter(pl.col("user_id") != user).write_parquet(path)


def test_forms_name_every_id_a_user_takes() -> None:
    pseudo = Pseudonymizer(KEY).pseudonym(7)
    forms = id_forms(7, pseudo, table_keys=[123])
    assert forms[7] == "raw id" and forms[pseudo] == "pseudonymous id" and forms[123] == "table key"
    assert forms[hash_id(7, "user_id")].startswith("hashed raw id")
    assert forms[hash_id(pseudo, "user_id")].startswith("hashed pseudonymous id")


def test_parquet_raw_and_features(ws) -> None:
    user, other = users_of(ws)
    found = find_traces(ws, user)
    where = {(t.kind, t.where) for t in found}
    assert ("raw", "column user_id") in where  # users and impressions logs
    assert ("features", "column user_id") in where and ("features", "column sparse_user_id") in where
    assert {t.matched for t in found if t.where == "column sparse_user_id"} == {id_forms(user)[hash_id(user, "user_id")]}
    assert any(t.artifact.startswith("raw/users/day=") for t in found)  # hive partitions are walked
    rewrite_parquet_without(ws.root, user)
    assert find_traces(ws, user) == []
    assert {"raw", "features"} <= kinds(find_traces(ws, other))  # the other user is still there


def _served(user: int, request: int, item: int, ts: int) -> ServedRow:
    inputs = encode_inputs(ModelInputs((0.5,) * 8, {"user_id": (hash_id(user, "user_id"),), "item_id": (hash_id(item, "item_id"),)}))
    return ServedRow(request, item, user, ts, 0, "v1", 9000, True, inputs)


def fill_log(url: str, user: int, other: int, garbage_payload: bytes) -> None:
    """One record of every topic for `user` and `other`, a dead letter of each, joiner state of both."""
    with open_event_log(url) as log:
        for topic in ("served", "actions", "consent", "examples", "joiner.dead_letter", "items"):
            log.create_topic(topic, 2)
        records: dict[str, list[Record]] = {t: [] for t in ("served", "actions", "consent", "examples", "joiner.dead_letter")}
        state: dict[bytes, bytes] = {}
        for n, u in enumerate((user, other)):
            served = _served(u, 100 + n, 7, 1_000 + n)
            action = Action(500 + n, 100 + n, 7, u, 1_500 + n, 3000, True, False, False, False, False)
            records["served"].append(Record(u, encode(served), served.ts_ms))
            records["actions"].append(Record(u, encode(action), action.ts_ms))
            records["consent"].append(Record(u, encode(ConsentChange(u, False, 2_000, forget=u == user)), 2_000))
            example = Example(served, True, False, False, False, False, False, 3000, 1, False)
            records["examples"].append(Record(u, encode(example), served.ts_ms))
            letter = DeadLetter("action", "outside window", encode(action))
            records["joiner.dead_letter"].append(Record(u, encode(letter), action.ts_ms))
            state[CONSENT_PREFIX + pack_user(u)] = encode_state(ConsentState(False, 2_000))
            state[ROW_PREFIX + pack_key(100 + n, 7)] = encode_state(RowState(n, served.ts_ms, u, served))
        # a dead letter whose payload is not a record at all: raw input naming the user (key 0: unknown)
        records["joiner.dead_letter"].append(Record(0, encode(DeadLetter("action", "undecodable", garbage_payload)), 0))
        for topic, batch in records.items():
            log.append(topic, batch)
        log.append("items", [Record(7, b"item seven", 0)])
        log.commit("joiner", {("served", 0): 1}, state_changes={("served", 0): state})


def test_event_log_records_dead_letters_and_joiner_state(ws) -> None:
    user, other = users_of(ws)
    fill_log(ws.event_log_url, user, other, b'{"user_id": %d, "item": 7}' % user)
    found = [t for t in find_traces(ws, user) if t.artifact == "live/log.db"]
    where = {t.where.split("] ", 1)[-1] for t in found if t.kind == "event_log"}
    assert {"record key", "user_id", "inputs.sparse.user_id", "served.user_id", "served.inputs.sparse.user_id"} <= where
    assert "user_id (forget request)" in where  # the consent topic's forget request is itself a trace
    assert {"dead letter user_id", "dead letter payload bytes"} <= where
    state = {t.where for t in found if t.kind == "joiner_state"}
    assert any("consent key" in w for w in state) and any("row user_id" in w for w in state)
    assert {"sqlite", "bytes"} <= kinds(found)  # every table and column of the db file, and its bytes

    # A plain DELETE leaves the rows' bytes in the file's free space: the readers find nothing, the
    # byte scan still does (what secure_delete + a WAL checkpoint are for).
    with sqlite3.connect(ws.live / "log.db") as db:
        db.execute("PRAGMA secure_delete = OFF")
        db.execute("DELETE FROM records WHERE key IN (?, 0)", (user,))
        db.execute("DELETE FROM state")
    with sqlite3.connect(ws.live / "log.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    residue = [t for t in find_traces(ws, user) if t.artifact.startswith("live/")]
    assert kinds(residue) == {"bytes"} and {t.artifact for t in residue} == {"live/log.db"}
    # Removing the user: the log rebuilt with the other user's records only.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{ws.live / 'log.db'}{suffix}").unlink(missing_ok=True)
    fill_log(ws.event_log_url, other, other + 1, b"{}")
    assert [t for t in find_traces(ws, user) if t.artifact.startswith("live/")] == []
    assert "event_log" in kinds(find_traces(ws, other))


def test_small_raw_ids_match_only_fields_naming_a_user(ws) -> None:
    user = 7  # also an item id, a key of the items topic and a count below
    (ws.train).mkdir()
    (ws.train / "metrics.jsonl").write_text('{"step": 7, "user_n": 7, "users": 7, "item_id": 7}\n')
    fill_log(ws.event_log_url, 8, 9, b"no user here")
    assert find_traces(ws, user) == []
    (ws.train / "metrics.jsonl").write_text('{"step": 7}\n{"note": "forgot", "user_id": 7}\n')
    found = find_traces(ws, user)
    assert [(t.kind, t.artifact, t.first) for t in found] == [("text", "train/metrics.jsonl", "line 2")]


def _profiles(ws: Workspace, users: list[int]) -> pl.DataFrame:
    return pl.read_parquet(ws.raw / "users" / "**" / "*.parquet").filter(pl.col("user_id").is_in(users))


def _impressions(ws: Workspace, users: list[int]) -> pl.DataFrame:
    frame = pl.read_parquet(ws.raw / "impressions" / "**" / "*.parquet").filter(pl.col("user_id").is_in(users))
    return frame.select("request_id", "item_id", "user_id", "ts").sort("ts").group_by("user_id", maintain_order=True).head(20)


def test_sqlite_feature_store(ws) -> None:
    user, other = users_of(ws)
    profiles, impressions = _profiles(ws, [user, other]), _impressions(ws, [user, other])
    rewrite_parquet_without(ws.root, user)  # only the store holds the user now
    store = open_feature_store(ws.feature_store_url)
    store.put_users(profiles)
    store.put_items(pl.read_parquet(ws.raw / "items" / "**" / "*.parquet"))
    store.record_impressions(impressions)
    store.close()
    found = find_traces(ws, user)
    columns = {t.where for t in found if t.kind == "feature_store"}
    assert {"table users column user_id", "table impressions column user_id", "table users column s_user_id"} <= columns
    # rewritten by the store's own erasure and then compacted (VACUUM drops the freed pages)
    store = open_feature_store(ws.feature_store_url)
    store.forget_user(user)
    store.close()
    with sqlite3.connect(ws.live / "features.db") as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
    assert find_traces(ws, user) == []
    assert "feature_store" in kinds(find_traces(ws, other))




def test_redis_feature_store(ws, redis_server) -> None:  # noqa: F811 (the fixture)
    user, other = users_of(ws)
    profiles, impressions = _profiles(ws, [user, other]), _impressions(ws, [user, other])
    rewrite_parquet_without(ws.root, user)
    url = redis_server.url(db=2)
    (ws.root / "workspace.toml").write_text(f'feature_store = "{url}"\n')
    ws = Workspace.open(ws.root)
    store = open_feature_store(url)
    store.put_users(profiles)
    store.put_items(pl.read_parquet(ws.raw / "items" / "**" / "*.parquet"))
    store.record_impressions(impressions)
    found = [t for t in find_traces(ws, user) if t.kind == "feature_store"]
    assert {"key u:<id>", "impression record user_id", "value bytes"} <= {t.where for t in found}
    assert all(t.artifact == url for t in found)
    store.forget_user(user)
    store.close()
    assert find_traces(ws, user) == []
    assert "feature_store" in kinds(find_traces(ws, other))


class _Served(torch.nn.Module):
    def __init__(self, keys: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("remap_keys", keys)
        self.weight = torch.nn.Parameter(torch.zeros(len(keys), 4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[torch.searchsorted(self.remap_keys, ids)]


def plant_torch(ws: Workspace, keys: list[int]) -> None:
    """A DCP checkpoint with id-map keys, a rows delta and a snapshot, and a TorchScript model."""
    import torch.distributed.checkpoint as dcp

    tensor = torch.tensor(sorted(keys), dtype=torch.int64)
    for run in ws.runs:
        step = run / "checkpoints" / "step-00000001"
        shutil.rmtree(step, ignore_errors=True)
        state = {"model": {"w": torch.zeros(3, 4)}, "ids": {"p0.keys": tensor.clone(), "p0.row_counts": torch.tensor([7, 9])}}
        dcp.save(state, checkpoint_id=str(step))
    write_delta(ws.sync, 1, "rows", [("remap.keys", torch.arange(len(keys)), tensor)])
    write_delta(ws.sync, 2, "snapshot", [("remap.keys", None, tensor), ("w", None, torch.ones(3))])
    model = ws.repo / "ranker" / "1" / "model.pt"
    model.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(_Served(tensor)).save(str(model))


def test_checkpoints_deltas_and_model_repository(ws) -> None:
    user, other = users_of(ws)
    rewrite_parquet_without(ws.root, user)
    key, other_key = hash_id(user, "user_id"), hash_id(other, "user_id")
    plant_torch(ws, [key, other_key, 12345])
    found = find_traces(ws, user, table_keys=[key])
    where = {(t.kind, t.artifact, t.where) for t in found}
    for run in ("train", "online"):
        assert ("checkpoint", f"{run}/checkpoints/step-00000001", "tensor ids.p0.keys") in where
    assert ("delta", "live/sync/000000001.rows.delta", "tensor remap.keys") in where
    assert ("delta", "live/sync/000000002.snapshot.delta", "tensor remap.keys") in where
    assert ("model", "repo/ranker/1/model.pt", "tensor remap_keys") in where
    assert {t.matched for t in found if t.kind != "bytes"} == {"hashed raw id (sparse_user_id / id-map key)"}
    plant_torch(ws, [other_key, 12345])  # rewritten without the user's key
    assert find_traces(ws, user, table_keys=[key]) == []
    assert {"checkpoint", "delta", "model"} <= kinds(find_traces(ws, other))


def test_text_exports_and_unknown_artifacts(ws) -> None:
    user, _ = users_of(ws)
    pseudo = Pseudonymizer(KEY).pseudonym(user)
    rewrite_parquet_without(ws.root, user)
    ws.privacy.mkdir()
    export = ws.privacy / f"export-user-{user}.json"
    export.write_text(json.dumps({"user_id": user, "events": []}))
    (ws.live / "feed.log").write_text(f"served user={pseudo} 6 items\n")
    (ws.live / "cache.bin").write_bytes(b"\x00junk" + pseudo.to_bytes(8, "little") + b"tail")
    found = find_traces(ws, user, pseudo)
    where = {(t.kind, t.artifact, t.where, t.matched) for t in found}
    assert ("privacy", "privacy/export-user-<raw id>.json", "file name", "raw id") in where  # ids redacted
    assert ("privacy", "privacy/export-user-<raw id>.json", "a user field", "raw id") in where
    assert ("text", "live/feed.log", "a user field", "pseudonymous id") in where
    assert ("bytes", "live/cache.bin", "file bytes (decimal / int64 LE / BE)", "pseudonymous id") in where
    export.unlink()
    (ws.live / "feed.log").write_text("served user=1 6 items\n")
    (ws.live / "cache.bin").write_bytes(b"\x00junk")
    assert find_traces(ws, user, pseudo) == []


def test_unreadable_artifacts_fail_closed(ws) -> None:
    user, _ = users_of(ws)
    rewrite_parquet_without(ws.root, user)
    assert verify_report(ws, user)["verdict"] is True
    (ws.features / "train" / "day=2099-01-01").mkdir()
    (ws.features / "train" / "day=2099-01-01" / "part-00000.parquet").write_bytes(b"PAR1 torn")
    (ws.live / "log.db").write_bytes(b"not a database at all" * 10)
    ws.sync.mkdir(parents=True)
    (ws.sync / "000000003.rows.delta").write_bytes(b'{"format": 1}\ntorn')
    report = verify_report(ws, user)
    assert report["verdict"] is False and report["unreadable"] >= 3
    unreadable = {t["artifact"] for t in report["traces"] if t["kind"] == "unreadable"}
    assert {"features/train/day=2099-01-01/part-00000.parquet", "live/log.db", "live/sync/000000003.rows.delta"} <= unreadable
    # an unreachable feature store server is unreadable too, not "nothing found"
    (ws.root / "live" / "log.db").unlink()
    shutil.rmtree(ws.features / "train" / "day=2099-01-01")
    (ws.sync / "000000003.rows.delta").unlink()
    (ws.root / "workspace.toml").write_text('feature_store = "redis://127.0.0.1:9/0"\n')
    report = verify_report(Workspace.open(ws.root), user)
    assert report["verdict"] is False
    assert [(t["kind"], t["artifact"], t["where"]) for t in report["traces"]] == [("unreadable", "redis://127.0.0.1:9/0", "feature_store")]


def test_report_is_json_and_never_names_the_ids(ws) -> None:
    user, other = users_of(ws)
    fill_log(ws.event_log_url, user, other, b"{}")
    report = verify_report(ws, user, table_keys=[hash_id(user, "user_id")])
    text = json.dumps(report)
    assert report["verdict"] is False and report["verified"] is False and report["traces"]
    assert str(user) not in text and str(hash_id(user, "user_id")) not in text
    assert {"raw", "features", "event_log", "joiner_state", "sqlite", "bytes"} <= set(report["searched"])
    assert report["searched"]["raw"] > 50  # every partition file of the raw logs
    # excluding a path is the caller's explicit choice, and the report says so
    receipt = ws.root / "receipt.json"
    receipt.write_text(json.dumps({"user_id": user}))
    report = verify_report(ws, user, exclude=[receipt])
    assert not any(t["artifact"] == "receipt.json" for t in report["traces"])
    assert "excluded by the caller: receipt.json" in report["notes"]


def test_kafka_event_log_and_its_state_changelogs(ws, tmp_path_factory) -> None:
    from gpurec.stream.broker import KafkaBroker

    user, other = users_of(ws)
    rewrite_parquet_without(ws.root, user)
    with KafkaBroker(tmp_path_factory.mktemp("kafka")) as broker:
        (ws.root / "workspace.toml").write_text(f'event_log = "{broker.url}"\n')
        ws = Workspace.open(ws.root)
        fill_log(ws.event_log_url, user, other, b"{}")
        found = find_traces(ws, user)
        assert {t.artifact for t in found} == {broker.url}
        where = {t.where.split("] ", 1)[-1] for t in found if t.kind == "event_log"}
        assert {"record key", "user_id", "served.inputs.sparse.user_id", "dead letter user_id"} <= where
        state = {t.where for t in found if t.kind == "joiner_state"}
        assert any("joiner/served[0] consent key" in w for w in state)
        assert find_traces(ws, 424242424242) == []  # nobody else's records are a trace
    (ws.root / "workspace.toml").write_text(f'event_log = "{broker.url}?timeout_s=2"\n')
    report = verify_report(Workspace.open(ws.root), user)  # the broker is gone: unreadable, not clean
    assert report["verdict"] is False
    assert [(t["kind"], t["where"]) for t in report["traces"]] == [("unreadable", "event_log")]
