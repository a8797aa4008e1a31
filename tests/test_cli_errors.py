"""The CLI error policy: bad input to any `gpurec` command is one stderr line, exit code 2.

Every case runs in-process through `gpurec.cli.main`: exit code 2, stderr exactly one line
``gpurec <command>: ...`` naming what was wrong, no traceback, and nothing that looks like
success. Inputs are tiny and built once per module (a 3-day world of 20 users).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpurec.cli import main
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.preprocess.manifest import load_manifest
from gpurec.preprocess.run import preprocess


def _rewrite_impressions(root: Path, change) -> None:
    for part in sorted((root / "impressions").glob("day=*/*.parquet")):
        pq.write_table(change(pq.read_table(part)), part)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Named inputs the cases refer to as {name}: good ones and each kind of bad one."""
    root = tmp_path_factory.mktemp("cli_errors")
    raw = root / "raw"
    assert main(["generate", "--users", "20", "--items", "30", "--days", "3", "--out", str(raw), "--json"]) == 0
    assert main(["preprocess", "--input", str(raw), "--out", str(root / "features"), "--json"]) == 0
    # Same logs, no held-out days: the test split exists but is empty.
    preprocess(raw, root / "features_no_test", engine="cpu", valid_fraction=0, test_fraction=0)

    no_column = root / "raw_no_user_id"
    shutil.copytree(raw, no_column)
    _rewrite_impressions(no_column, lambda t: t.drop_columns(["user_id"]))

    all_rejected = root / "raw_negative_positions"
    shutil.copytree(raw, all_rejected)
    column = lambda t: t.schema.get_field_index("position")  # noqa: E731
    _rewrite_impressions(
        all_rejected,
        lambda t: t.set_column(column(t), t.schema.field("position"), pa.array([-1] * t.num_rows, t.schema.field("position").type)),
    )

    no_consent = root / "raw_no_training_consent"
    shutil.copytree(raw, no_consent)
    for part in sorted((no_consent / "users").glob("day=*/*.parquet")):
        users = pq.read_table(part)
        i = users.schema.get_field_index("consent_training")
        pq.write_table(users.set_column(i, users.schema.field(i), pa.array([False] * users.num_rows)), part)

    a_file = root / "a_file.txt"
    a_file.write_text("not a directory\n")
    empty = root / "empty"
    empty.mkdir()
    garbage_manifest = root / "garbage_manifest"
    garbage_manifest.mkdir()
    (garbage_manifest / "manifest.json").write_text("{not json")
    # Passes the command's checkpoint check (it looks for the file, torch is not loaded): enough
    # for the cases whose error is about another flag.
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "trainer.json").write_text(json.dumps({"step": 0, "epoch": 0, "batch": 0, "samples": 0}))

    configs = root / "configs"
    configs.mkdir()
    (configs / "unknown_key.toml").write_text("[model]\nembedding_dim = 8\nbottom_mlp = [8]\ntop_mlp = [8]\n[train]\nepochz = 3\n")
    (configs / "wrong_type.toml").write_text('[model]\nembedding_dim = 8\nbottom_mlp = [8]\ntop_mlp = [8]\n[train]\nepochs = "two"\n')
    (configs / "wrong_model_type.toml").write_text('[model]\nembedding_dim = "big"\n')
    (configs / "garbage.toml").write_text("this is = = not toml\n")
    return {
        "raw": raw,
        "features": root / "features",
        "features_no_test": root / "features_no_test",
        "no_column": no_column,
        "all_rejected": all_rejected,
        "no_consent": no_consent,
        "file": a_file,
        "empty": empty,
        "garbage_manifest": garbage_manifest,
        "checkpoint": checkpoint,
        "configs": configs,
        "missing": root / "does-not-exist",
        "out": root / "out",
    }


CASES: list[tuple[list[str], str]] = [
    # generate
    (["generate", "--users", "0", "--out", "{out}/g"], "argument --users: must be a positive integer, got 0"),
    (["generate", "--users", "-5", "--out", "{out}/g"], "argument --users: must be a positive integer, got -5"),
    (["generate", "--items", "0", "--out", "{out}/g"], "argument --items: must be a positive integer"),
    (["generate", "--days", "0", "--out", "{out}/g"], "argument --days: must be a positive integer, got 0"),
    (["generate", "--users", "many", "--out", "{out}/g"], "argument --users: must be an integer, got 'many'"),
    (["generate", "--start-day", "2026-02-30", "--out", "{out}/g"], "argument --start-day: must be a day YYYY-MM-DD"),
    (["generate", "--out", "{file}"], "is a file, not a directory"),
    (["generate", "--out", "{file}/sub"], "is a file, so no directory can be made under it"),
    (["generate", "--out", "{raw}"], "pass --overwrite to replace them"),
    (["generate", "--bogus-flag", "--out", "{out}/g"], "unrecognized arguments: --bogus-flag"),
    # preprocess
    (["preprocess", "--input", "{missing}", "--out", "{out}/p"], "does not exist"),
    (["preprocess", "--input", "{file}", "--out", "{out}/p"], "is a file, not a directory"),
    (["preprocess", "--input", "{empty}", "--out", "{out}/p"], "no impressions log under"),
    (["preprocess", "--input", "{raw}", "--out", "{file}"], "output directory"),
    (["preprocess", "--input", "{raw}", "--out", "{out}/p", "--valid-fraction", "1.5"], "argument --valid-fraction: must be in [0, 1)"),
    (["preprocess", "--input", "{raw}", "--out", "{out}/p", "--shard", "3/2"], "argument --shard"),
    (["preprocess", "--input", "{no_column}", "--out", "{out}/p"], "has no column 'user_id'"),
    # --json: no progress lines, so the error is the only stderr line even after the day loop ran.
    (["preprocess", "--input", "{all_rejected}", "--out", "{out}/p", "--json"], "rows of the impressions log under"),
    (["preprocess", "--input", "{no_consent}", "--out", "{out}/p", "--json"], "no feature rows came out of"),
    (["preprocess", "--input", "{raw}"], "the following arguments are required: --out"),
    # train
    (["train", "--data", "{missing}", "--out", "{out}/t"], "does not exist"),
    (["train", "--data", "{file}", "--out", "{out}/t"], "is a file, not a directory"),
    (["train", "--data", "{empty}", "--out", "{out}/t"], "no manifest.json"),
    (["train", "--data", "{garbage_manifest}", "--out", "{out}/t"], "manifest.json: not JSON"),
    (["train", "--data", "{features}", "--out", "{file}"], "--out"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--batch-size", "-1"], "argument --batch-size"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--device", "tpu"], "argument --device: invalid choice"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--sharding", "sideways"], "sharding must be 'auto' or one of"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--config", "{missing}.toml"], "--config"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--config", "{configs}/unknown_key.toml"], "unknown key 'epochz'"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--config", "{configs}/wrong_type.toml"], "[train] epochs must be int, got 'two'"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--config", "{configs}/wrong_model_type.toml"], "[model] embedding_dim must be int"),
    (["train", "--data", "{features}", "--out", "{out}/t", "--config", "{configs}/garbage.toml"], "not a readable TOML file"),
    # evaluate
    (["evaluate", "--checkpoint", "{missing}", "--data", "{features}"], "does not exist"),
    (["evaluate", "--checkpoint", "{empty}", "--data", "{features}"], "no checkpoint in"),
    (["evaluate", "--checkpoint", "{file}", "--data", "{features}"], "is a file, not a directory"),
    (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{empty}"], "no manifest.json"),
    (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{features_no_test}"], "'test' split"),
    (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{features}", "--oracle", "{empty}"], "no oracle log under"),
    (["evaluate", "--checkpoint", "{checkpoint}", "--data", "{features}", "--batch-size", "0"], "argument --batch-size"),
    # export
    (["export", "--checkpoint", "{empty}", "--repo", "{out}/r"], "no checkpoint in"),
    (["export", "--checkpoint", "{checkpoint}", "--repo", "{file}"], "--repo"),
    (["export", "--checkpoint", "{checkpoint}", "--repo", "{out}/r", "--max-batch-size", "0"], "argument --max-batch-size"),
    (["export", "--checkpoint", "{checkpoint}", "--repo", "{out}/r", "--instances", "-1"], "argument --instances"),
    # serve
    (["serve", "--repo", "{missing}"], "does not exist"),
    (["serve", "--repo", "{file}"], "is a file, not a directory"),
    (["serve", "--repo", "{empty}"], "holds no model"),
    (["serve", "--repo", "{empty}", "--http-port", "70000"], "argument --http-port: must be a TCP port"),
    (["serve", "--repo", "{empty}", "--timeout", "0"], "argument --timeout: must be a positive number"),
    # recommend
    (["recommend", "--repo", "{empty}", "--features", "{features}", "--users", "0"], "argument --users: must be a positive integer, got 0"),
    (["recommend", "--repo", "{empty}", "--features", "{features}", "--users", "-5"], "argument --users"),
    (["recommend", "--repo", "{empty}", "--features", "{features}", "--candidates", "0"], "argument --candidates"),
    (["recommend", "--repo", "{empty}", "--features", "{features}", "--k", "0"], "argument --k: must be a positive integer"),
    (["recommend", "--repo", "{empty}", "--features", "{features}", "--url", "nowhere"], "argument --url: must be host:port"),
    (["recommend", "--repo", "{missing}", "--features", "{features}"], "does not exist"),
    (["recommend", "--repo", "{empty}", "--features", "{features}"], "cannot read a serving contract"),
    # experiment
    (["experiment", "collisionless", "--users", "0"], "argument --users: must be a positive integer"),
    (["experiment", "collisionless", "--out", "{file}"], "--out"),
    (["experiment", "collisionless", "--out", "{out}/x", "--datasets", "imagenet"], "unknown datasets ['imagenet']"),
    (["experiment", "collisionless", "--out", "{out}/x", "--rows-per-id", "0,-1"], "--rows-per-id takes positive numbers"),
    (["experiment", "frobnicate"], "argument STUDY: invalid choice"),
]


def _ids() -> list[str]:
    seen: dict[str, int] = {}
    ids = []
    for argv, _ in CASES:
        seen[argv[0]] = seen.get(argv[0], 0) + 1
        ids.append(f"{argv[0]}-{seen[argv[0]]}")
    return ids


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=_ids())
def test_bad_input_is_one_line_exit_2(argv, fragment, paths, capsys):
    args = [a.format(**paths) for a in argv]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 2, f"{args}: exit {code}, stderr {err!r}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"{args}: stderr is not one line: {err!r}"
    assert lines[0].startswith(f"gpurec {argv[0]}: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert out == ""  # nothing on stdout: no summary, no JSON, nothing that reads as success


def test_refused_generate_writes_nothing(paths, capsys):
    out = paths["out"] / "never"
    assert main(["generate", "--users", "0", "--out", str(out)]) == 2
    assert not out.exists()


def test_all_rejected_run_writes_no_manifest(paths, capsys):
    """A run whose every impression was rejected fails, and leaves no manifest for train to read
    (the rejected rows are in the dead letter, which the message names)."""
    out = paths["out"] / "rejected"
    assert main(["preprocess", "--input", str(paths["all_rejected"]), "--out", str(out), "--json"]) == 2
    err = capsys.readouterr().err
    assert "negative position: -1" in err and str(out / "dead_letter" / "impressions") in err
    assert not (out / "manifest.json").exists()
    assert (out / "dead_letter" / "impressions").is_dir()


def test_library_functions_raise_typed_errors(paths, tmp_path):
    """Python callers get the same typed errors the command reports."""
    with pytest.raises(InvalidInput, match="has no column 'user_id'"):
        preprocess(paths["no_column"], tmp_path / "a", engine="cpu")
    with pytest.raises(InvalidInput, match=r"every one of the .* rows of the impressions log"):
        preprocess(paths["all_rejected"], tmp_path / "b", engine="cpu")
    with pytest.raises(InputNotFound, match="does not exist"):
        preprocess(paths["missing"], tmp_path / "c", engine="cpu")
    with pytest.raises(InputNotFound, match=r"no manifest\.json"):
        load_manifest(paths["empty"])
    with pytest.raises(InvalidInput, match="not JSON"):
        load_manifest(paths["garbage_manifest"])
    with pytest.raises(InvalidInput, match="no split 'holdout'"):
        load_manifest(paths["features"]).split_files("holdout", paths["features"])


def test_preprocess_progress_then_one_error_line(paths, capsys):
    """Without --json, the progress lines of the days already processed come first; the error is
    still one line, the last one, with no traceback."""
    assert main(["preprocess", "--input", str(paths["all_rejected"]), "--out", str(paths["out"] / "p2")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("gpurec preprocess: every one of the")
    assert all(line.startswith("preprocess: ") for line in lines[:-1])
    assert not any("Traceback" in line for line in lines)


def test_console_script_reports_one_line(tmp_path):
    """The installed `gpurec` entry point (sys.exit(main())) exits 2 with the one line."""
    gpurec = Path(sys.executable).parent / "gpurec"
    result = subprocess.run(
        [str(gpurec), "generate", "--users", "-5", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["gpurec generate: argument --users: must be a positive integer, got -5"]
    assert result.stdout == ""
    assert not (tmp_path / "x").exists()
