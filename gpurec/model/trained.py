"""A trained model read back from its checkpoint: an unsharded CPU copy and its serving id lookup.

Evaluation, export and (next) parameter sync load a training run through `load_trained_model`;
no process group is needed, and whatever the run's id-map kind, the lookup comes back through
the one `IdMap` interface (`gpurec.embedding.idmap`): every partition merged into one read-only
module that maps hashed ids to rows exactly as training did.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from gpurec.embedding.idmap import id_map_for, serving_lookup
from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.model.checkpoint import TrainedRun, find_checkpoint, load_checkpoint, read_trained_run
from gpurec.model.config import ModelConfig
from gpurec.model.dlrm import MultiTaskDLRM, build_model


class TrainedModel(NamedTuple):
    model: MultiTaskDLRM  # unsharded, on CPU, in eval mode
    lookup: nn.Module  # hashed ids -> rows (`ModuloRemap` or `IdLookup`), read-only
    run: TrainedRun


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


def load_trained_model(run_or_checkpoint: str | Path) -> TrainedModel:
    """The model of a checkpoint (or of a training run's latest one) and its id lookup."""
    path = find_checkpoint(run_or_checkpoint)
    run = read_trained_run(path)
    specs = list(run.sparse_specs)
    # Normalisation buffers start neutral and are overwritten by the checkpoint's values.
    model = build_ranker(run.model_config, specs, ([0.0] * run.num_dense, [1.0] * run.num_dense), seed=0)
    id_maps = [id_map_for(run.model_config.ids, specs, rank=p, world_size=run.world_size) for p in range(run.world_size)]
    load_checkpoint(path, model, ids=id_maps)
    return TrainedModel(model.eval(), serving_lookup(id_maps), run)
