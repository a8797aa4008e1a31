"""`export`: a trained checkpoint -> a versioned Triton model repository.

Layout written (each export adds version N+1 of every model, so a `recommend` or `feed` version
always calls the `ranker` version it was exported with):

    REPO/ranker/config.pbtxt            generated from the contract (gpurec.serve.model_config)
    REPO/ranker/N/model.pt              TorchScript: remap + DLRM + combined score (artifact.py)
    REPO/ranker/N/model.py              triton_models/ranker/model.py (python backend)
    REPO/ranker/N/gpurec_deltas.py      gpurec/sync/deltafile.py: reads and applies parameter deltas
    REPO/ranker/N/contract.json         inputs, order, dtypes, tasks, score weights
    REPO/recommend/config.pbtxt
    REPO/recommend/N/model.py           triton_models/recommend/model.py (BLS -> ranker N, top-k)
    REPO/recommend/N/contract.json
    REPO/feed/config.pbtxt              parameters: feature store, event log, knobs (feed_settings.py)
    REPO/feed/N/model.py                triton_models/feed/model.py (BLS: candidates -> store -> ranker N -> log)
    REPO/feed/N/contract.json
    REPO/consent/config.pbtxt           parameters: the feed's feature store and event log
    REPO/consent/N/model.py             triton_models/consent/model.py (consent change -> store + `consent` topic)

Before a version is moved into place the saved artifact is loaded back and compared with the
eager model on generated rows, so a repository never holds an artifact whose scores differ
from the trained model's. Versions are written to a temporary directory and renamed, so a server
polling the repository never sees half a version.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import TrainedRun
from gpurec.model.dlrm import MultiTaskDLRM
from gpurec.model.trained import load_trained_model
from gpurec.serve.artifact import build_serving_ranker, save_artifact, to_tensors
from gpurec.serve.contract import (
    CONTRACT_FILE,
    DENSE_INPUT,
    PAD_ID,
    RANKER_MODEL,
    RECOMMEND_MODEL,
    SCORE_OUTPUT,
    ServingContract,
)
from gpurec.serve.feed_contract import CONSENT_MODEL, FEED_MODEL
from gpurec.serve.feed_settings import FeedSettings, normalise_url
from gpurec.serve.model_config import (
    BatchingConfig,
    consent_config,
    feed_config,
    instance_kind,
    ranker_config,
    recommend_config,
)
from gpurec.sync import deltafile

TRITON_MODELS = Path(__file__).resolve().parents[2] / "triton_models"
"""The python-backend model code, kept at the repository root (a source checkout / editable install)."""

MODELS = (RANKER_MODEL, RECOMMEND_MODEL, FEED_MODEL, CONSENT_MODEL)
CONSENT_PARAMETERS = ("feature_store", "event_log", "served_partitions")  # the feed's settings it shares
DELTA_CODE = "gpurec_deltas.py"  # beside the ranker's model.py: gpurec/sync/deltafile.py
DEFAULT_MAX_BATCH_SIZE = 1024
CHECK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class ExportResult:
    repo: Path
    version: int
    contract: ServingContract
    max_abs_diff: float

    def to_json(self) -> dict[str, Any]:
        return {
            "repo": str(self.repo),
            "version": self.version,
            "models": list(MODELS),
            "max_abs_diff": self.max_abs_diff,
            "inputs": [s.name for s in self.contract.ranker_inputs()],
        }


def contract_for(model: MultiTaskDLRM, run: TrainedRun, max_batch_size: int) -> ServingContract:
    """The contract of a trained model: feature order from the model, dense names from its manifest."""
    from gpurec.preprocess.features import raw_hashing_rules

    multi = {spec.name for spec in run.sparse_specs if spec.multi_valued}
    names = list(model.sparse_feature_names)
    dense_names, hashing = _dense_names_and_hashing(run)
    return ServingContract(
        dense_features=tuple(dense_names),
        sparse_features=tuple(n for n in names if n not in multi),
        multi_valued_features=tuple(n for n in names if n in multi),
        tasks=tuple(run.model_config.tasks),
        score_weights={t: float(w) for t, w in model.score_weights.items()},
        max_batch_size=max_batch_size,
        hashing=hashing,
        raw_hashing=raw_hashing_rules(names),  # from the feature list, the one source of the rules
    )


def _dense_names_and_hashing(run: TrainedRun) -> tuple[list[str], str]:
    """Dense feature names in input order, from the training data's manifest when it is still there.

    The checkpoint records only the dense count; without the manifest, the names of the current
    feature list are used if the count matches (else `dense_<i>`), which is only a label: the
    order the model needs is the manifest's.
    """
    num_dense = run.num_dense
    manifest_path = Path(run.data_dir) / "manifest.json"
    if manifest_path.is_file():
        data = json.loads(manifest_path.read_text())
        by_column = {f["column"]: f["name"] for f in data["features"] if f["kind"] == "dense"}
        names = [by_column[c] for c in data["dense_order"]]
        if len(names) == num_dense:
            return names, data.get("hashing", "")
    from gpurec.preprocess.features import DENSE_FEATURES, HASHING_SCHEME

    if len(DENSE_FEATURES) == num_dense:
        return [f.name for f in DENSE_FEATURES], HASHING_SCHEME
    return [f"dense_{i}" for i in range(num_dense)], HASHING_SCHEME


def next_version(repo: Path) -> int:
    """One more than the highest numeric version directory of any model (1 for a new repo)."""
    versions = [
        int(p.name)
        for model in MODELS
        if (repo / model).is_dir()
        for p in (repo / model).iterdir()
        if p.is_dir() and p.name.isdigit()
    ]
    return max(versions, default=0) + 1


def sample_rows(
    contract: ServingContract, rows: int = 64, seed: int = 0, known_ids: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Generated contract rows (random hashed ids, some padding, unit-scale dense) for checks.

    With `known_ids` (per feature, ids that have a row), about half the ids are drawn from them,
    so a check covers both admitted ids and the default path of unknown ones.
    """
    rng = np.random.default_rng(seed)
    known_ids = known_ids or {}
    arrays: dict[str, np.ndarray] = {
        DENSE_INPUT: rng.normal(size=(rows, len(contract.dense_features))).astype(np.float32)
    }

    def draw(name: str, shape: tuple[int, int]) -> np.ndarray:
        ids = rng.integers(-(2**63), 2**63 - 1, size=shape, dtype=np.int64)
        known = known_ids.get(name)
        if known is not None and known.size:
            use = rng.random(shape) < 0.5
            ids[use] = rng.choice(known, size=int(use.sum()))
        ids[ids == PAD_ID] = 0
        return ids

    for name in contract.sparse_features:
        arrays[name] = draw(name, (rows, 1))
    for name in contract.multi_valued_features:
        ids = draw(name, (rows, 4))
        ids[np.arange(4)[None, :] >= rng.integers(0, 5, size=(rows, 1))] = PAD_ID
        arrays[name] = ids
    return arrays


def eager_scores(model: MultiTaskDLRM, remap: nn.Module, contract: ServingContract, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The trained eager model's per-task probabilities and score for contract rows (the reference)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    dense, single, multi = to_tensors(arrays, contract)
    keys = [*contract.sparse_features, *contract.multi_valued_features]
    values = [single[:, i] for i in range(single.shape[1])]
    lengths = [torch.ones(len(dense), dtype=torch.int32) for _ in contract.sparse_features]
    for ids in multi:
        rows = [row[row != PAD_ID] for row in ids]
        values.append(torch.cat(rows))
        lengths.append(torch.tensor([len(r) for r in rows], dtype=torch.int32))
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))
    with torch.no_grad():
        logits = model(dense, remap(sparse))
        out = {task: torch.sigmoid(logits[task]).numpy() for task in contract.tasks}
        out[SCORE_OUTPUT] = model.ranking_score(logits).numpy()
    return out


def export_repository(
    checkpoint: str | Path,
    repo: str | Path,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batching: BatchingConfig | None = None,
    use_gpu: bool | None = None,
    feed: FeedSettings | None = None,
) -> ExportResult:
    """Export the checkpoint's model as the next version of `ranker`, `recommend`, `feed` and `consent` in `repo`.

    `feed` holds the feed's settings (feature store and event log URLs, knobs) for
    `feed/config.pbtxt`; without URLs the feed loads but answers UNAVAILABLE until the server is
    given them (`gpurec serve --feature-store URL --event-log URL`).
    """
    feed = _checked_feed_settings(feed or FeedSettings())
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise InvalidInput(f"--repo {repo} is a file, not a model repository directory")
    model_code = {name: TRITON_MODELS / name / "model.py" for name in MODELS}
    missing = [str(p) for p in model_code.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"python-backend model code not found: {missing} (export runs from a gpurec source checkout)")
    model, remap, run = load_trained_model(checkpoint)
    contract = contract_for(model, run, max_batch_size)
    scripted = build_serving_ranker(model, remap, contract)

    repo.mkdir(parents=True, exist_ok=True)
    version = next_version(repo)
    with tempfile.TemporaryDirectory(prefix=f".{repo.name}-export-", dir=repo.resolve().parent) as tmp:
        staged = {name: Path(tmp) / name for name in model_code}
        for name, directory in staged.items():
            directory.mkdir()
            shutil.copy2(model_code[name], directory / "model.py")
            contract.save(directory / CONTRACT_FILE)
        artifact = save_artifact(scripted, staged[RANKER_MODEL])
        shutil.copy2(deltafile.__file__, staged[RANKER_MODEL] / DELTA_CODE)  # the ranker applies deltas with it
        max_diff = _check_artifact(artifact, model, remap, contract)
        for name, directory in staged.items():
            (repo / name).mkdir(exist_ok=True)
            directory.rename(repo / name / str(version))
    kind = instance_kind(use_gpu)
    _write_atomic(repo / RANKER_MODEL / "config.pbtxt", ranker_config(contract, kind, batching))
    _write_atomic(repo / RECOMMEND_MODEL / "config.pbtxt", recommend_config(contract))
    _write_atomic(repo / FEED_MODEL / "config.pbtxt", feed_config(feed.parameters()))
    consent = {k: v for k, v in feed.parameters().items() if k in CONSENT_PARAMETERS}
    _write_atomic(repo / CONSENT_MODEL / "config.pbtxt", consent_config(consent))
    return ExportResult(repo=repo, version=version, contract=contract, max_abs_diff=max_diff)


def _check_artifact(path: Path, model: MultiTaskDLRM, remap: nn.Module, contract: ServingContract) -> float:
    """Load the saved artifact back and compare it with the eager model; refuse a mismatch."""
    loaded = torch.jit.load(str(path))
    known = {name: remap.stored_ids(name).numpy() for name in remap.features}  # hashed: none
    arrays = sample_rows(contract, known_ids=known)
    expected = eager_scores(model, remap, contract, arrays)
    with torch.no_grad():
        got = loaded(*to_tensors(arrays, contract))
    diff = max(float(np.max(np.abs(got[name].numpy() - expected[name]))) for name in expected)
    if not diff <= CHECK_TOLERANCE:
        raise RuntimeError(f"exported artifact differs from the trained model by {diff:.3g} (> {CHECK_TOLERANCE})")
    return diff


def _checked_feed_settings(feed: FeedSettings) -> FeedSettings:
    """The feed's settings with SQLite paths made absolute (the server resolves them from its own
    working directory) and the candidate knobs checked now rather than when the server loads."""
    feed.candidate_config()
    urls = {
        name: normalise_url(getattr(feed, name), f"--{name.replace('_', '-')}")
        for name in ("feature_store", "event_log")
        if getattr(feed, name)
    }
    return dataclasses.replace(feed, **urls)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
