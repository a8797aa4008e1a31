"""The ranker: config loading, model shapes, learning, export, DMP sharding, modulo id remap."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.modulo import ModuloRemap
from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.model.config import ModelConfig, load_model_config
from gpurec.model.dlrm import build_model, combine_task_scores, multi_task_loss
from gpurec.model.sharded import combined_optimizer, shard_model
from gpurec.train.distributed import init_distributed

DEFAULT_TOML = Path(__file__).resolve().parents[1] / "gpurec" / "model" / "configs" / "default.toml"
FEATURES = ["user_id", "item_id", "hashtags"]
ROWS = 50
NUM_DENSE = 5


def small_config(interaction: str = "dot", **overrides: object) -> ModelConfig:
    values: dict[str, object] = {
        "embedding_dim": 8,
        "default_num_embeddings": ROWS,
        "bottom_mlp": (16, 8),
        "top_mlp": (16,),
        "interaction": interaction,
        "dcn_layers": 2,
        "dcn_low_rank": 4,
    }
    values.update(overrides)
    return ModelConfig.from_dict(values)


def small_model(config: ModelConfig, device: str = "cpu") -> torch.nn.Module:
    return build_model(config, config.sparse_specs(FEATURES, multi_valued=["hashtags"]), NUM_DENSE, device)


def make_batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Single-valued user/item ids and 0-3 hashtags per example (empty bags included)."""
    hashtag_lengths = torch.randint(0, 4, (batch_size,), generator=generator)
    lengths = torch.cat([torch.ones(2 * batch_size, dtype=torch.long), hashtag_lengths])
    values = torch.randint(0, ROWS, (int(lengths.sum()),), generator=generator)
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    return torch.rand(batch_size, NUM_DENSE, generator=generator), sparse


# --- config -------------------------------------------------------------------------------


def test_default_toml_is_the_default_config():
    from gpurec.embedding.config import IdTableConfig

    # One addition to the dataclass defaults: item ids expire after 48 h of event time.
    assert load_model_config(DEFAULT_TOML) == ModelConfig(ids=IdTableConfig(features={"item_id": {"expire_after_hours": 48}}))


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text('[model]\nbotom_mlp = [32, 64]\n\n[train]\nanything = "ignored"\n')
    with pytest.raises(ValueError, match="unknown key 'botom_mlp'"):
        load_model_config(path)


def test_missing_section_and_unsupported_format(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text("[train]\nlr = 0.1\n")
    with pytest.raises(ValueError, match=r"no \[model\] section"):
        load_model_config(path)
    with pytest.raises(ValueError, match="unsupported config format"):
        load_model_config(tmp_path / "model.json")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bottom_mlp": (16, 4)}, "bottom_mlp\\[-1\\] == embedding_dim"),
        ({"score_weights": {"share": 1.0}}, "unknown task 'share'"),
        ({"score_weights": {}}, "at least one task"),
        ({"interaction": "attention"}, "interaction must be one of"),
        ({"top_mlp": ("wide",)}, "top_mlp layer size must be a positive integer"),
        ({"num_embeddings": {"user_id": 0}}, "num_embeddings\\['user_id'\\]"),
        ({"tasks": ("like", "like")}, "distinct"),
    ],
)
def test_invalid_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_sparse_specs_apply_overrides_and_pooling():
    config = small_config(num_embeddings={"user_id": 1000})
    user, item, hashtags = config.sparse_specs(FEATURES, multi_valued=["hashtags"])
    assert user == SparseFeatureSpec("user_id", 1000, 8, multi_valued=False, pooling="sum")
    assert item.num_embeddings == ROWS
    assert hashtags.multi_valued and hashtags.pooling == config.multi_valued_pooling
    assert user.table_name == "t_user_id"
    with pytest.raises(ValueError, match="num_embeddings names features not in the feature list"):
        small_config(num_embeddings={"usr_id": 1000}).sparse_specs(FEATURES)


# --- model --------------------------------------------------------------------------------


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_forward_gives_one_logit_per_task_and_example(interaction):
    torch.manual_seed(0)
    model = small_model(small_config(interaction))
    dense, sparse = make_batch(6, torch.Generator().manual_seed(0))
    logits = model(dense, sparse)
    assert set(logits) == {"like", "finish"}
    assert all(value.shape == (6,) for value in logits.values())
    assert not torch.equal(logits["like"], logits["finish"])
    assert [name for name, _ in model.embedding_bag_collection.named_children()] == ["embedding_bags"]
    assert set(model.embedding_bag_collection.embedding_bags) == {f"t_{f}" for f in FEATURES}


def test_heads_are_per_task():
    torch.manual_seed(0)
    model = small_model(small_config())
    dense, sparse = make_batch(4, torch.Generator().manual_seed(1))
    before = model(dense, sparse)
    with torch.no_grad():
        model.heads["like"].bias += 1.0
    after = model(dense, sparse)
    assert torch.allclose(after["like"], before["like"] + 1.0)
    assert torch.equal(after["finish"], before["finish"])


def test_ranking_score_is_the_weighted_sum_of_probabilities():
    torch.manual_seed(0)
    model = small_model(small_config(score_weights={"like": 2.0, "finish": 0.5}))
    logits = model(*make_batch(4, torch.Generator().manual_seed(2)))
    expected = 2.0 * torch.sigmoid(logits["like"]) + 0.5 * torch.sigmoid(logits["finish"])
    assert torch.allclose(model.ranking_score(logits), expected)
    # A task without a weight does not contribute, and the function scripts for serving.
    only_like = torch.jit.script(combine_task_scores)(logits, {"like": 1.0})
    assert torch.allclose(only_like, torch.sigmoid(logits["like"]))


def test_gradient_steps_learn_a_synthetic_task():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(3)
    model = small_model(small_config())
    # Adam: plain SGD sits on the initial plateau of this small ReLU net for hundreds of steps.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    dense, sparse = make_batch(256, generator)
    # "like" depends on the item id, "finish" on a dense feature: both are learnable.
    labels = {
        "like": (sparse["item_id"].values() < ROWS // 2).float(),
        "finish": (dense[:, 0] > 0.5).float(),
    }
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = multi_task_loss(model(dense, sparse), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_traced_and_scripted_model_matches_eager(interaction):
    torch.manual_seed(0)
    model = small_model(small_config(interaction)).eval()
    scripted = torch.jit.script(symbolic_trace(model))
    dense, sparse = make_batch(8, torch.Generator().manual_seed(4))
    eager, exported = model(dense, sparse), scripted(dense, sparse)
    assert set(exported) == set(eager)
    for task in eager:
        assert torch.equal(exported[task], eager[task])


def test_meta_build_keeps_dense_layers_on_cpu():
    model = small_model(small_config("dcn"), device="meta")
    assert all(p.is_meta for p in model.embedding_bag_collection.parameters())
    dense_params = [
        p for name, p in model.named_parameters() if not name.startswith("embedding_bag_collection")
    ]
    assert dense_params and all(p.device.type == "cpu" for p in dense_params)


@pytest.fixture
def single_process_group():
    """A world of one (gloo), or the one an earlier in-process training run already created."""
    init_distributed("cpu")


def table_weight(sharded: torch.nn.Module, table: str) -> torch.Tensor:
    value = sharded.state_dict()[f"embedding_bag_collection.embedding_bags.{table}.weight"]
    # Table-wise shards come back as a ShardedTensor, replicated (data-parallel) tables as a Tensor.
    return (value.local_shards()[0].tensor if hasattr(value, "local_shards") else value).clone()


# The planner replicates tables this small (data_parallel, dense kernel); production-sized
# tables get table_wise with the fused kernel. Both must behave like the unsharded model.
@pytest.mark.parametrize("sharding_types", [None, ["table_wise"]])
@pytest.mark.usefixtures("single_process_group")
def test_dmp_shards_the_tables_and_fuses_the_sparse_optimizer(sharding_types):
    torch.manual_seed(0)
    config = small_config("dcn")
    eager = small_model(config)
    sharded = shard_model(
        small_model(config, device="meta"), torch.device("cpu"), sparse_lr=0.1, sharding_types=sharding_types
    )
    assert type(sharded.module.embedding_bag_collection).__name__ == "ShardedEmbeddingBagCollection"
    if sharding_types is not None:
        table_plans = sharded.plan.plan["embedding_bag_collection"].values()
        assert {(p.sharding_type, p.compute_kernel) for p in table_plans} == {("table_wise", "fused")}
        assert sharded.fused_optimizer.state_dict()["state"], "RowWiseAdagrad was not fused into the tables"
    # Checkpoints are interchangeable: same keys, and with the same weights the same logits.
    sharded.load_state_dict(eager.state_dict())
    dense, sparse = make_batch(8, torch.Generator().manual_seed(5))
    expected, actual = eager(dense, sparse), sharded(dense, sparse)
    for task in expected:
        assert torch.allclose(actual[task], expected[task], atol=1e-6)

    optimizer = combined_optimizer(sharded)
    before = table_weight(sharded, "t_item_id")
    labels = {task: torch.ones(8) for task in config.tasks}
    optimizer.zero_grad()
    multi_task_loss(sharded(dense, sparse), labels).backward()
    optimizer.step()
    changed_rows = (table_weight(sharded, "t_item_id") != before).any(dim=1).nonzero().squeeze(1)
    assert set(changed_rows.tolist()) == set(sparse["item_id"].values().tolist())


# --- modulo remap -------------------------------------------------------------------------


def hashed_kjt(values: list[int], lengths: list[int], keys: list[str]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.tensor(values, dtype=torch.int64), lengths=torch.tensor(lengths)
    )


def test_modulo_remap_handles_negative_ids_and_per_feature_sizes():
    features = hashed_kjt([-1, -(2**63), 2**63 - 1, 7, -5], [1, 1, 2, 1], ["user_id", "hashtags"])
    remapped = ModuloRemap({"user_id": 10, "hashtags": 3})(features)
    assert remapped["user_id"].values().tolist() == [9, 2]  # -2**63 = -922...808 -> 2 (mod 10)
    assert remapped["hashtags"].values().tolist() == [1, 1, 1]
    assert remapped.keys() == features.keys()
    assert torch.equal(remapped.lengths(), features.lengths())


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=6, max_size=6),
    st.integers(min_value=1, max_value=2**40),
    st.integers(min_value=1, max_value=2**40),
)
def test_modulo_remap_matches_python_modulo(values, rows_a, rows_b):
    features = hashed_kjt(values, [2, 1, 0, 3], ["a", "b"])
    remap = ModuloRemap({"a": rows_a, "b": rows_b})
    for remapper in (remap, torch.jit.script(remap)):
        remapped = remapper(features)
        assert remapped["a"].values().tolist() == [v % rows_a for v in values[:3]]
        assert remapped["b"].values().tolist() == [v % rows_b for v in values[3:]]


def test_modulo_remap_keeps_weights_and_rejects_unknown_features():
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a"], values=torch.tensor([-3, 4]), lengths=torch.tensor([2]), weights=torch.tensor([0.5, 2.0])
    )
    remapped = ModuloRemap({"a": 4})(features)
    assert remapped.values().tolist() == [1, 0]
    assert torch.equal(remapped.weights(), features.weights())
    with pytest.raises(ValueError, match="feature a has no row count"):
        ModuloRemap({"b": 4})(features)
    with pytest.raises(ValueError, match="positive integer"):
        ModuloRemap({"a": 0})


def test_remapped_hashes_feed_the_model():
    torch.manual_seed(0)
    config = small_config()
    specs = config.sparse_specs(FEATURES, multi_valued=["hashtags"])
    model = build_model(config, specs, NUM_DENSE)
    remap = ModuloRemap({spec.name: spec.num_embeddings for spec in specs})
    hashed = hashed_kjt([-(2**62), 2**62, 12345, -7, 2**63 - 1], [1, 1, 1, 1, 0, 1], FEATURES)
    logits = model(torch.rand(2, NUM_DENSE), remap(hashed))
    assert logits["like"].shape == (2,)
