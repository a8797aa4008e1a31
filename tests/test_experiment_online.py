"""`gpurec experiment online`: one tiny run end to end, and the replay's serving semantics.

The run (60 users, 4 days: batch training on days 1-2, days 3-4 replayed; sync every 60 s by
direct apply and every 10 min through delta files) checks the report's shape, that every number
is a real AUC of real scores (online differs from frozen; the daily retrain serves the frozen
model on the first day only) and that the PNG is written. The replay tests check what serving
sees: the file and direct sync paths serve identical scores, a module that never syncs serves
the frozen model's scores exactly, and nothing trained reaches serving before its label is in.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpurec.cli import main
from gpurec.experiments.online import TASKS, ranker_inputs, score_rows, served_ranker, split_frame
from gpurec.sync.examples import examples_from_features
from gpurec.sync.replay import ReplaySettings, replay_online

ARGS = ["--users", "60", "--items", "300", "--days", "4", "--train-days", "2", "--seeds", "7"]
SYNC = ["--sync-every", "60,600", "--direct-sync", "60", "--epochs", "1"]
VARIANTS = ["frozen", "online-60s", "online-600s", "daily"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("experiment") / "online"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["experiment", "online", *ARGS, *SYNC, "--out", str(out), "--json"])
    assert code == 0
    (line,) = printed.getvalue().strip().splitlines()  # exactly one JSON line
    return json.loads(line), out


def test_report_shape(experiment):
    report, out = experiment
    assert json.loads((out / "results.json").read_text()) == report
    assert list(report["variants"]) == VARIANTS and report["days"] == [3, 4]
    settings = report["settings"]
    assert (settings["train_days"], settings["sync_every_s"], settings["direct_sync_s"]) == (
        2,
        [60.0, 600.0],
        [60.0],
    )
    assert settings["trainer_window_s"] == 60.0 and settings["label_delay_s"] == 600.0
    (seed,) = report["per_seed"]
    assert seed["seed"] == 7 and seed["days"] == [3, 4] and all(n > 0 for n in seed["impressions"])
    replay = seed["replay"]
    assert replay["examples"] == sum(seed["impressions"]) and replay["steps"] > 0
    assert replay["served_agree"]  # every served module ends at the trainer's final parameters
    assert replay["deltas"]["60s"]["path"] == "direct" and replay["deltas"]["600s"]["path"] == "files"
    assert replay["deltas"]["60s"]["dense"] > replay["deltas"]["600s"]["dense"] > 1
    assert replay["deltas"]["600s"]["slots_shipped"] > 0  # the id map admitted new ids online
    for name in VARIANTS:
        for task in TASKS:
            summary = report["summary"][name][task]
            assert summary["mean"] == pytest.approx(seed["auc"][name][task], abs=1e-4)
            assert summary["std"] == [0.0, 0.0]  # one seed


def test_aucs_are_real(experiment):
    report, _ = experiment
    (seed,) = report["per_seed"]
    auc = seed["auc"]
    for name in VARIANTS:
        for task in TASKS:
            assert all(0.0 < a < 1.0 for a in auc[name][task]), (name, task, auc[name][task])
            assert 0.0 < auc[name][f"{task}_all"] < 1.0
    # Day 3 is served by the frozen model in the daily variant too; day 4 by a model trained on days 1-3.
    assert (
        auc["daily"]["like"][0] == auc["frozen"]["like"][0]
        and auc["daily"]["finish"][0] == auc["frozen"]["finish"][0]
    )
    assert auc["daily"]["like"][1] != auc["frozen"]["like"][1]
    for name in ("online-60s", "online-600s"):  # online training changed the served scores
        assert auc[name]["like"] != auc["frozen"]["like"] and auc[name]["finish"] != auc["frozen"]["finish"]
    assert all(0.0 < seed["frozen_on_last_train_day"][t] < 1.0 for t in TASKS)


def test_plot_is_written(experiment):
    report, out = experiment
    png = out / "auc_by_day.png"
    assert Path(report["plot"]) == png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # two panels of lines, not an empty canvas


def _replay(out: Path, tmp_path: Path, settings: ReplaySettings, limit: int):
    """Replay the first `limit` test impressions from the fixture's batch run; like-scores by interval."""
    root = out / "seed-7"
    features, run = root / "features-train-days-1-2", root / "batch-days-1-2"
    frame = split_frame(features, "test").head(limit)
    frozen, contract = served_ranker(run)
    inputs = ranker_inputs(frame, contract)
    examples = examples_from_features(features, "test")
    examples.sort(key=lambda e: (e.served.ts_ms, e.served.request_id, e.served.item_id))
    examples = examples[:limit]
    served = {s: served_ranker(run)[0] for s in settings.sync_every_s}
    scores = {s: np.full(limit, np.nan, dtype=np.float32) for s in settings.sync_every_s}

    def score(interval: float, start: int, end: int) -> None:
        scores[interval][start:end] = score_rows(served[interval], inputs, start, end)["like"]

    report = replay_online(run, examples, served, score, tmp_path, settings)
    ts = np.array([e.served.ts_ms for e in examples])
    return scores, score_rows(frozen, inputs, 0, limit)["like"], ts, report


DELAY_S = 1800.0


@pytest.fixture(scope="module")
def replays(experiment, tmp_path_factory):
    """The same impressions replayed twice with a 30 min label delay: sync every 60 s by direct apply
    (and a module that never syncs, through files), then every 60 s through delta files."""
    _, out = experiment
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study runs: deterministic, and fast on a shared machine
    try:
        settings = ReplaySettings(sync_every_s=(60.0, 1e9), label_delay_s=DELAY_S, direct_s=(60.0,))
        direct = _replay(out, tmp_path_factory.mktemp("direct"), settings, 1000)
        settings = ReplaySettings(sync_every_s=(60.0,), label_delay_s=DELAY_S, window_s=60.0)
        files = _replay(out, tmp_path_factory.mktemp("files"), settings, 1000)
    finally:
        torch.set_num_threads(threads)
    return direct, files


def test_file_and_direct_sync_serve_the_same_scores(replays):
    (direct, frozen, _, report), (files, _, _, files_report) = replays
    assert report["deltas"]["60s"]["path"] == "direct" and files_report["deltas"]["60s"]["path"] == "files"
    assert report["served_agree"]  # the direct and the file path end at the same parameters
    np.testing.assert_array_equal(direct[60.0], files[60.0])
    # A module that never syncs within the replay serves the frozen model, score for score.
    np.testing.assert_array_equal(direct[1e9], frozen)


def test_nothing_reaches_serving_before_its_label_is_in(replays):
    """Nothing is trained before the first impression's ts + the label delay, so every impression
    served before then gets the frozen model's score (up to float rounding: scored in other batches)."""
    (direct, frozen, ts, _), _ = replays
    early = ts < ts[0] + DELAY_S * 1000
    assert early.sum() > 10 and (~early).sum() > 10
    np.testing.assert_allclose(direct[60.0][early], frozen[early], rtol=1e-5, atol=1e-7)
    assert np.abs(direct[60.0][~early] - frozen[~early]).max() > 1e-4  # afterwards online training shows


@pytest.mark.parametrize(
    "args, message",
    [
        (["--days", "3", "--train-days", "3"], "--train-days must be at least 1 and below --days"),
        (["--sync-every", "0,60"], "--sync-every takes positive numbers"),
        (["--seeds", "a"], "--seeds takes numbers"),
        (["--label-delay", "-1"], "--label-delay and --window must not be negative"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["experiment", "online", "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
