"""What a model still remembers of forgotten users: a loss-based membership-inference attack.

The question an erasure must answer: can someone holding the model tell that a user's data was
trained on? The experiment, on one preprocessed dataset's train split:

1. users with enough examples are split at random (seeded) into three equal groups: *forgotten*
   F and *kept* K (both trained on: members) and *non-members* N (never trained on, from the same
   days, so the split is honest: N differs from F only in not being trained on);
2. model A trains on F + K (several epochs, so that it memorises what it can); model B, the exact
   erasure, retrains from the same initial weights on K alone;
3. the attack scores a user by minus the mean loss of their examples (members' examples were
   trained on, so a model that memorises fits them better); its AUC separating F from N is
   measured on A (before), on A after `Trainer.forget` of every F user (their rows released and
   zeroed, deny-listed: they now read the default row), and on B (what a retrain achieves);
4. a second attack isolates the user rows: the likelihood ratio of the user's own row against the
   default row (mean loss with a never-seen user id minus mean loss with theirs). After forgetting,
   it is exactly 0 for F as for N: the row holds nothing of them.

What this measures is reported as it comes out: the user-row attack drops to 0.5 exactly, while
the loss attack after forgetting stays above the retrain's value, because the item rows and the
shared dense weights that F's examples trained still fit those examples better. That trace lasts
until the next retrain without the user's data (batch training from the purged Parquet).

`python -m gpurec.privacy.membership FEATURES [--seeds 0 1 2] [--epochs 4] [--config small.toml]`
prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpurec.embedding.idmap import serving_lookup
from gpurec.model.checkpoint import TrainedRun
from gpurec.model.config import ModelConfig
from gpurec.preprocess.manifest import load_manifest
from gpurec.stream.records import Example
from gpurec.sync.examples import examples_from_features, to_batch
from gpurec.train.config import TrainConfig, load_configs
from gpurec.train.distributed import init_distributed
from gpurec.train.metrics import auc
from gpurec.train.recipe import Trainer, build_trainer, sparse_specs

USER_FEATURE = "user_id"
NEVER_SEEN = 0x3B1D_55E0_9A7C_4F21  # a table key no dataset holds: reads the default row


@dataclass(frozen=True)
class MembershipResult:
    """Attack AUCs (forgotten users against non-members; 0.5 = no better than a coin)."""

    seed: int
    users_per_group: int
    examples_trained: int
    loss_auc_before: float  # model A, F trained on
    loss_auc_after_forget: float  # model A after Trainer.forget of every F user
    loss_auc_retrained: float  # model B, trained without F: what an exact erasure leaves
    row_auc_before: float  # own row vs default row, model A
    row_auc_after_forget: float
    seconds: float


def split_users(examples: Sequence[Example], seed: int, min_examples: int = 8) -> tuple[list[int], list[int], list[int]]:
    """(forgotten, kept, non-members): users with at least `min_examples`, in three equal groups."""
    counts: dict[int, int] = defaultdict(int)
    for example in examples:
        counts[example.served.user_id] += 1
    users = sorted(u for u, n in counts.items() if n >= min_examples)
    random.Random(seed).shuffle(users)
    third = len(users) // 3
    return users[:third], users[third : 2 * third], users[2 * third : 3 * third]


def new_trainer(features: str | Path, model_config: ModelConfig, train_config: TrainConfig) -> Trainer:
    """A fresh single-process trainer for a dataset (seeded init: two calls start identical)."""
    manifest = load_manifest(features)
    specs = sparse_specs(manifest, model_config, train_config)
    dense_stats = manifest.dense_normalization("train")
    run = TrainedRun(
        model_config=model_config,
        sparse_specs=tuple(specs),
        num_dense=len(dense_stats[0]),
        labels=tuple(manifest.label_names),
        data_dir=str(Path(features).resolve()),
        world_size=1,
        train_config=asdict(train_config),
    )
    return build_trainer(run, train_config, init_distributed(train_config.device), dense_stats)


def fit(trainer: Trainer, examples: Sequence[Example], epochs: int, batch_size: int, seed: int) -> None:
    order = list(examples)
    for epoch in range(epochs):
        random.Random(seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            trainer.step(to_batch(order[start : start + batch_size], trainer.run))


def example_losses(trainer: Trainer, examples: Sequence[Example], as_never_seen: bool = False) -> np.ndarray:
    """Each example's loss (summed over tasks) under the trainer's model, read-only: ids map to
    rows through the serving lookup, which admits nothing. `as_never_seen` replaces the user id
    by one no model has seen (the default row)."""
    lookup = serving_lookup([trainer.ids])
    tasks = trainer.run.model_config.tasks
    column = {name: i for i, name in enumerate(trainer.run.labels)}
    out = []
    trainer.model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), 1024):
                batch = to_batch(examples[start : start + 1024], trainer.run)
                sparse = batch.sparse_features
                if as_never_seen:
                    sparse = _with_user(sparse, NEVER_SEEN)
                logits = trainer.model(batch.dense_features, lookup(sparse))
                loss = sum(
                    F.binary_cross_entropy_with_logits(logits[t].reshape(-1), batch.labels[:, column[t]], reduction="none")
                    for t in tasks
                )
                out.append(loss.numpy())
    finally:
        trainer.model.train()
    return np.concatenate(out)


def _with_user(sparse, user_key: int):
    keys = sparse.keys()
    index = keys.index(USER_FEATURE)
    offsets = sparse.offset_per_key()
    values = sparse.values().clone()
    values[offsets[index] : offsets[index + 1]] = user_key
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=sparse.lengths(), stride=sparse.stride())


def _per_user(losses: np.ndarray, users: list[int]) -> dict[int, float]:
    sums: dict[int, list[float]] = defaultdict(list)
    for user, loss in zip(users, losses.tolist(), strict=True):
        sums[user].append(loss)
    return {user: float(np.mean(values)) for user, values in sums.items()}


def attack_aucs(trainer: Trainer, examples: Sequence[Example], members: list[int], non_members: list[int]) -> tuple[float, float]:
    """(loss attack AUC, own-row-vs-default-row attack AUC) separating `members` from `non_members`."""
    wanted = set(members) | set(non_members)
    chosen = [e for e in examples if e.served.user_id in wanted]
    users = [e.served.user_id for e in chosen]
    own = _per_user(example_losses(trainer, chosen), users)
    default = _per_user(example_losses(trainer, chosen, as_never_seen=True), users)
    order = members + non_members
    labels = [1] * len(members) + [0] * len(non_members)
    loss_auc = auc(labels, [-own[u] for u in order])
    row_auc = auc(labels, [default[u] - own[u] for u in order])
    return loss_auc, row_auc


def membership_experiment(
    features: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    seed: int = 0,
    epochs: int = 4,
    examples: Sequence[Example] | None = None,
) -> MembershipResult:
    """Run the experiment of the module docstring on the train split of `features`."""
    began = time.perf_counter()
    examples = list(examples) if examples is not None else examples_from_features(features, "train")
    forgotten, kept, outside = split_users(examples, seed)
    groups = {u: "F" for u in forgotten} | {u: "K" for u in kept}
    members = [e for e in examples if e.served.user_id in groups]
    kept_only = [e for e in members if groups[e.served.user_id] == "K"]
    train_config = replace(train_config, seed=seed)

    model_a = new_trainer(features, model_config, train_config)
    fit(model_a, members, epochs, train_config.batch_size, seed)
    loss_before, row_before = attack_aucs(model_a, examples, forgotten, outside)
    keys = torch.tensor([e.served.model_inputs().sparse[USER_FEATURE][0] for e in members if groups[e.served.user_id] == "F"])
    model_a.forget({USER_FEATURE: torch.unique(keys)})
    loss_after, row_after = attack_aucs(model_a, examples, forgotten, outside)

    model_b = new_trainer(features, model_config, train_config)
    fit(model_b, kept_only, epochs, train_config.batch_size, seed)
    loss_retrained, _ = attack_aucs(model_b, examples, forgotten, outside)
    return MembershipResult(
        seed=seed,
        users_per_group=len(forgotten),
        examples_trained=len(members),
        loss_auc_before=round(loss_before, 4),
        loss_auc_after_forget=round(loss_after, 4),
        loss_auc_retrained=round(loss_retrained, 4),
        row_auc_before=round(row_before, 4),
        row_auc_after_forget=round(row_after, 4),
        seconds=round(time.perf_counter() - began, 1),
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gpurec.privacy.membership", description=__doc__.splitlines()[0])
    parser.add_argument("features", help="a preprocessed dataset (gpurec preprocess --out)")
    parser.add_argument("--config", help="model/train TOML (default: the default config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    model_config, train_config = load_configs(args.config)
    examples = examples_from_features(args.features, "train")
    for seed in args.seeds:
        result = membership_experiment(args.features, model_config, train_config, seed, args.epochs, examples)
        print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
