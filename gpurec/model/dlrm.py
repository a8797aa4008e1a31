"""The multi-task ranker: a DLRM built from TorchRec parts with one logit head per task.

Dense features go through a bottom MLP, sparse ids are pooled by an `EmbeddingBagCollection`
(one table ``t_<feature>`` per feature), the two meet in a feature interaction (DLRM's pairwise
dot products, or a low-rank DCN-v2 cross network), and a shared top MLP feeds one linear head
per task (``like``, ``finish``). Sharing everything but the heads is the cheapest multi-task
design and lets the engagement signals regularise each other.

The EmbeddingBagCollection is a direct child of the model so that DistributedModelParallel
finds and shards it; build it on the ``meta`` device for DMP, which then allocates only this
rank's shards. The sparse input is a KeyedJaggedTensor of *row ids* (already mapped into each
table's range, see `gpurec.embedding.modulo`), which is what TorchRec's pipelined training
expects: the sharded module's input must come straight from the batch.
"""

from collections.abc import Sequence

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.model.config import ModelConfig

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


class DotInteraction(nn.Module):
    """DLRM's interaction: the dense vector plus all pairwise dot products of [dense, sparse...].

    Output size is ``D + (F + 1) * F / 2`` for F sparse features of dimension D.
    """

    def __init__(self, num_sparse_features: int, embedding_dim: int) -> None:
        super().__init__()
        num_vectors = num_sparse_features + 1
        self.output_dim: int = embedding_dim + num_vectors * (num_vectors - 1) // 2
        self.register_buffer(
            "triu_indices", torch.triu_indices(num_vectors, num_vectors, offset=1), persistent=False
        )

    def forward(self, dense_embedding: torch.Tensor, sparse_embeddings: list[torch.Tensor]) -> torch.Tensor:
        vectors = torch.stack([dense_embedding, *sparse_embeddings], dim=1)
        products = torch.bmm(vectors, vectors.transpose(1, 2))
        pairs = products[:, self.triu_indices[0], self.triu_indices[1]]
        return torch.cat([dense_embedding, pairs], dim=1)


class CrossInteraction(nn.Module):
    """DCN-v2 interaction: a low-rank cross network over the concatenated [dense, sparse...].

    Unlike the dot interaction it allows embeddings of different sizes; the output has the
    same size as its input.
    """

    def __init__(self, in_features: int, num_layers: int, low_rank: int) -> None:
        super().__init__()
        self.output_dim: int = in_features
        self.crossnet = LowRankCrossNet(in_features=in_features, num_layers=num_layers, low_rank=low_rank)

    def forward(self, dense_embedding: torch.Tensor, sparse_embeddings: list[torch.Tensor]) -> torch.Tensor:
        return self.crossnet(torch.cat([dense_embedding, *sparse_embeddings], dim=1))


class DenseNormalization(nn.Module):
    """Fixed standardisation of the dense inputs, ``(x - mean) / std`` with the train split's moments.

    Buffers, not parameters: they are part of the state dict, so checkpoints and exported models
    scale serving inputs exactly as training did, and no optimizer touches them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | None = None) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"dense normalization: {len(mean)} means but {len(std)} stds")
        if any(s <= 0 for s in std):
            raise ValueError("dense normalization: every std must be positive")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32, device=device))
        self.register_buffer("inv_std", 1.0 / torch.tensor(list(std), dtype=torch.float32, device=device))

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return (dense - self.mean) * self.inv_std


class MultiTaskDLRM(nn.Module):
    """DLRM with a shared trunk and one logit per task.

    ``forward(dense [B, num_dense], sparse KJT of row ids) -> {task: logits [B]}``; losses are
    per-task binary cross-entropy on these logits, and `ranking_score` turns them into the
    single score serving sorts by.
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense: int,
        config: ModelConfig,
        dense_device: torch.device | None = None,
        dense_mean: Sequence[float] | None = None,
        dense_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        tables = embedding_bag_collection.embedding_bag_configs()
        if not tables:
            raise ValueError("the model needs at least one sparse feature")
        self.sparse_feature_names: list[str] = [name for table in tables for name in table.feature_names]
        embedding_dims = [table.embedding_dim for table in tables for _ in table.feature_names]
        dense_dim = config.bottom_mlp[-1]

        self.embedding_bag_collection = embedding_bag_collection
        self.dense_normalization = DenseNormalization(
            [0.0] * num_dense if dense_mean is None else dense_mean,
            [1.0] * num_dense if dense_std is None else dense_std,
            dense_device,
        )
        self.bottom_mlp = MLP(num_dense, list(config.bottom_mlp), activation="relu", device=dense_device)
        if config.interaction == "dot":
            if any(dim != dense_dim for dim in embedding_dims):
                raise ValueError(f"dot interaction needs every embedding_dim == bottom_mlp[-1] = {dense_dim}")
            self.interaction: nn.Module = DotInteraction(len(self.sparse_feature_names), dense_dim)
        else:
            self.interaction = CrossInteraction(
                dense_dim + sum(embedding_dims), config.dcn_layers, config.dcn_low_rank
            )
        self.interaction.to(dense_device)
        self.top_mlp = MLP(
            self.interaction.output_dim, list(config.top_mlp), activation="relu", device=dense_device
        )
        self.heads = nn.ModuleDict(
            {task: nn.Linear(config.top_mlp[-1], 1, device=dense_device) for task in config.tasks}
        )
        self.score_weights: dict[str, float] = {task: float(w) for task, w in config.score_weights.items()}

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        dense_embedding = self.bottom_mlp(self.dense_normalization(dense))
        # Select by name: a sharded collection may return its features in another order.
        pooled = self.embedding_bag_collection(sparse).to_dict()
        sparse_embeddings = [pooled[name] for name in self.sparse_feature_names]
        hidden = self.top_mlp(self.interaction(dense_embedding, sparse_embeddings))
        logits: dict[str, torch.Tensor] = {}
        for task, head in self.heads.items():
            logits[task] = head(hidden).squeeze(-1)
        return logits

    def ranking_score(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of per-task probabilities, ``sum_t w_t * sigmoid(logit_t)``."""
        return combine_task_scores(logits, self.score_weights)


def combine_task_scores(logits: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """``sum_t weights[t] * sigmoid(logits[t])``; TorchScript-able, so serving can reuse it."""
    if len(weights) == 0:
        raise ValueError("ranking score needs at least one weighted task")
    terms = [weight * torch.sigmoid(logits[task]) for task, weight in weights.items()]
    return torch.stack(terms).sum(dim=0)


def task_losses(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean binary cross-entropy of each task's logits against its labels."""
    return {task: nn.functional.binary_cross_entropy_with_logits(logits[task], labels[task]) for task in logits}


def multi_task_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tasks of `task_losses`.

    An unweighted sum: the tasks' relative importance belongs in the ranking score, where it
    can change without retraining.
    """
    return torch.stack(list(task_losses(logits, labels).values())).sum()


def build_model(
    config: ModelConfig,
    sparse_specs: Sequence[SparseFeatureSpec],
    num_dense: int,
    device: torch.device | str = "cpu",
    dense_mean: Sequence[float] | None = None,
    dense_std: Sequence[float] | None = None,
) -> MultiTaskDLRM:
    """Build the ranker with one embedding table per sparse feature.

    ``device`` is where the embedding tables live. Pass ``"meta"`` before wrapping the model in
    DistributedModelParallel: the tables are then never materialised in full, DMP allocates
    each rank's shards. The dense layers are built on ``device`` too, except for ``meta``, where
    they are built on CPU (DMP moves them to its device when it wraps them for data parallelism,
    and re-initialising meta dense layers would lose their initialisation).
    """
    device = torch.device(device)
    if not sparse_specs:
        raise ValueError("the model needs at least one sparse feature")
    names = [spec.name for spec in sparse_specs]
    if len(set(names)) != len(names):
        raise ValueError(f"sparse feature names must be distinct, got {names}")
    if num_dense <= 0:
        raise ValueError(f"num_dense must be positive, got {num_dense}")
    tables = [
        EmbeddingBagConfig(
            name=spec.table_name,
            num_embeddings=spec.num_embeddings,
            embedding_dim=spec.embedding_dim,
            feature_names=[spec.name],
            pooling=_POOLING[spec.pooling],
        )
        for spec in sparse_specs
    ]
    dense_device = torch.device("cpu") if device.type == "meta" else device
    embedding_bag_collection = EmbeddingBagCollection(tables=tables, device=device)
    return MultiTaskDLRM(embedding_bag_collection, num_dense, config, dense_device, dense_mean, dense_std)
