"""Parameter sync: deltas from the online trainer bring a served ranker to the trainer's model, in place.

The served module here is the exported TorchScript ranker (what Triton's `ranker` runs), built in
process from a checkpoint; `DeltaApplier` is the code the Triton model runs.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch
from conftest import fill_examples, serve_for_tests

from gpurec.model.trained import load_trained_model
from gpurec.serve.artifact import build_serving_ranker
from gpurec.serve.contract import pad_id_lists
from gpurec.serve.export import contract_for
from gpurec.stream.log import open_event_log
from gpurec.sync.deltafile import DeltaApplier, list_deltas, read_delta, write_delta
from gpurec.sync.online import OnlineSettings, train_online
from gpurec.sync.publish import SYNC_TOPIC, DeltaPublisher, table_name


def served_module(run_dir):
    model, lookup, run = load_trained_model(run_dir)
    contract = contract_for(model, run, 64)
    return build_serving_ranker(model, lookup, contract), contract


def served_inputs(examples, contract):
    inputs = [e.served.model_inputs() for e in examples]
    dense = torch.tensor([i.dense for i in inputs], dtype=torch.float32)
    single = torch.tensor([[i.sparse[f][0] for f in contract.sparse_features] for i in inputs], dtype=torch.int64)
    multi = [torch.from_numpy(pad_id_lists([i.sparse[f] for i in inputs])) for f in contract.multi_valued_features]
    return dense, single, multi


def scores(module, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return module(*inputs)["score"].clone()


class _Ticks:
    """A clock that advances one second per reading: a delta every few steps, deterministically."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(scope="module")
def synced(tmp_path_factory, batch_run, valid_examples):
    root = tmp_path_factory.mktemp("synced")
    url = f"sqlite:///{root}/log.db"
    fill_examples(url, valid_examples)
    publishers = []

    def listener(trainer):
        publisher = DeltaPublisher(trainer, root / "deltas", rows_every_s=3, dense_every_s=10, snapshot_every=6, log=log, clock=_Ticks())
        publishers.append(publisher)
        return publisher

    with open_event_log(url) as log:
        report = train_online(log, root / "online", OnlineSettings(batch_size=128), init=batch_run, drain=True, progress=False, listener=listener)
        announced = log.end_offsets(SYNC_TOPIC)[0] - log.start_offsets(SYNC_TOPIC)[0]
    return root, report, announced


def test_deltas_bring_the_served_model_to_the_trainers(synced, batch_run, valid_examples):
    root, report, announced = synced
    counts = report["deltas"]
    assert counts["rows"] >= 3 and counts["dense"] >= 2 and counts["snapshot"] >= 2
    assert counts["slots_shipped"] > 0  # the collisionless map admitted ids while training online
    assert announced == report["sync_seq"] + 1  # every delta was announced on the log
    kinds = [kind for _, kind, _ in list_deltas(root / "deltas")]
    assert kinds[0] == "snapshot"  # compaction: older deltas are gone, a snapshot starts the rest
    module, contract = served_module(batch_run)
    inputs = served_inputs(valid_examples[:300], contract)
    expected = scores(served_module(root / "online")[0], inputs)
    before = scores(module, inputs)
    assert not torch.allclose(before, expected, atol=1e-4)
    applier = DeltaApplier(module, root / "deltas")
    applier.poll()
    assert applier.version == report["sync_seq"]
    torch.testing.assert_close(scores(module, inputs), expected, rtol=0, atol=1e-6)


def test_a_restarted_server_reaches_the_same_version_and_scores(synced, batch_run, valid_examples):
    root, report, _ = synced
    running, contract = served_module(batch_run)
    DeltaApplier(running, root / "deltas").poll()
    restarted, _ = served_module(batch_run)
    applier = DeltaApplier(restarted, root / "deltas")
    assert applier.poll() >= 1 and applier.version == report["sync_seq"] and applier.reloads == 1
    inputs = served_inputs(valid_examples[:200], contract)
    assert torch.equal(scores(restarted, inputs), scores(running, inputs))


def test_corrupt_torn_or_missing_deltas_are_never_applied(tmp_path, synced, batch_run):
    root, _, _ = synced
    directory = tmp_path / "deltas"
    shutil.copytree(root / "deltas", directory)
    *_, (last_seq, _, last_path) = list_deltas(directory)
    module, _ = served_module(batch_run)
    applier = DeltaApplier(module, directory)
    # Stop before the last delta: serve seq last-1.
    held = last_path.read_bytes()
    last_path.unlink()
    applier.poll()
    assert applier.version == last_seq - 1
    state = {k: v.clone() for k, v in module.state_dict().items()}
    # A flipped byte in the payload, then a torn (truncated) file: refused, nothing changes.
    for damaged in (held[:-40] + bytes([held[-40] ^ 0xFF]) + held[-39:], held[: len(held) // 2]):
        last_path.write_bytes(damaged)
        applier.poll()
        assert applier.version == last_seq - 1 and applier.refused >= 1
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())
    # A gap (seq last+1 without last) is not applied either: the server keeps what it has.
    last_path.unlink()
    write_delta(directory, last_seq + 1, "rows", [], {})
    applier.poll()
    assert applier.version == last_seq - 1
    # Once the real delta is there, the server catches up.
    last_path.write_bytes(held)
    applier.poll()
    assert applier.version == last_seq + 1


def test_a_score_changes_after_a_delta_touching_its_item_and_only_then(tmp_path, batch_run, valid_examples):
    module, contract = served_module(batch_run)
    lookup = load_trained_model(batch_run).lookup
    examples = valid_examples[:50]
    inputs = served_inputs(examples, contract)
    item_ids = torch.tensor([e.served.model_inputs().sparse["item_id"][0] for e in examples])
    rows = lookup.feature_rows("item_id", item_ids)  # the small config's tables are collisionless
    target_row = int(rows[0])
    touched = rows == target_row
    lock = threading.Lock()
    applier = DeltaApplier(module, tmp_path, lock)
    name = table_name("item_id")
    current = module.state_dict()[name]
    write_delta(tmp_path, 0, "snapshot", [(name, None, current.clone())], {})
    applier.poll()
    before = scores(module, inputs)
    write_delta(tmp_path, 1, "rows", [(name, torch.tensor([target_row]), current[target_row : target_row + 1] + 0.5)], {})
    assert torch.equal(scores(module, inputs), before)  # written but not applied yet: unchanged
    applier.poll()
    after = scores(module, inputs)
    assert not torch.equal(after[touched], before[touched])
    assert torch.equal(after[~touched], before[~touched])


def test_a_delta_file_is_checked_whole(tmp_path):
    write_delta(tmp_path, 3, "dense", [("model.x", None, torch.ones(4))], {"newest_event_ms": 7})
    header, entries = read_delta(tmp_path / "000000003.dense.delta")
    assert header["seq"] == 3 and header["newest_event_ms"] == 7 and entries[0][0] == "model.x"
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place


def test_a_running_triton_ranker_applies_deltas_in_place_on_every_instance(tmp_path, synced, batch_run, valid_examples):
    """A real tritonserver with two ranker instances follows the sync directory: it starts at the
    newest delta there, then a new delta reaches both instances (metrics) and changes the scores
    to exactly the trainer's, with no reload of the model."""
    import urllib.request

    import numpy as np

    httpclient = pytest.importorskip("tritonclient.http")
    from gpurec.serve.export import export_repository
    from gpurec.serve.model_config import BatchingConfig

    root, _, _ = synced
    directory = tmp_path / "deltas"
    shutil.copytree(root / "deltas", directory)
    *_, (last_seq, _, last_path) = list_deltas(directory)
    held = last_path.read_bytes()
    last_path.unlink()
    result = export_repository(batch_run, tmp_path / "repo", batching=BatchingConfig(instance_count=2))
    module, contract = served_module(batch_run)
    inputs = served_inputs(valid_examples[:64], contract)
    DeltaApplier(module, directory).poll()
    at_previous = scores(module, inputs).numpy()
    final = scores(served_module(root / "online")[0], inputs).numpy()

    def served_scores(client) -> np.ndarray:
        dense, single, multi = inputs
        arrays = {"dense": dense.numpy()}
        arrays.update({name: single[:, i : i + 1].numpy() for i, name in enumerate(contract.sparse_features)})
        arrays.update({name: m.numpy() for name, m in zip(contract.multi_valued_features, multi, strict=True)})
        request = []
        for name, array in arrays.items():
            tensor = httpclient.InferInput(name, list(array.shape), "FP32" if array.dtype == np.float32 else "INT64")
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        return client.infer("ranker", request).as_numpy("score").reshape(-1)

    def versions(server) -> list[float]:
        text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gpurec_ranker_sync_version{")]

    server_env = {"GPUREC_SYNC_DIR": str(directory)}
    for server in serve_for_tests(result.repo, env=server_env):
        client = httpclient.InferenceServerClient(server.http_url)
        try:
            assert versions(server) == [last_seq - 1, last_seq - 1]  # both instances caught up at load
            np.testing.assert_allclose(served_scores(client), at_previous, rtol=0, atol=1e-6)
            last_path.write_bytes(held)
            deadline = time.monotonic() + 30
            while versions(server) != [last_seq, last_seq] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert versions(server) == [last_seq, last_seq]
            for _ in range(4):  # either instance may answer: both serve the new parameters
                np.testing.assert_allclose(served_scores(client), final, rtol=0, atol=1e-6)
        finally:
            client.close()




def test_touched_rows_match_torchrec_model_delta_tracker(batch_run, valid_examples):
    """The rows parameter sync ships (the trainer's own bitmap) are exactly the rows TorchRec's
    ModelDeltaTracker (ID_ONLY) reports for the same steps."""
    from torchrec.distributed.model_tracker.types import DeltaTrackerConfig, TrackingMode

    from gpurec.embedding.rows import TouchedRows
    from gpurec.model.checkpoint import find_checkpoint, read_trained_run
    from gpurec.sync.examples import to_batch
    from gpurec.train.config import TrainConfig
    from gpurec.train.distributed import init_distributed
    from gpurec.train.recipe import build_trainer

    source = find_checkpoint(batch_run)
    run = read_trained_run(source)
    config = TrainConfig.from_dict(dict(run.train_config))
    trainer = build_trainer(run, config, init_distributed("cpu"), ([0.0] * run.num_dense, [1.0] * run.num_dense))
    trainer.resume(source)
    tracker = trainer.model.init_torchrec_delta_tracker(
        DeltaTrackerConfig(tracking_mode=TrackingMode.ID_ONLY, delete_on_read=True)
    )
    trainer.touched = TouchedRows(list(run.sparse_specs))
    for start in range(0, 768, 256):
        trainer.step(to_batch(valid_examples[start : start + 256], run))
    ours = trainer.touched.take()
    theirs = tracker.get_unique_ids()
    feature_of = {fqn: next(part for part in fqn.split(".") if part.startswith("t_"))[2:] for fqn in theirs}
    assert sorted(feature_of.values()) == sorted(f for f, rows in ours.items() if rows.numel())
    for fqn, rows in theirs.items():
        assert torch.equal(torch.unique(rows.cpu()), ours[feature_of[fqn]]), fqn
