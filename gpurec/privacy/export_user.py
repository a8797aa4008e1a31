"""Access and portability (GDPR Art. 15/20): what the system observed about one user, as JSON.

`export_user(workspace, user_id)` gathers, for the id the platform stores (the pseudonym under the
key when one is given, else the id as given):

- raw logs: the user's profile rows (users log), impressions, and the actions on those impressions
  (actions carry no user id: they are the user's through their request);
- the event log: served rows (with the model inputs logged for them), actions, examples (labels
  only: their inputs are the served rows'), the joiner's dead letters keyed by the user, and the
  consent history (every `ConsentChange`, oldest first). Each topic is keyed by user, so only the
  user's partition is read;
- the online feature store: what it holds of the user (consent flags, counters, hashed profile
  features, the impression records it counts).

Not exported: embedding rows and model weights. They are parameters learnt from many users' data,
not data observed about one; the user's own row is erased by `gpurec forget`.

The export file is personal data: written with mode 0600 under the workspace's privacy/ directory,
deleted by `gpurec forget` and expired by `gpurec retention` (`exports_days`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec

from gpurec.data.pseudonym import Pseudonymizer, check_key_id, read_key_id
from gpurec.errors import InputNotFound
from gpurec.privacy.retention import iso, open_existing_log
from gpurec.workspace import Workspace

NOT_EXPORTED = (
    "embedding rows and model weights: parameters learnt from many users' data, not data observed "
    "about one user (your row is erased with `gpurec forget`)"
)


def export_user(workspace: Workspace, user_id: int, pseudonymizer: Pseudonymizer | None = None) -> dict[str, Any]:
    """The export object of `user_id`; InputNotFound when the workspace holds nothing of them."""
    logged_key = read_key_id(workspace.raw)
    if logged_key is not None and pseudonymizer is not None:  # another key's pseudonym would find nobody
        check_key_id(("the raw logs", logged_key), ("--pseudonym-key-file", pseudonymizer.key_id))
    stored_id = pseudonymizer.pseudonym(user_id) if pseudonymizer is not None else user_id
    raw = _raw(workspace, stored_id)
    events = _event_log(workspace, stored_id)
    consent = events.pop("consent", [])
    profile = _store_profile(workspace, stored_id)
    found = any(raw.values()) or any(events.values()) or consent or (profile or {}).get("known")
    if not found:
        forgotten = " (the feature store has them on its forget deny-list: their data was erased)"
        hint = f" (its ids are pseudonyms of key {logged_key}: give --pseudonym-key-file)" if logged_key and not pseudonymizer else ""
        raise InputNotFound(
            f"user {user_id} is not in workspace {workspace.root}"
            f"{forgotten if (profile or {}).get('forgotten') else hint}"
        )
    return {
        "user": {
            "user_id": user_id,
            "pseudonymous_id": stored_id if pseudonymizer is not None else None,
            "pseudonym_key_id": pseudonymizer.key_id if pseudonymizer is not None else None,
        },
        "generated_at": iso(int(time.time() * 1000)),
        "workspace": str(workspace.root),
        "raw_logs": raw,
        "event_log": events,
        "consent_history": consent,
        "profile": profile,
        "not_exported": NOT_EXPORTED,
        "counts": {
            **{f"raw_{name}": len(rows) for name, rows in raw.items()},
            **{f"event_log_{name}": len(rows) for name, rows in events.items()},
            "consent_changes": len(consent),
        },
    }


def write_export(export: dict[str, Any], path: Path) -> Path:
    """Write atomically, readable by the owner only (it is the user's personal data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(export, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(temporary, path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# ---- raw logs -----------------------------------------------------------------------------------


def _raw(workspace: Workspace, user_id: int) -> dict[str, list[dict[str, Any]]]:
    import polars as pl

    from gpurec.data.logs import scan

    if not workspace.raw.is_dir():
        return {"users": [], "impressions": [], "actions": []}
    users = scan(workspace.raw, "users").filter(pl.col("user_id") == user_id).collect()
    impressions = scan(workspace.raw, "impressions").filter(pl.col("user_id") == user_id).sort("ts").collect()
    keys = impressions.select("request_id", "item_id")
    actions = scan(workspace.raw, "actions").join(keys.lazy(), on=["request_id", "item_id"], how="semi").sort("ts").collect()
    return {"users": users.to_dicts(), "impressions": impressions.to_dicts(), "actions": actions.to_dicts()}


# ---- the event log ------------------------------------------------------------------------------


def _event_log(workspace: Workspace, user_id: int) -> dict[str, list[dict[str, Any]]]:
    from gpurec.stream.join import ACTIONS, CONSENT, DEAD_LETTER, EXAMPLES, SERVED
    from gpurec.stream.log import partition_for
    from gpurec.stream.records import Action, ConsentChange, DeadLetter, Example, ServedRow, decoder

    topics = {SERVED: ServedRow, ACTIONS: Action, EXAMPLES: Example, DEAD_LETTER: DeadLetter, CONSENT: ConsentChange}
    names = {SERVED: "served", ACTIONS: "actions", EXAMPLES: "examples", DEAD_LETTER: "dead_letters", CONSENT: "consent"}
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
    log = open_existing_log(workspace)
    if log is None:
        return out
    with log:
        present = set(log.topics())
        for topic, kind in topics.items():
            if topic not in present:
                continue
            decode = decoder(kind)
            partition = partition_for(user_id, log.partitions(topic))  # keyed by user: only this one
            offset, end = log.start_offsets(topic)[partition], log.end_offsets(topic)[partition]
            while offset < end:
                batch = log.read(topic, partition, offset, 5_000)
                if not batch:
                    break
                offset = batch[-1].offset + 1
                for record in batch:
                    if record.key == user_id:
                        out[names[topic]].append(_readable(record, decode))
    out["consent"].sort(key=lambda change: (change.get("ts_ms", 0), change["offset"]))
    return out


def _readable(record: Any, decode: Any) -> dict[str, Any]:
    from gpurec.errors import InvalidInput
    from gpurec.stream.records import DeadLetter, Example, ServedRow

    where = {"partition": record.partition, "offset": record.offset, "event_time": iso(record.timestamp_ms)}
    try:
        value = decode(record.value)
    except InvalidInput as error:  # still the user's record: shown as it was stored
        return {**where, "undecodable": str(error), "bytes": record.value.hex()}
    if isinstance(value, ServedRow):
        fields = msgspec.structs.asdict(value)
        fields["inputs"] = msgspec.structs.asdict(value.model_inputs())
        return {**where, **fields}
    if isinstance(value, Example):
        fields = {k: v for k, v in msgspec.structs.asdict(value).items() if k != "served"}
        served = value.served
        return {**where, "request_id": served.request_id, "item_id": served.item_id, "ts_ms": served.ts_ms, **fields}
    if isinstance(value, DeadLetter):
        return {**where, "source": value.source, "reason": value.reason, "detail": value.detail, "record": value.record.hex()}
    return {**where, **msgspec.structs.asdict(value)}


# ---- the online feature store -------------------------------------------------------------------


def _store_profile(workspace: Workspace, user_id: int) -> dict[str, Any] | None:
    """What the store holds of the user. Read through `OnlineFeatureStore.read` (any backend); for
    the embedded SQLite store also its stored row and impression records, with a read-only query
    (the store has no public method that returns them)."""
    from gpurec.features.store import open_feature_store

    url = workspace.feature_store_url
    path = Path(url[len("sqlite:///") :].split("?")[0]) if url.startswith("sqlite:///") else None
    if path is not None and not path.exists():
        return None
    with open_feature_store(url) as store:
        rows = store.read(user_id, [], int(time.time() * 1000))
    profile: dict[str, Any] = {
        "store": url if path is None else str(path),
        "known": bool(rows.user_known),
        "forgotten": bool(rows.forgotten),
        "consent": {"personalisation": bool(rows.consent_personalisation), "training": bool(rows.consent_training)}
        if rows.user_known
        else None,
    }
    if path is not None and (rows.user_known or _has_impressions(path, user_id)):
        profile.update(_sqlite_rows(path, user_id))
    return profile


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _has_impressions(path: Path, user_id: int) -> bool:
    db = _read_only(path)
    try:
        return db.execute("SELECT EXISTS (SELECT 1 FROM impressions WHERE user_id = ?)", (user_id,)).fetchone()[0] == 1
    finally:
        db.close()


def _sqlite_rows(path: Path, user_id: int) -> dict[str, Any]:
    db = _read_only(path)
    db.row_factory = sqlite3.Row
    try:
        row = db.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchone()
        impressions = db.execute("SELECT * FROM impressions WHERE user_id = ? ORDER BY ts_ms", (user_id,)).fetchall()
    finally:
        db.close()
    stored = dict(row) if row is not None else {}
    return {
        # c_*: counters the ranker reads (impressions, likes, finishes); s_*: hashed profile ids
        "counters": {k[2:]: v for k, v in stored.items() if k.startswith("c_")},
        "hashed_features": {k[2:]: v for k, v in stored.items() if k.startswith("s_")},
        "stored_values": {k[2:]: v for k, v in stored.items() if k.startswith("d_")},
        "impression_records": [dict(r) for r in impressions],
    }


__all__ = ["NOT_EXPORTED", "export_user", "write_export"]
