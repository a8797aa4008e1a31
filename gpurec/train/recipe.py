"""The training recipe: preprocessed features in, a sharded multi-task DLRM checkpoint out.

Read it top to bottom: join the process group, read the manifest, build the model with its
embedding tables on `meta`, fuse RowWiseAdagrad into the tables and shard them with
DistributedModelParallel, set up this rank's partition of the collisionless id maps (ids -> rows,
in front of the tables), resume from the latest checkpoint if there is one, then the loop, whose
every step first maps the batch's ids to rows (re-initialising rows handed to new ids). At each
epoch end (or every `validate_every` steps) and at the end, a checkpoint is saved and scored on the
valid split; `checkpoints/best` follows the best one, and training stops early once `patience`
validations in a row have not beaten it.
Runs the same as one process, under `torchrun --nproc_per_node N` on CPU (gloo), and on GPU
nodes (NCCL), where only the device differs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.config import aligned_rows
from gpurec.embedding.idmap import IdMap, id_map_for
from gpurec.embedding.rows import RowReinitializer, TouchedRows
from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import (
    TrainedRun,
    TrainerState,
    Validation,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    mark_best,
    read_trainer_state,
    save_checkpoint,
    write_trainer_state,
)
from gpurec.model.config import ModelConfig
from gpurec.model.dlrm import task_losses
from gpurec.model.sharded import combined_optimizer, shard_model
from gpurec.model.trained import build_ranker
from gpurec.preprocess.manifest import Manifest, load_manifest
from gpurec.train.config import TrainConfig
from gpurec.train.data import LoaderConfig, ParquetBatches, TimedBatch
from gpurec.train.distributed import DistContext, all_reduce_mean, init_distributed
from gpurec.train.metrics_log import MetricsLog
from gpurec.train.validation import check_valid_labels, has_valid_rows, record_validation, validation_auc


def sparse_specs(manifest: Manifest, model_config: ModelConfig, train_config: TrainConfig) -> list[SparseFeatureSpec]:
    """One table per sparse feature, sized from the manifest's cardinality estimate.

    Explicit `num_embeddings` in the model config win; otherwise rows_per_id x the estimate
    (fewer collisions under modulo hashing, room for new ids in collisionless tables), between
    min_rows and default_num_embeddings. Rows are rounded up to a multiple of 8 so that 1, 2, 4
    or 8 ranks split every table evenly (and into the same blocks as TorchRec's row-wise plan).
    """
    sizes = {}
    for feature in manifest.sparse_features:
        estimate = feature.cardinality_estimate or model_config.default_num_embeddings
        sizes[feature.name] = aligned_rows(
            min(model_config.default_num_embeddings, max(train_config.min_rows, math.ceil(train_config.rows_per_id * estimate)))
        )
    sizes.update(model_config.num_embeddings)
    config = ModelConfig(**{**asdict(model_config), "num_embeddings": sizes})
    multi = [f.name for f in manifest.sparse_features if f.multi_valued]
    return config.sparse_specs([f.name for f in manifest.sparse_features], multi_valued=multi)


def labels_by_task(labels: torch.Tensor, names: list[str], tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    column = {name: i for i, name in enumerate(names)}
    missing = [t for t in tasks if t not in column]
    if missing:
        raise InvalidInput(f"model tasks {missing} have no label column in the manifest (labels: {names})")
    return {task: labels[:, column[task]] for task in tasks}


class StepResult(NamedTuple):
    loss: torch.Tensor  # summed over tasks
    per_task: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]  # by task, detached


@dataclass
class Trainer:
    """What a training loop steps: the sharded model, its optimizers, this rank's id maps.

    Shared by batch training (`train` below) and online training (`gpurec.sync.online`), so both
    learn with exactly the same model, tables, optimizers and id admission.
    """

    model: nn.Module  # DistributedModelParallel
    optimizer: Any
    ids: IdMap
    reinit: RowReinitializer
    run: TrainedRun
    touched: TouchedRows | None = None  # set by parameter sync: the rows each step reads

    def rows_of(self, batch: TimedBatch) -> KeyedJaggedTensor:
        """The batch's ids as table rows; rows handed to new ids start from their initial value."""
        rows, admitted = self.ids.assign(batch.sparse_features, batch.event_time_ms)
        self.reinit.apply(admitted)
        if self.touched is not None:
            self.touched.add(rows)
        return rows

    def forget(self, ids_by_feature: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Erase hashed ids (table keys) per feature, on every rank with the same ids: the id map
        releases their rows and deny-lists them, the rows' embedding and optimizer state are
        zeroed (no trace left in the table or the next checkpoint) and marked changed, so the
        next parameter-sync delta ships the zeros and the freed id-map slots to every server.
        The ids then read the default row, as ids never seen do. Returns the released rows per
        feature (none with hashed tables, whose rows are shared: see `IdMap.forget`)."""
        released = self.ids.forget(ids_by_feature)
        self.reinit.zero(released)
        if self.touched is not None:
            self.touched.mark(released)
        return released

    def step(self, batch: TimedBatch, loss_scale: float = 1.0) -> StepResult:
        """One optimizer step on a batch already on the device. The logits come from the forward
        pass before the update: scores of examples the model has not trained on yet.

        `loss_scale` multiplies the loss before the backward pass (the returned losses are not
        scaled): online training weighs a micro-batch of n examples by n / batch training's batch
        size, so that each example moves the model as far as it did in batch training."""
        logits = self.model(batch.dense_features, self.rows_of(batch))
        tasks = self.run.model_config.tasks
        per_task = task_losses(logits, labels_by_task(batch.labels, list(self.run.labels), tasks))
        loss = torch.stack(list(per_task.values())).sum()  # = multi_task_loss, keeping the parts to log
        self.optimizer.zero_grad()
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        self.optimizer.step()
        return StepResult(loss, per_task, {task: value.detach() for task, value in logits.items()})

    def resume(self, checkpoint: Path) -> TrainerState:
        """Load a checkpoint's model, optimizer state and id maps; return where it stood."""
        written = read_trainer_state(checkpoint).run
        self.ids.check_resume(written.world_size if written is not None else self.run.world_size)
        state = load_checkpoint(checkpoint, self.model, self.optimizer, ids=self.ids)
        # The re-initialiser keeps views into the tables' (and optimizer's) storage: take them anew.
        self.reinit = RowReinitializer(self.model, self.optimizer, list(self.run.sparse_specs))
        return state


def build_trainer(
    run: TrainedRun, train_config: TrainConfig, ctx: DistContext, dense_stats: tuple[list[float], list[float]]
) -> Trainer:
    """The sharded model with seeded initial weights, fused RowWiseAdagrad tables, Adagrad on the
    dense part, and this rank's partition of the id maps ([model.ids] kind)."""
    specs = list(run.sparse_specs)
    # Seeded init on CPU, then loaded into the sharded model: every world size starts from the
    # same weights, so a 2-rank run can be compared step by step with a 1-rank run.
    initial = build_ranker(run.model_config, specs, dense_stats, train_config.seed).state_dict()
    model = build_ranker(run.model_config, specs, dense_stats, train_config.seed, device="meta")
    sharding = None if train_config.sharding == "auto" else [train_config.sharding]
    sharded = shard_model(model, ctx.device, sparse_lr=train_config.sparse_lr, sharding_types=sharding)
    sharded.load_state_dict(initial)
    del initial
    optimizer = combined_optimizer(sharded, lambda params: torch.optim.Adagrad(params, lr=train_config.dense_lr))
    ids = id_map_for(run.model_config.ids, specs, ctx.rank, ctx.world_size, ctx.device)
    return Trainer(sharded, optimizer, ids, RowReinitializer(sharded, optimizer, specs), run)


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    model_config: ModelConfig,
    train_config: TrainConfig,
    progress: bool = True,
) -> dict:
    """Train (or resume) and return a summary: steps, samples, final loss, samples/s, wait time."""
    ctx: DistContext = init_distributed(train_config.device)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"--out {out_dir} is a file, not a directory")
    manifest = load_manifest(data_dir)
    manifest.require_rows("train", data_dir)
    specs = sparse_specs(manifest, model_config, train_config)
    dense_stats = manifest.dense_normalization("train")
    num_dense = len(dense_stats[0])

    run = TrainedRun(
        model_config=model_config,
        sparse_specs=tuple(specs),
        num_dense=num_dense,
        labels=tuple(manifest.label_names),
        data_dir=str(Path(data_dir).resolve()),
        world_size=ctx.world_size,
        train_config=asdict(train_config),
    )
    trainer = build_trainer(run, train_config, ctx, dense_stats)
    state = TrainerState(run=run)
    resume_from = latest_checkpoint(out_dir)
    if resume_from is not None:
        state = trainer.resume(resume_from)
        state.run = replace(run, resumed_from=str(resume_from))
    sharded, optimizer, ids = trainer.model, trainer.optimizer, trainer.ids
    # Validation needs valid rows: a world of too few days has none, and then trains without it.
    validating = train_config.validate and has_valid_rows(manifest)
    if validating:
        check_valid_labels(manifest, data_dir, model_config.tasks)
    state.validation = (state.validation or Validation()) if validating else None

    loader = ParquetBatches(
        manifest.split_files("train", data_dir),
        manifest,
        LoaderConfig(
            batch_size=train_config.batch_size,
            seed=train_config.seed,
            prefetch=train_config.prefetch,
            shuffle_days=train_config.shuffle_days,
        ),
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    log = MetricsLog(out_dir, enabled=ctx.is_main)
    total_steps = train_config.max_steps or train_config.epochs * len(loader)
    bar = _progress_bar(total_steps, state.step, enabled=progress and ctx.is_main)
    started, first_step, last_loss = time.perf_counter(), state.step, float("nan")
    validation_s = 0.0  # time spent validating, left out of samples/s

    def save() -> Path:
        return save_checkpoint(out_dir, sharded, optimizer, state, ids=ids, keep_best=validating)

    def validate(checkpoint: Path) -> bool:
        """Score a checkpoint at the current step on the valid split and move `best` if it won;
        True when patience is spent. Every rank calls it and gets the same answer."""
        nonlocal validation_s
        began = time.perf_counter()
        aucs = validation_auc(checkpoint, manifest, data_dir, ctx.rank, ctx.world_size)
        improved = record_validation(state.validation, state.step, aucs)
        if ctx.is_main:
            write_trainer_state(checkpoint, state)  # a resumed run continues the count
            if improved:
                mark_best(out_dir, checkpoint)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        v = state.validation
        record = {"step": state.step, "epoch": state.epoch, "valid_auc": sum(aucs.values()) / len(aucs)}
        record.update({f"valid_auc_{task}": value for task, value in aucs.items()})
        log.write_validation({**record, "best_step": v.best_step, "since_best": v.since_best})
        validation_s += time.perf_counter() - began
        return _patience_spent(state.validation, train_config.patience)

    # A run that already stopped early stays stopped (unless rerun with more patience).
    stop = validating and _patience_spent(state.validation, train_config.patience)
    sharded.train()
    while not stop and state.epoch < train_config.epochs and state.step < total_steps:
        loader.set_epoch(state.epoch, start_batch=state.batch)
        for batch in loader:
            loss, per_task, _ = trainer.step(batch.to(ctx.device, non_blocking=True))
            state.step += 1
            state.batch += 1
            state.samples += loader.global_batch
            if state.step % train_config.log_every == 0 or state.step == total_steps:
                losses = all_reduce_mean(torch.stack([loss, *per_task.values()]))
                last_loss = float(losses[0])
                rate = (state.step - first_step) * loader.global_batch / (time.perf_counter() - started - validation_s)
                record = {"step": state.step, "epoch": state.epoch, "loss": last_loss, "samples_per_s": rate}
                record.update({f"loss_{t}": float(v) for t, v in zip(per_task, losses[1:], strict=True)})
                record["data_wait_s"] = loader.wait_seconds
                log.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_per_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if state.step >= total_steps:
                break  # the end: saved (and validated) below
            if validating and train_config.validate_every and state.step % train_config.validate_every == 0:
                stop = validate(save())
                if stop:
                    break
            elif train_config.checkpoint_every and state.step % train_config.checkpoint_every == 0:
                save()
        else:
            state.epoch, state.batch = state.epoch + 1, 0
            if validating and not train_config.validate_every:
                stop = validate(save())
    bar.close()
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None or read_trainer_state(checkpoint).step != state.step:
        checkpoint = save()
    if validating and state.validation.last_step != state.step:
        validate(checkpoint)  # the last steps since the previous validation count too
    seconds = time.perf_counter() - started
    summary = {
        "steps": state.step,
        "samples": state.samples,
        "loss": last_loss,
        "seconds": round(seconds, 3),
        "samples_per_s": round((state.step - first_step) * loader.global_batch / max(seconds - validation_s, 1e-9)),
        "data_wait_s": round(loader.wait_seconds, 3),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "checkpoint": str(find_checkpoint(out_dir)),  # what evaluation and export read: the best one
        "latest_checkpoint": str(checkpoint),  # where a rerun resumes
        "validation": _validation_summary(state, loader, train_config, validation_s),
        "id_tables": ids.stats() or model_config.ids.kind,  # a hashed map has no stats: its kind
    }
    log.close()
    if ctx.is_main:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _patience_spent(validation: Validation, patience: int) -> bool:
    return patience > 0 and validation.since_best >= patience


def _validation_summary(state: TrainerState, loader: ParquetBatches, config: TrainConfig, seconds: float) -> dict | None:
    v = state.validation
    if v is None:
        return None
    return {
        "best_step": v.best_step,
        "best_epochs": round(v.best_step / len(loader), 2),  # epochs of training in the best checkpoint
        "best_auc": v.best_auc,
        "rounds": v.rounds,
        "stopped_early": _patience_spent(v, config.patience),
        "seconds": round(seconds, 3),
    }


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # In a log file (CI, nohup) redraw rarely instead of ten times a second.
    interval = 0.1 if sys.stderr.isatty() else 15.0
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, mininterval=interval)
