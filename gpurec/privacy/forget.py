"""Forget a user (GDPR Art. 17): stop using them at once, then purge them from every artifact.

`forget_user` runs the steps in this order, each idempotent, so an interrupted erasure is finished
by running it again:

1. request (effective within one sync interval, with the loop running):
   - the online feature store deletes the user's profile, counters and impression records and
     deny-lists a keyed digest of the id: the next feed request of the user is non-profiled and
     logs nothing (`FeatureRows.forgotten`), and a later profile write for the id is refused;
   - a `ConsentChange(forget=True)` on the event log's `consent` topic: the joiner strips the rows
     it holds of the user and deletes their consent entry; the online trainer releases the user's
     embedding row, zeroes it and its optimizer state, deny-lists the id (never re-admitted) and
     publishes the reset at once, so every serving instance reads the default row for them;
2. wait (bounded) for a running online trainer to acknowledge the request (its committed
   `consent` offset passes it), so the checkpoints it writes from then on are already clean;
3. purge, with nothing left to act on the request:
   - the event log: every record keyed by the user in every topic, the dead letters whose payload
     names them, the joiner's state entries (Kafka: not possible, the records expire with retention);
   - raw and preprocessed Parquet (the user's rows; the actions and oracle rows of their requests);
   - checkpoints of the batch and online runs, rewritten with the user's row released and zeroed;
   - deltas and snapshots: a fresh snapshot from the rewritten online checkpoint, every older
     file deleted; the Triton model repository re-exported from the rewritten batch checkpoint,
     older versions deleted (`gpurec.privacy.sync_erase`);
   - access exports written for the user;
4. verify: `gpurec.privacy.verify` searches every artifact for the raw id, the pseudonymous id and
   the table key, and the verdict is part of the report.
"""

from __future__ import annotations

import time
from typing import Any

from gpurec.data.pseudonym import Pseudonymizer
from gpurec.features.store import open_feature_store
from gpurec.serve.consent import CONSENT_TOPIC, create_consent_topic
from gpurec.stream.join import DEAD_LETTER
from gpurec.stream.joiner_state import CONSENT_PREFIX, pack_user
from gpurec.stream.log import EraseUnsupported, EventLog, Record, open_event_log
from gpurec.stream.records import (
    DEAD_LETTER_SOURCES,
    ConsentChange,
    DeadLetter,
    Example,
    decode,
    decoder,
    encode,
)
from gpurec.sync.examples import EXAMPLES_TOPIC
from gpurec.sync.forget import USER_FEATURE, user_table_key
from gpurec.sync.online import DEAD_LETTER_TOPIC as TRAINER_DEAD_LETTER
from gpurec.workspace import Workspace

ONLINE_GROUP = "trainer"  # the online trainer's consumer group (OnlineSettings.group's default)
_letter = decoder(DeadLetter)


def request_forget(ws: Workspace, user_id: int, ts_ms: int | None = None, partitions: int = 4) -> dict[str, Any]:
    """Step 1: the store forgets the user and the erasure request goes on the log. Returns the
    store's deletions and the request's (partition, offset)."""
    ts_ms = int(time.time() * 1000) if ts_ms is None else ts_ms
    with open_feature_store(ws.feature_store_url) as store:
        deleted = store.forget_user(user_id)
    with open_event_log(ws.event_log_url) as log:
        create_consent_topic(log, partitions)
        change = ConsentChange(user_id=user_id, training=False, ts_ms=ts_ms, personalisation=False, forget=True)
        ((partition, offset),) = log.append(CONSENT_TOPIC, [Record(user_id, encode(change), ts_ms)])
    return {"feature_store": deleted, "request": {"partition": partition, "offset": offset}}


def wait_for_trainer(ws: Workspace, partition: int, offset: int, timeout_s: float) -> bool:
    """Step 2: True once the online trainer's committed `consent` offset is past the request (it
    commits after each checkpoint); False after `timeout_s` (no trainer running: the offline
    checkpoint rewrite does its part)."""
    deadline = time.monotonic() + timeout_s
    with open_event_log(ws.event_log_url) as log:
        if EXAMPLES_TOPIC not in log.topics() or not log.committed(ONLINE_GROUP, EXAMPLES_TOPIC):
            return False  # no online trainer has ever committed here: nobody to wait for
        while True:
            if log.committed(ONLINE_GROUP, CONSENT_TOPIC).get(partition, 0) > offset:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


def _names_user(user_id: int):
    """A dead letter's predicate: its payload, decoded as its source's record, is the user's; or,
    undecodable, holds the id in decimal or 8-byte form (as the verifier judges raw payloads)."""
    needles = (str(user_id).encode(), *(int(user_id).to_bytes(8, order, signed=True) for order in ("little", "big")))

    def matches(value: bytes) -> bool:
        try:
            letter = _letter(value)
            record = decode(letter.record, DEAD_LETTER_SOURCES[letter.source])
        except Exception:  # what arrived, maybe garbage: search its bytes
            return any(n in value for n in needles)
        served = record.served if isinstance(record, Example) else record
        return served.user_id == user_id or (abs(user_id) >= 1 << 32 and any(n in letter.record for n in needles))

    return matches


def purge_event_log(log: EventLog, user_id: int) -> dict[str, int] | str:
    """Step 3, the log: the user's records everywhere, dead letters naming them, joiner state."""
    scan = {topic: _names_user(user_id) for topic in (DEAD_LETTER, TRAINER_DEAD_LETTER)}
    try:
        return log.erase(user_id, scan=scan, state_keys=[CONSENT_PREFIX + pack_user(user_id)])
    except EraseUnsupported as err:
        return f"not erased: {err}; the records expire with each topic's retention"


def forget_user(
    ws: Workspace,
    raw_user_id: int,
    pseudonymizer: Pseudonymizer | None = None,
    *,
    purge: bool = True,
    wait_s: float = 10.0,
    ts_ms: int | None = None,
) -> dict[str, Any]:
    """Forget one user everywhere in the workspace (see the module docstring); returns a report
    with the verifier's verdict (`verified`)."""
    user_id = pseudonymizer.pseudonym(raw_user_id) if pseudonymizer is not None else raw_user_id
    report: dict[str, Any] = {"user": raw_user_id, "pseudonym": user_id if pseudonymizer is not None else None}
    requested = request_forget(ws, user_id, ts_ms)
    report.update(requested)
    if not purge:
        return report
    request = requested["request"]
    report["trainer_acknowledged"] = wait_for_trainer(ws, request["partition"], request["offset"], wait_s)
    report["purged"] = purge_artifacts(ws, raw_user_id, user_id)
    report.update(verify(ws, raw_user_id, user_id))
    return report


def purge_artifacts(ws: Workspace, raw_user_id: int, user_id: int) -> dict[str, Any]:
    """Step 3 (see the module docstring); returns what was deleted or rewritten, by artifact."""
    from gpurec.privacy.checkpoint_forget import forget_in_checkpoint
    from gpurec.privacy.erase import erase_exports, erase_parquet
    from gpurec.privacy.sync_erase import erase_sync_dir, reexport_repository

    key = user_table_key(user_id)
    purged: dict[str, Any] = {}
    with open_event_log(ws.event_log_url) as log:
        purged["event_log"] = purge_event_log(log, user_id)
    purged["raw"] = erase_parquet(ws.raw, user_id, key)
    purged["features"] = erase_parquet(ws.features, user_id, key)
    rewritten = []
    for run in ws.runs:
        for checkpoint in sorted((run / "checkpoints").glob("step-*")):
            if checkpoint.is_dir() and forget_in_checkpoint(checkpoint, {USER_FEATURE: [key]}):
                rewritten.append(str(checkpoint.relative_to(ws.root)))
    purged["checkpoints"] = rewritten
    purged["sync"] = erase_sync_dir(ws)
    purged["repo"] = reexport_repository(ws)
    purged["exports"] = erase_exports(ws.privacy, raw_user_id) + (
        erase_exports(ws.privacy, user_id) if user_id != raw_user_id else 0
    )
    return purged


def verify(ws: Workspace, raw_user_id: int, user_id: int) -> dict[str, Any]:
    """Step 4: the verifier's verdict and the traces it found."""
    from gpurec.privacy.verify import verify_report

    pseudonym = user_id if user_id != raw_user_id else None
    return {"verification": verify_report(ws, raw_user_id, pseudonym, [user_table_key(user_id)])}
