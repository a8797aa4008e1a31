"""How well online training predicts what comes next: progressive validation, kept with checkpoints.

Every online step scores its batch before updating on it, so each example's score comes from a
model that has not trained on it: the AUC of those scores is the online learner's AUC on live
traffic (progressive validation). `ProgressiveScores` keeps them per example (topic partition and
offset, so each is identified exactly) and writes them, at each checkpoint and BEFORE it, as
`<out>/progressive/step-<step>.rank-<r>.npz`; a trainer restarted from an older checkpoint deletes
files past it, so each example's score is counted once, like the example itself.

`frozen_scores` scores the same examples with another model (the batch model the trainer started
from), so `online_vs_frozen` compares both on exactly the same served traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gpurec.stream.log import EventLog
from gpurec.stream.records import Example, decoder
from gpurec.sync.examples import Taken, to_batch
from gpurec.train.metrics import auc

PROGRESSIVE_DIR = "progressive"


class ProgressiveScores:
    """Pre-update scores of one rank's trained examples since the last checkpoint."""

    def __init__(self, out_dir: Path, tasks: Sequence[str], rank: int) -> None:
        self.directory = Path(out_dir) / PROGRESSIVE_DIR
        self.tasks, self.rank = tuple(tasks), rank
        self._clear()

    def _clear(self) -> None:
        self.where: list[np.ndarray] = []
        self.scores: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}
        self.labels: dict[str, list[np.ndarray]] = {t: [] for t in self.tasks}

    def add(self, logits: dict[str, torch.Tensor], taken: Sequence[Taken]) -> None:
        self.where.append(np.array([(t.partition, t.offset) for t in taken], dtype=np.int64).reshape(-1, 2))
        for task in self.tasks:
            self.scores[task].append(logits[task].float().cpu().numpy().reshape(-1))
            self.labels[task].append(np.array([float(getattr(t.example, task)) for t in taken], dtype=np.float32))

    def save(self, step: int) -> None:
        """Write what was scored since the last save (call before the checkpoint of `step`)."""
        if not self.where:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {"where": np.concatenate(self.where)}
        for task in self.tasks:
            arrays[f"score_{task}"] = np.concatenate(self.scores[task])
            arrays[f"label_{task}"] = np.concatenate(self.labels[task])
        path = self.directory / f"step-{step:08d}.rank-{self.rank}.npz"
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, **arrays)
        temporary.replace(path)
        self._clear()

    def forget_after(self, step: int) -> None:
        """Delete files of steps past `step` (written before a checkpoint that never completed)."""
        for path in self.directory.glob("step-*.npz") if self.directory.is_dir() else []:
            if int(path.name.split(".")[0].removeprefix("step-")) > step:
                path.unlink()


def load_progressive(out_dir: str | Path) -> dict[str, np.ndarray]:
    """Every saved score of an online run: `where` [N, 2] (partition, offset), score_/label_<task>."""
    files = sorted((Path(out_dir) / PROGRESSIVE_DIR).glob("step-*.npz"))
    parts = [dict(np.load(f)) for f in files]
    if not parts:
        return {}
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def task_aucs(scores: dict[str, np.ndarray], tasks: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for task in tasks:
        labels = scores.get(f"label_{task}")
        if labels is None or not 0 < labels.sum() < len(labels):
            out[task] = None
        else:
            out[task] = round(auc(labels, scores[f"score_{task}"]), 4)
    return out


def frozen_scores(run_dir: str | Path, examples: Sequence[Example], chunk: int = 4096) -> dict[str, np.ndarray]:
    """Each example's logit per task from a trained run's model (unsharded, its id lookup)."""
    from gpurec.model.trained import load_trained_model

    model, lookup, run = load_trained_model(run_dir)
    out: dict[str, list[np.ndarray]] = {t: [] for t in run.model_config.tasks}
    with torch.inference_mode():
        for start in range(0, len(examples), chunk):
            batch = to_batch(examples[start : start + chunk], run)
            logits = model(batch.dense_features, lookup(batch.sparse_features))
            for task in out:
                out[task].append(logits[task].float().numpy().reshape(-1))
    return {task: np.concatenate(parts) if parts else np.zeros(0) for task, parts in out.items()}


def online_vs_frozen(log: EventLog, online_dir: str | Path, frozen_run: str | Path, topic: str = "examples") -> dict[str, object]:
    """AUC of the online learner's progressive scores and of the frozen model on the same examples."""
    saved = load_progressive(online_dir)
    if not saved or not len(saved["where"]):
        return {"examples_scored": 0}
    wanted = {(int(p), int(o)) for p, o in saved["where"]}
    found: dict[tuple[int, int], Example] = {}
    decode = decoder(Example)
    for partition in range(log.partitions(topic)):
        mine = sorted(o for p, o in wanted if p == partition)
        if not mine:
            continue
        offset = mine[0]
        while offset <= mine[-1] and (records := log.read(topic, partition, offset, 5_000)):
            for record in records:
                if (partition, record.offset) in wanted:
                    found[(partition, record.offset)] = decode(record.value)
            offset = records[-1].offset + 1
    order = [found[(int(p), int(o))] for p, o in saved["where"]]
    tasks = [k.removeprefix("score_") for k in saved if k.startswith("score_")]
    frozen = frozen_scores(frozen_run, order)
    frozen_saved = {f"score_{t}": frozen[t] for t in tasks} | {f"label_{t}": saved[f"label_{t}"] for t in tasks}
    online, baseline = task_aucs(saved, tasks), task_aucs(frozen_saved, tasks)
    report: dict[str, object] = {"examples_scored": len(order)}
    for task in tasks:
        report[f"auc_online_{task}"] = online[task]
        report[f"auc_frozen_{task}"] = baseline[task]
    return report
