"""Pseudonymous user ids (issue 12): the key, the batch edge (generate), the live edge (the simulated
app), mixing refused, rotation, and the key never written anywhere."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gpurec.cli import main
from gpurec.data import logs
from gpurec.data.generate import generate_synthetic
from gpurec.data.pseudonym import (
    KEY_FILE_ENV,
    Pseudonymizer,
    check_key_id,
    load_key,
    load_pseudonymizer,
    new_key_file,
    read_key_id,
    rotation_map,
)
from gpurec.data.world import World, WorldConfig
from gpurec.errors import GpurecError, InvalidInput
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.run import preprocess

TINY_WORLD = WorldConfig(users=150, items=300, days=4, seed=5)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> dict:
    """A tiny world generated with a key, and its features; the key file lives beside, not in, the data."""
    root = tmp_path_factory.mktemp("pseudonym")
    key_file = new_key_file(root / "keys" / "pseudonym.key")
    pseudonymizer = Pseudonymizer(load_key(key_file))
    generate_synthetic(TINY_WORLD, root / "raw", pseudonymizer=pseudonymizer)
    preprocess(root / "raw", root / "features", engine="cpu")
    return {"root": root, "key_file": key_file, "key": load_key(key_file), "p": pseudonymizer}


def test_pseudonyms_are_stable_positive_int64_and_differ_across_keys():
    a, b = Pseudonymizer(b"a" * 32), Pseudonymizer(b"b" * 32)
    ids = [0, 1, 42, -7, 2**63 - 1, -(2**63)]
    first = [a.pseudonym(i) for i in ids]
    assert first == [Pseudonymizer(b"a" * 32).pseudonym(i) for i in ids]  # a function of key and id only
    assert all(0 < p < 2**63 for p in first) and len(set(first)) == len(ids)
    assert not set(first) & {b.pseudonym(i) for i in ids}
    assert a.key_id != b.key_id and len(a.key_id) == 8
    column = pa.array([42, 0, 42, -7, 1], pa.int64())
    assert a.pseudonymize(column).to_pylist() == [a.pseudonym(i) for i in column.to_pylist()]


def test_the_key_is_not_in_repr_and_not_picklable():
    key = b"do-not-print-this-key-0123456789"
    p = Pseudonymizer(key)
    for text in (repr(p), str(p), f"{p}"):
        assert key.decode() not in text and key.hex() not in text and p.key_id in text
    with pytest.raises(TypeError):
        pickle.dumps(p)
    with pytest.raises(InvalidInput):
        Pseudonymizer(b"short")


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [(None, 0o600, "does not exist"), (b"x" * 32, 0o644, "readable by group or others"), (b"\n", 0o600, "is empty"),
     (b"tooshort", 0o600, "fewer than 16 bytes")],
)
def test_bad_key_files_are_one_line_exit_2(tmp_path, capsys, content, mode, expected):
    key_file = tmp_path / "k"
    if content is not None:
        key_file.write_bytes(content)
        key_file.chmod(mode)
    code = main(["generate", "--out", str(tmp_path / "raw"), "--users", "50", "--pseudonym-key-file", str(key_file)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("gpurec generate: ") and expected in err
    if content is not None:
        assert content.strip().decode() not in err or not content.strip()
    assert not (tmp_path / "raw").exists()  # refused before anything was written


def test_key_from_environment(tmp_path, monkeypatch):
    key_file = new_key_file(tmp_path / "k")
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert load_pseudonymizer() is None
    monkeypatch.setenv(KEY_FILE_ENV, str(key_file))
    assert load_pseudonymizer().key_id == Pseudonymizer(load_key(key_file)).key_id
    assert (key_file.stat().st_mode & 0o777) == 0o600
    with pytest.raises(InvalidInput, match="never overwritten"):
        new_key_file(key_file)


def test_generated_logs_hold_pseudonyms_not_raw_ids(keyed):
    raw_ids = World(TINY_WORLD).user_ids
    expected = keyed["p"].pseudonymize(raw_ids).to_numpy()
    for log in ("users", "impressions"):
        written = np.unique(logs.read(keyed["root"] / "raw", log)["user_id"].to_numpy())
        assert len(written) and not np.isin(written, raw_ids).any()
        assert np.isin(written, expected).all()
    assert read_key_id(keyed["root"] / "raw") == keyed["p"].key_id
    assert load_manifest(keyed["root"] / "features").source["pseudonym_key_id"] == keyed["p"].key_id


def test_the_key_is_in_no_file_the_run_wrote(keyed):
    key = keyed["key"]
    needles = [key, key.hex().encode(), key.upper(), bytes.fromhex(key.decode())]  # the file holds hex
    written = [f for f in keyed["root"].rglob("*") if f.is_file() and f != keyed["key_file"]]
    assert len(written) > 10
    for f in written:
        data = f.read_bytes()
        assert not any(n in data for n in needles), f


def test_mixing_keys_is_refused(keyed, tmp_path):
    assert check_key_id(("a", "12345678"), ("b", "12345678")) == "12345678"
    with pytest.raises(InvalidInput, match="cannot be mixed"):
        check_key_id(("logs", "12345678"), ("key", "87654321"))
    with pytest.raises(InvalidInput, match="raw ids"):
        check_key_id(("logs", None), ("key", "87654321"))
    # The live edge refuses a key the world's logs were not written with.
    from gpurec.client.simulate_command import _pseudonymizer

    other = new_key_file(tmp_path / "other.key")
    with pytest.raises(InvalidInput, match="cannot be mixed"):
        _pseudonymizer(argparse.Namespace(pseudonym_key_file=other, world=keyed["root"] / "raw"))
    same = _pseudonymizer(argparse.Namespace(pseudonym_key_file=keyed["key_file"], world=keyed["root"] / "raw"))
    assert same.key_id == keyed["p"].key_id


def test_live_world_sends_the_same_pseudonyms_as_generate(keyed):
    from gpurec.client.simulate import LiveWorld

    live = LiveWorld(TINY_WORLD, users=20, seed=1, pseudonymizer=keyed["p"])
    logged = set(logs.read(keyed["root"] / "raw", "users")["user_id"].to_pylist())
    assert set(live.user_ids.tolist()) <= logged
    assert live.users_table()["user_id"].to_pylist() == live.user_ids.tolist()
    assert set(LiveWorld(TINY_WORLD, users=20, seed=1).user_ids.tolist()).isdisjoint(logged)  # raw ids


def test_rotation_moves_every_user_id_to_the_new_key(keyed, tmp_path, capsys):
    new_key = new_key_file(tmp_path / "new.key")
    new = Pseudonymizer(load_key(new_key))
    raw_ids = World(TINY_WORLD).user_ids
    mapping = rotation_map(raw_ids, keyed["p"], new)
    assert mapping["old_user_id"].to_pylist() == keyed["p"].pseudonymize(raw_ids).to_pylist()
    assert mapping["new_user_id"].to_pylist() == new.pseudonymize(raw_ids).to_pylist()

    out = tmp_path / "rotated"
    argv = ["pseudonym", "rotate", "--logs", str(keyed["root"] / "raw"), "--out", str(out),
            "--old-key-file", str(keyed["key_file"]), "--new-key-file", str(new_key), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_key_id"] == new.key_id == read_key_id(out) and result["users"] == TINY_WORLD.users
    old_to_new = dict(zip(mapping["old_user_id"].to_pylist(), mapping["new_user_id"].to_pylist(), strict=True))
    for log in ("users", "impressions"):
        before, after = logs.read(keyed["root"] / "raw", log), logs.read(out, log)
        assert [old_to_new[u] for u in before["user_id"].to_pylist()] == after["user_id"].to_pylist()
        assert before.drop(["user_id"]).equals(after.drop(["user_id"]))
    assert logs.read(out, "actions").equals(logs.read(keyed["root"] / "raw", "actions"))
    # Rotating again from the old key is refused: the rotated logs are recorded as the new key's.
    assert main([*argv[:3], str(out), "--out", str(tmp_path / "again"), *argv[6:]]) == 2
    assert "cannot be mixed" in capsys.readouterr().err


def test_errors_never_show_the_key(tmp_path):
    key_file = tmp_path / "k"
    key_file.write_bytes(b"secret-secret-secret-secret")
    key_file.chmod(0o644)
    with pytest.raises(GpurecError) as err:
        load_key(key_file)
    assert "secret" not in str(err.value)
    assert Path(key_file).read_bytes() not in repr(err.value).encode()
