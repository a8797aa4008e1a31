"""Shard the ranker with DistributedModelParallel, its sparse optimizer fused into backward.

This is gpurec's training path. RowWiseAdagrad is fused into the backward pass of the
embedding tables (FBGEMM updates each looked-up row while computing its gradient), so no
dense [rows, dim] gradient is ever materialised and only touched rows are updated; that is
what makes it several times faster than an unfused EmbeddingBagCollection with a torch
optimizer. The dense layers are data-parallel (DDP) and use an ordinary torch optimizer.

Call order matters: build the model on ``meta``, fuse the optimizer (`shard_model` does it
before DMP sees the model, because DMP reads the fused optimizer settings off the
parameters when it builds the sharded tables), then create the optimizer for the rest
(`combined_optimizer`). A process group must already be initialised (gloo on CPU, NCCL on GPU).
"""

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.comm import get_local_size, get_topology_domain_multiple
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from gpurec.model.dlrm import MultiTaskDLRM

DenseOptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SHARDING_TYPES: tuple[str, ...] = ("table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")


class EmbeddingBagCollectionSharderAnyDevice(EmbeddingBagCollectionSharder):
    """TorchRec's EBC sharder, but offering row-wise sharding on CPU too.

    TorchRec lists ``row_wise``/``table_row_wise`` only for CUDA, although the CPU fused kernels
    and the gloo collectives run them correctly (a 2-rank CPU run matches an unsharded model).
    Row-wise is what large id tables need, so CPU training and tests must be able to use it.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        for extra in (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value):
            if extra not in types:
                types.append(extra)
        return types


def sharders() -> list[ModuleSharder[nn.Module]]:
    return [EmbeddingBagCollectionSharderAnyDevice()]


def shard_model(
    model: MultiTaskDLRM,
    device: torch.device,
    sparse_lr: float = 0.01,
    sparse_eps: float = 1e-8,
    sharding_types: Sequence[str] | None = None,
) -> DistributedModelParallel:
    """Fuse RowWiseAdagrad into the embedding tables' backward, then shard them with DMP.

    TorchRec's planner chooses the plan for the current process group and ``device``. Left
    alone it replicates small tables (``data_parallel`` with the dense kernel: no fusion) and
    shards large ones with the fused kernel; ``sharding_types`` (e.g. ``["table_wise"]``)
    restricts every table to those types and to the fused kernel (``data_parallel`` keeps the
    dense kernel, the only one it has), which makes the plan predictable.
    """
    unknown = set(sharding_types or ()) - set(SHARDING_TYPES)
    if unknown:
        raise ValueError(f"unknown sharding types {sorted(unknown)}; choose from {SHARDING_TYPES}")
    _apply_optimizer_in_backward(
        RowWiseAdagrad,
        model.embedding_bag_collection.parameters(),
        {"lr": sparse_lr, "eps": sparse_eps},
    )
    plan = None
    if sharding_types is not None:
        world_size = dist.get_world_size()
        topology = Topology(
            world_size=world_size,
            local_world_size=get_local_size(world_size),
            compute_device=device.type,
            pod_size=get_topology_domain_multiple(),
        )
        kernels = [EmbeddingComputeKernel.FUSED.value]
        if "data_parallel" in sharding_types:
            kernels.append(EmbeddingComputeKernel.DENSE.value)
        constraint = ParameterConstraints(sharding_types=list(sharding_types), compute_kernels=kernels)
        tables = [table.name for table in model.embedding_bag_collection.embedding_bag_configs()]
        planner = EmbeddingShardingPlanner(topology=topology, constraints=dict.fromkeys(tables, constraint))
        plan = planner.collective_plan(model, sharders(), dist.GroupMember.WORLD)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders())


def combined_optimizer(
    sharded: DistributedModelParallel,
    dense_optimizer: DenseOptimizerFactory | None = None,
) -> CombinedOptimizer:
    """One optimizer for the sharded model: the fused sparse one plus ``dense_optimizer``.

    ``step()`` on the result steps the dense parameters (the sparse ones were already updated
    during backward); its ``state_dict()`` covers both, so checkpoints hold the whole state.
    The default dense optimizer is Adagrad (lr 0.01), matching the sparse side's Adagrad family.
    """
    factory = dense_optimizer or (lambda params: torch.optim.Adagrad(params, lr=0.01))
    dense_params = dict(in_backward_optimizer_filter(sharded.named_parameters()))
    return CombinedOptimizer([sharded.fused_optimizer, KeyedOptimizerWrapper(dense_params, factory)])
