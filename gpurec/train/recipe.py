"""The training recipe: preprocessed features in, a sharded multi-task DLRM checkpoint out.

Read it top to bottom: join the process group, read the manifest, build the model with its
embedding tables on `meta`, fuse RowWiseAdagrad into the tables and shard them with
DistributedModelParallel, set up this rank's partition of the collisionless id maps (ids -> rows,
in front of the tables), resume from the latest checkpoint if there is one, then the loop, whose
every step first maps the batch's ids to rows (re-initialising rows handed to new ids).
Runs the same as one process, under `torchrun --nproc_per_node N` on CPU (gloo), and on GPU
nodes (NCCL), where only the device differs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.config import aligned_rows
from gpurec.embedding.lookup import IdLookup
from gpurec.embedding.modulo import ModuloRemap
from gpurec.embedding.rows import RowReinitializer
from gpurec.model.config import ModelConfig, SparseFeatureSpec
from gpurec.model.dlrm import MultiTaskDLRM, build_model, task_losses
from gpurec.model.sharded import combined_optimizer, shard_model
from gpurec.preprocess.manifest import Manifest, load_manifest
from gpurec.train.checkpoint import (
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from gpurec.train.config import TrainConfig
from gpurec.train.data import LoaderConfig, ParquetBatches
from gpurec.train.distributed import DistContext, all_reduce_mean, init_distributed
from gpurec.train.metrics_log import MetricsLog


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


def build_ranker(
    model_config: ModelConfig,
    specs: list[SparseFeatureSpec],
    dense_stats: tuple[list[float], list[float]],
    seed: int,
    device: str = "cpu",
) -> MultiTaskDLRM:
    """The unsharded model with seeded initial weights (the same on every rank and world size)."""
    torch.manual_seed(seed)
    mean, std = dense_stats
    return build_model(model_config, specs, len(mean), device=device, dense_mean=mean, dense_std=std)


def id_map_for(
    model_config: ModelConfig, specs: list[SparseFeatureSpec], rank: int, world_size: int, device: torch.device
) -> CollisionlessIds | None:
    """This rank's partition of the collisionless id maps, or None for plain hashing (`ModuloRemap`)."""
    if model_config.ids.kind != "collisionless":
        return None
    backend = "triton" if device.type == "cuda" and _has_triton() else "torch"
    return CollisionlessIds(specs, model_config.ids, rank=rank, world_size=world_size, device=device, backend=backend)


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def labels_by_task(labels: torch.Tensor, names: list[str], tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    column = {name: i for i, name in enumerate(names)}
    missing = [t for t in tasks if t not in column]
    if missing:
        raise ValueError(f"model tasks {missing} have no label column in the manifest (labels: {names})")
    return {task: labels[:, column[task]] for task in tasks}


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
    manifest = load_manifest(data_dir)
    specs = sparse_specs(manifest, model_config, train_config)
    dense_stats = manifest.dense_normalization("train")
    num_dense = len(dense_stats[0])

    # Seeded init on CPU, then loaded into the sharded model: every world size starts from the
    # same weights, so a 2-rank run can be compared step by step with a 1-rank run.
    initial = build_ranker(model_config, specs, dense_stats, train_config.seed).state_dict()
    model = build_ranker(model_config, specs, dense_stats, train_config.seed, device="meta")
    sharding = None if train_config.sharding == "auto" else [train_config.sharding]
    sharded = shard_model(model, ctx.device, sparse_lr=train_config.sparse_lr, sharding_types=sharding)
    sharded.load_state_dict(initial)
    del initial
    optimizer = combined_optimizer(sharded, lambda params: torch.optim.Adagrad(params, lr=train_config.dense_lr))
    # Ids -> rows: collisionless tables (this rank's partition of each id map) or plain hashing.
    ids = id_map_for(model_config, specs, ctx.rank, ctx.world_size, ctx.device)
    remap = ModuloRemap({s.name: s.num_embeddings for s in specs}) if ids is None else None

    state = TrainerState(
        extra={
            "model_config": asdict(model_config),
            "train_config": asdict(train_config),
            "sparse_specs": [asdict(s) for s in specs],
            "num_dense": num_dense,
            "labels": manifest.label_names,
            "data_dir": str(Path(data_dir).resolve()),
            "world_size": ctx.world_size,
        }
    )
    resume_from = latest_checkpoint(out_dir)
    if resume_from is not None:
        extra = state.extra
        written_by = read_trainer_state(resume_from).extra.get("world_size", ctx.world_size)
        if ids is not None and written_by != ctx.world_size:
            raise ValueError(
                f"{resume_from} holds collisionless id maps partitioned over {written_by} ranks; resume it with "
                f"{written_by} ranks (repartitioning id maps to {ctx.world_size} ranks is not supported yet)"
            )
        state = load_checkpoint(resume_from, sharded, optimizer, ids=ids)
        state.extra = {**extra, "resumed_from": str(resume_from)}
    reinit = RowReinitializer(sharded, optimizer, specs) if ids is not None else None

    def rows_of(batch) -> KeyedJaggedTensor:
        """The batch's ids as table rows; new ids' rows start from their initial value."""
        if ids is None:
            return remap(batch.sparse_features)
        rows, admitted = ids.assign(batch.sparse_features, batch.event_time_ms)
        reinit.apply(admitted)
        return rows

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

    sharded.train()
    while state.epoch < train_config.epochs and state.step < total_steps:
        loader.set_epoch(state.epoch, start_batch=state.batch)
        for batch in loader:
            batch = batch.to(ctx.device, non_blocking=True)
            logits = sharded(batch.dense_features, rows_of(batch))
            per_task = task_losses(logits, labels_by_task(batch.labels, manifest.label_names, model_config.tasks))
            loss = torch.stack(list(per_task.values())).sum()  # = multi_task_loss, keeping the parts to log
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.step += 1
            state.batch += 1
            state.samples += loader.global_batch
            if state.step % train_config.log_every == 0 or state.step == total_steps:
                losses = all_reduce_mean(torch.stack([loss, *per_task.values()]))
                last_loss = float(losses[0])
                rate = (state.step - first_step) * loader.global_batch / (time.perf_counter() - started)
                record = {"step": state.step, "epoch": state.epoch, "loss": last_loss, "samples_per_s": rate}
                record.update({f"loss_{t}": float(v) for t, v in zip(per_task, losses[1:], strict=True)})
                record["data_wait_s"] = loader.wait_seconds
                log.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_per_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if train_config.checkpoint_every and state.step % train_config.checkpoint_every == 0:
                save_checkpoint(out_dir, sharded, optimizer, state, ids=ids)
            if state.step >= total_steps:
                break
        else:
            state.epoch, state.batch = state.epoch + 1, 0
    bar.close()
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None or read_trainer_state(checkpoint).step != state.step:
        checkpoint = save_checkpoint(out_dir, sharded, optimizer, state, ids=ids)
    seconds = time.perf_counter() - started
    summary = {
        "steps": state.step,
        "samples": state.samples,
        "loss": last_loss,
        "seconds": round(seconds, 3),
        "samples_per_s": round((state.step - first_step) * loader.global_batch / max(seconds, 1e-9)),
        "data_wait_s": round(loader.wait_seconds, 3),
        "world_size": ctx.world_size,
        "device": str(ctx.device),
        "checkpoint": str(checkpoint),
        "id_tables": ids.stats() if ids is not None else "hashed",
    }
    log.close()
    if ctx.is_main:
        (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    # In a log file (CI, nohup) redraw rarely instead of ten times a second.
    interval = 0.1 if sys.stderr.isatty() else 15.0
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, mininterval=interval)


def load_trained_model(checkpoint: str | Path) -> tuple[MultiTaskDLRM, ModuloRemap | IdLookup, TrainerState]:
    """An unsharded CPU copy of a trained model and its id -> row map, for evaluation and export
    (no process group needed). Collisionless tables come back as a read-only `IdLookup` over
    every rank's partition.

    `checkpoint` is a checkpoint directory or a training run directory (its latest checkpoint).
    """
    path = latest_checkpoint(checkpoint)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint} (expected checkpoints/latest or trainer.json)")
    state = read_trainer_state(path)
    extra = state.extra
    model_config = ModelConfig(**extra["model_config"])
    specs = [SparseFeatureSpec(**spec) for spec in extra["sparse_specs"]]
    num_dense = extra["num_dense"]
    # Normalisation buffers start neutral and are overwritten by the checkpoint's values.
    model = build_ranker(model_config, specs, ([0.0] * num_dense, [1.0] * num_dense), seed=0)
    if model_config.ids.kind != "collisionless":
        load_checkpoint(path, model)
        return model.eval(), ModuloRemap({s.name: s.num_embeddings for s in specs}), state
    partitions = int(extra["world_size"])
    id_maps = [CollisionlessIds(specs, model_config.ids, rank=p, world_size=partitions) for p in range(partitions)]
    load_checkpoint(path, model, ids=id_maps)
    lookup = IdLookup.from_partitions([m.partition for m in id_maps])
    return model.eval(), lookup, state
