"""Training throughput: gpurec's fused, sharded step against a plain TorchRec loop.

Both paths train the same MultiTaskDLRM (8 tables x 100k rows x 64 dims, 13 dense features,
"dot" interaction, bottom MLP 512-256-64, top MLP 512-256, heads "like" and "finish") on the
same pre-generated synthetic batches, in the same run:

- gpurec: the model built on ``meta`` and wrapped by DistributedModelParallel (one process,
  gloo on CPU / NCCL on GPU, tables sharded table_wise) with RowWiseAdagrad fused into the
  embedding backward, plus torch.optim.Adagrad over the dense layers (`gpurec.model.sharded`).
- baseline: the same model with a plain (unfused) EmbeddingBagCollection and one
  torch.optim.Adagrad over every parameter, the loop a TorchRec tutorial starts from.

Each batch has exactly one id per feature (pooling factor 1, uniform over the rows) and random
0/1 labels; ``--num-batches`` distinct batches are generated before timing and cycled, so data
generation is never timed. The last stdout line is a JSON object.

CPU (2 threads, as on the reference 2-core machine):
    .venv/bin/python bench/train.py
GPU node (the CUDA stack of requirements/gpu.txt installed, gpurec installed with
``pip install -e .``, at least one visible GPU; it uses the current device, so pick one with
CUDA_VISIBLE_DEVICES):
    python bench/train.py --device cuda --steps 200 --warmup 20
On CUDA the process group is NCCL, the batches are moved to the GPU before timing and the
clock is read only after ``torch.cuda.synchronize()``; ``--threads`` then only affects
host-side work. Timing alternates the two paths over ``--rounds`` rounds and reports each
path's median round, so a slow spell of a shared machine does not decide the ratio.
"""

import argparse
import json
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.model.config import ModelConfig
from gpurec.model.dlrm import MultiTaskDLRM, build_model, multi_task_loss
from gpurec.model.sharded import combined_optimizer, shard_model

LEARNING_RATE = 0.01


@dataclass(frozen=True)
class BenchConfig:
    """The fixed benchmark shape; only the batch size is adjustable from the command line."""

    num_tables: int = 8
    rows_per_table: int = 100_000
    embedding_dim: int = 64
    num_dense: int = 13
    batch_size: int = 2048
    ids_per_feature: int = 1


@dataclass
class Batch:
    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: dict[str, torch.Tensor]

    def to(self, device: torch.device) -> "Batch":
        labels = {task: label.to(device) for task, label in self.labels.items()}
        return Batch(self.dense.to(device), self.sparse.to(device), labels)


def make_batches(bench: BenchConfig, tasks: tuple[str, ...], count: int, seed: int) -> list[Batch]:
    """Random batches in the model's input format: one row id per feature and example."""
    generator = torch.Generator().manual_seed(seed)
    features = [f"f{i}" for i in range(bench.num_tables)]
    num_ids = bench.num_tables * bench.batch_size * bench.ids_per_feature
    batches = []
    for _ in range(count):
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=features,
            values=torch.randint(0, bench.rows_per_table, (num_ids,), generator=generator),
            lengths=torch.full(
                (bench.num_tables * bench.batch_size,), bench.ids_per_feature, dtype=torch.int32
            ),
        )
        labels = {t: torch.randint(0, 2, (bench.batch_size,), generator=generator).float() for t in tasks}
        batches.append(
            Batch(torch.rand(bench.batch_size, bench.num_dense, generator=generator), sparse, labels)
        )
    return batches


def timed_samples_per_second(
    step: Callable[[Batch], None], batches: list[Batch], steps: int, device: torch.device
) -> float:
    """Throughput of ``steps`` training steps over the cycled batches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batches[0].dense.shape[0] / (time.perf_counter() - start)


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[Batch], None]:
    def step(batch: Batch) -> None:
        optimizer.zero_grad()
        loss = multi_task_loss(model(batch.dense, batch.sparse), batch.labels)
        loss.backward()
        optimizer.step()

    return step


def build(model_config: ModelConfig, bench: BenchConfig, device: torch.device | str) -> MultiTaskDLRM:
    specs = model_config.sparse_specs([f"f{i}" for i in range(bench.num_tables)])
    return build_model(model_config, specs, bench.num_dense, device=device)


def init_single_process_group(device: torch.device) -> None:
    """A one-rank process group, which DMP needs even on one process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path and round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per path before timing")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; each path's median is reported")
    parser.add_argument("--batch-size", type=int, default=BenchConfig.batch_size)
    parser.add_argument("--num-batches", type=int, default=8, help="distinct pre-generated batches to cycle")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.num_batches, args.batch_size) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --num-batches and --batch-size must be positive, --warmup >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bench = BenchConfig(batch_size=args.batch_size)
    model_config = ModelConfig(embedding_dim=bench.embedding_dim, default_num_embeddings=bench.rows_per_table)
    batches = [b.to(device) for b in make_batches(bench, model_config.tasks, args.num_batches, seed=0)]

    init_single_process_group(device)
    try:
        # table_wise pins the fused kernel on any device; the planner picks it on CPU anyway.
        sharded = shard_model(
            build(model_config, bench, "meta"), device, sparse_lr=LEARNING_RATE, sharding_types=["table_wise"]
        )
        optimizer = combined_optimizer(sharded, lambda params: torch.optim.Adagrad(params, lr=LEARNING_RATE))
        plain = build(model_config, bench, device)
        steps = {
            "gpurec": training_step(sharded, optimizer),
            "baseline": training_step(plain, torch.optim.Adagrad(plain.parameters(), lr=LEARNING_RATE)),
        }
        for step in steps.values():
            for i in range(args.warmup):
                step(batches[i % len(batches)])
        rounds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                rounds[name].append(timed_samples_per_second(step, batches, args.steps, device))
                print(f"{name}: {rounds[name][-1]:,.0f} samples/s", file=sys.stderr)
    finally:
        dist.destroy_process_group()
    gpurec, baseline = statistics.median(rounds["gpurec"]), statistics.median(rounds["baseline"])

    result: dict[str, object] = {
        "bench": "train",
        "config": {
            **asdict(bench),
            "bottom_mlp": list(model_config.bottom_mlp),
            "top_mlp": list(model_config.top_mlp),
            "interaction": model_config.interaction,
            "tasks": list(model_config.tasks),
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "gpurec_samples_per_s": round(gpurec, 1),
        "baseline_samples_per_s": round(baseline, 1),
        "baseline": "plain torchrec EmbeddingBagCollection + torch.optim.Adagrad",
        "ratio": round(gpurec / baseline, 2),
        "rounds_samples_per_s": {name: [round(x, 1) for x in values] for name, values in rounds.items()},
        "device": device.type,
        "threads": args.threads,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
