"""The live edge of pseudonymous ids through a real tritonserver (the small feed of tests/test_feed.py):
a client holding the key sends raw ids as pseudonyms, so the store, the served rows and the consent
topic see only the pseudonym."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest
from test_feed import client, contract, live, repo, served_rows, server, wait_for  # noqa: F401 (fixtures)

from gpurec.client import InvalidRequest
from gpurec.data.pseudonym import Pseudonymizer
from gpurec.features import open_feature_store
from gpurec.serve.consent import CONSENT_TOPIC
from gpurec.stream.log import open_event_log
from gpurec.stream.records import ConsentChange, decode

KEY = b"test-key-" * 4
RAW_ID = 5_550_001  # the app's id for a user the platform knows only by pseudonym


def test_a_keyed_client_sends_pseudonyms_only(server, contract, live, repo, tmp_path):  # noqa: F811
    keyed = Pseudonymizer(KEY)
    alias = keyed.pseudonym(RAW_ID)
    profile = live.users.drop("day").filter(pl.col("consent_personalisation") & pl.col("consent_training")).head(1)
    with open_feature_store(live.store_url) as store:
        store.put_users(profile.with_columns(user_id=pl.lit(alias, pl.Int64)))
    # The platform has never seen the raw id.
    with client(server, contract) as plain, pytest.raises(InvalidRequest, match="unknown user"):
        plain.set_consent(RAW_ID, training=False)
    with client(server, contract, pseudonymizer=keyed) as app:
        changed = app.set_consent(RAW_ID, training=False, ts_ms=live.now_ms)
        assert (changed.user_id, changed.training) == (RAW_ID, False)  # the caller keeps its own id
        page = app.feed(RAW_ID, 5, ts_ms=live.now_ms, request_id=30_000_001)
    assert len(page.item_ids) == 5
    rows = wait_for(lambda: (r := served_rows(live, 30_000_001)) and len(r) == 5 and r, what="the served rows")
    assert {r.user_id for r in rows} == {alias} and not any(r.consent_training for r in rows)
    with open_event_log(live.log_url) as log:
        changes = [decode(r.value, ConsentChange) for p in range(log.partitions(CONSENT_TOPIC)) for r in log.read(CONSENT_TOPIC, p, 0, 10_000)]
    assert alias in {c.user_id for c in changes} and RAW_ID not in {c.user_id for c in changes}
    # `gpurec consent` with the key takes the raw id too.
    key_file = tmp_path / "pseudonym.key"
    key_file.write_bytes(KEY)
    key_file.chmod(0o600)
    command = [sys.executable, "-m", "gpurec.cli", "consent", "--url", server.grpc_url, "--repo", str(repo),
               "--user", str(RAW_ID), "--training", "on", "--json", "--pseudonym-key-file", str(key_file)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["user_id"] == RAW_ID and json.loads(done.stdout)["training"] is True
    with open_feature_store(live.store_url) as store:
        assert store.read(alias, page.item_ids, live.now_ms).consent_training
