"""Training throughput: gpurec's fused, sharded step against a plain TorchRec loop.

All three paths train the same MultiTaskDLRM (8 tables x 100k rows x 64 dims, 13 dense features,
"dot" interaction, bottom MLP 512-256-64, top MLP 512-256, heads "like" and "finish") on the
same pre-generated synthetic batches, in the same run:

- gpurec: the model built on ``meta`` and wrapped by DistributedModelParallel (one process,
  gloo on CPU / NCCL on GPU, tables sharded table_wise) with RowWiseAdagrad fused into the
  embedding backward, plus torch.optim.Adagrad over the dense layers (`gpurec.model.sharded`).
- baseline: the same model with a plain (unfused) EmbeddingBagCollection and one
  torch.optim.Adagrad over every parameter, the loop a TorchRec tutorial starts from.
- gpurec_collisionless: a second copy of the gpurec model, fed raw hashed 64-bit ids instead of
  row ids. Every step first maps them to rows with `CollisionlessIds.assign` (admit_after=2,
  no expiry, LRU eviction, unadmitted ids read the shared row 0) and re-initialises the rows
  handed to newly admitted ids with `RowReinitializer.apply`, exactly as `gpurec.train.recipe`
  does, then runs the same fused step. Its ids are a stream: per table a vocabulary of
  ``--vocab`` random int64 hashes (80k, against 100k rows) drawn Zipf(``--zipf``) per example,
  so the table stays far from full while tail ids keep reaching their second occurrence and
  getting admitted; event times grow by a minute per batch. A stream cannot be cycled (a
  repeated batch would admit nothing new), so this path gets ``warmup + rounds * steps``
  distinct pre-generated id batches (dense features and labels are the cycled ones).

Each batch has exactly one id per feature (pooling factor 1, uniform over the rows for the first
two paths) and random 0/1 labels; ``--num-batches`` distinct batches are generated before timing
and cycled, so data generation is never timed. The last stdout line is a JSON object, with
``ratio`` = gpurec / baseline, ``collisionless_vs_fused`` = gpurec_collisionless / gpurec and the
id tables' final occupancy and admission counts.

CPU (2 threads, as on the reference 2-core machine):
    .venv/bin/python bench/train.py
GPU node (the CUDA stack of requirements/gpu.txt installed, gpurec installed with
``pip install -e .``, at least one visible GPU; it uses the current device, so pick one with
CUDA_VISIBLE_DEVICES):
    python bench/train.py --device cuda --steps 200 --warmup 20
On CUDA the process group is NCCL, the batches are moved to the GPU before timing and the
clock is read only after ``torch.cuda.synchronize()``; ``--threads`` then only affects
host-side work. Timing alternates the three paths over ``--rounds`` rounds and reports each
path's median round, so a slow spell of a shared machine does not decide the ratio.
"""

import argparse
import importlib.util
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

from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.config import IdTableConfig
from gpurec.embedding.rows import RowReinitializer
from gpurec.model.config import ModelConfig
from gpurec.model.dlrm import MultiTaskDLRM, build_model, multi_task_loss
from gpurec.model.sharded import combined_optimizer, shard_model

LEARNING_RATE = 0.01
EVENT_TIME_START_MS = 1_700_000_000_000
EVENT_TIME_STEP_MS = 60_000  # one minute of event time per batch of the id stream


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
    event_time_ms: torch.Tensor | None = None  # [B], only for batches of hashed ids

    def to(self, device: torch.device) -> "Batch":
        labels = {task: label.to(device) for task, label in self.labels.items()}
        times = None if self.event_time_ms is None else self.event_time_ms.to(device)
        return Batch(self.dense.to(device), self.sparse.to(device), labels, times)


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


def make_id_stream(
    bench: BenchConfig, batches: list[Batch], count: int, vocab: int, exponent: float, seed: int
) -> list[Batch]:
    """``count`` batches of raw hashed ids: per table, Zipf(``exponent``) draws from ``vocab``
    random int64 hashes; event times one minute apart. Dense features and labels are taken
    from ``batches`` in turn."""
    generator = torch.Generator().manual_seed(seed)
    features = [f"f{i}" for i in range(bench.num_tables)]
    weights = torch.arange(1, vocab + 1, dtype=torch.float64) ** -exponent
    cdf = torch.cumsum(weights, 0) / weights.sum()
    hashes = torch.randint(
        -(2**63), 2**63 - 1, (bench.num_tables, vocab), dtype=torch.int64, generator=generator
    )
    per_table = bench.batch_size * bench.ids_per_feature
    lengths = torch.full((bench.num_tables * bench.batch_size,), bench.ids_per_feature, dtype=torch.int32)
    stream = []
    for i in range(count):
        ranks = torch.searchsorted(
            cdf, torch.rand(bench.num_tables, per_table, dtype=torch.float64, generator=generator)
        )
        ids = torch.gather(hashes, 1, ranks.clamp_(max=vocab - 1))
        sparse = KeyedJaggedTensor.from_lengths_sync(keys=features, values=ids.reshape(-1), lengths=lengths)
        times = torch.full(
            (bench.batch_size,), EVENT_TIME_START_MS + i * EVENT_TIME_STEP_MS, dtype=torch.int64
        )
        source = batches[i % len(batches)]
        stream.append(Batch(source.dense, sparse, source.labels, times))
    return stream


def exact_admissions(stream: list[Batch], admit_after: int) -> int:
    """Ids of the stream (per table) with at least ``admit_after`` occurrences: what exact
    counting would admit, to compare with the sketch-based ``admitted``."""
    total = 0
    features = stream[0].sparse.keys()  # a KeyedJaggedTensor's feature names (not a dict)
    for key in features:
        ids = torch.cat([b.sparse[key].values().cpu() for b in stream])
        total += int((torch.unique(ids, return_counts=True)[1] >= admit_after).sum())
    return total


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


def collisionless_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: CollisionlessIds, reinit: RowReinitializer
) -> Callable[[Batch], None]:
    """The recipe's step: hashed ids -> rows (admitting new ids, resetting their rows), then train."""

    def step(batch: Batch) -> None:
        assert batch.event_time_ms is not None
        rows, admitted = ids.assign(batch.sparse, batch.event_time_ms)
        reinit.apply(admitted)
        optimizer.zero_grad()
        loss = multi_task_loss(model(batch.dense, rows), batch.labels)
        loss.backward()
        optimizer.step()

    return step


def id_table_summary(stats: dict[str, dict[str, float]]) -> dict[str, object]:
    """Totals over the tables of `CollisionlessIds.stats`, plus each table's occupancy."""
    used = sum(s["rows_used"] for s in stats.values())
    capacity = sum(s["capacity"] for s in stats.values())
    summary: dict[str, object] = {
        "rows_used": int(used),
        "capacity": int(capacity),
        "occupancy": round(used / capacity, 4),
    }
    for name in ("occurrences", "unadmitted", "admitted", "evicted_full"):
        summary[name] = int(sum(s[name] for s in stats.values()))
    summary["occupancy_per_table"] = {name: round(s["occupancy"], 4) for name, s in stats.items()}
    return summary


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
    parser.add_argument(
        "--vocab", type=int, default=80_000, help="hashed ids per table in the collisionless stream"
    )
    parser.add_argument(
        "--zipf", type=float, default=1.05, help="Zipf exponent of the collisionless id popularity"
    )
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.num_batches, args.batch_size, args.vocab) < 1 or args.warmup < 0:
        parser.error(
            "--steps, --rounds, --num-batches, --batch-size and --vocab must be positive, --warmup >= 0"
        )
    if args.zipf <= 0:
        parser.error("--zipf must be positive")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bench = BenchConfig(batch_size=args.batch_size)
    model_config = ModelConfig(embedding_dim=bench.embedding_dim, default_num_embeddings=bench.rows_per_table)
    id_config = IdTableConfig(admit_after=2, expire_after_hours=0.0)
    cpu_batches = make_batches(bench, model_config.tasks, args.num_batches, seed=0)
    batches = [b.to(device) for b in cpu_batches]
    stream_length = args.warmup + args.rounds * args.steps
    stream = [
        b.to(device) for b in make_id_stream(bench, cpu_batches, stream_length, args.vocab, args.zipf, seed=1)
    ]

    init_single_process_group(device)
    try:
        # table_wise pins the fused kernel on any device; the planner picks it on CPU anyway.
        sharded = shard_model(
            build(model_config, bench, "meta"), device, sparse_lr=LEARNING_RATE, sharding_types=["table_wise"]
        )
        optimizer = combined_optimizer(sharded, lambda params: torch.optim.Adagrad(params, lr=LEARNING_RATE))
        plain = build(model_config, bench, device)
        specs = model_config.sparse_specs([f"f{i}" for i in range(bench.num_tables)])
        sharded_ids = shard_model(
            build(model_config, bench, "meta"), device, sparse_lr=LEARNING_RATE, sharding_types=["table_wise"]
        )
        optimizer_ids = combined_optimizer(
            sharded_ids, lambda params: torch.optim.Adagrad(params, lr=LEARNING_RATE)
        )
        # The recipe's id-map backend choice: the Triton kernels on CUDA when available.
        backend = "triton" if device.type == "cuda" and importlib.util.find_spec("triton") else "torch"
        ids = CollisionlessIds(specs, id_config, rank=0, world_size=1, device=device, backend=backend)
        reinit = RowReinitializer(sharded_ids, optimizer_ids, specs)
        steps = {
            "gpurec": training_step(sharded, optimizer),
            "baseline": training_step(plain, torch.optim.Adagrad(plain.parameters(), lr=LEARNING_RATE)),
            "gpurec_collisionless": collisionless_step(sharded_ids, optimizer_ids, ids, reinit),
        }
        # Each path's data: the cycled row-id batches, or the next unused slice of the id stream.
        data = {name: batches for name in steps}
        data["gpurec_collisionless"] = stream
        for name, step in steps.items():
            for i in range(args.warmup):
                step(data[name][i % len(data[name])])
        rounds: dict[str, list[float]] = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                source = data[name]
                if source is stream:
                    start = args.warmup + r * args.steps
                    source = stream[start : start + args.steps]
                rounds[name].append(timed_samples_per_second(step, source, args.steps, device))
                print(f"{name}: {rounds[name][-1]:,.0f} samples/s", file=sys.stderr)
        id_tables = id_table_summary(ids.stats())
        id_tables["admitted_if_exact_counts"] = exact_admissions(stream, id_config.admit_after)
    finally:
        dist.destroy_process_group()
    gpurec, baseline = statistics.median(rounds["gpurec"]), statistics.median(rounds["baseline"])
    collisionless = statistics.median(rounds["gpurec_collisionless"])

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
            "collisionless_ids": {
                "vocab_per_table": args.vocab,
                "zipf": args.zipf,
                "admit_after": id_config.admit_after,
                "expire_after_hours": id_config.expire_after_hours,
                "eviction": id_config.eviction,
                "stream_batches": stream_length,
            },
        },
        "gpurec_samples_per_s": round(gpurec, 1),
        "baseline_samples_per_s": round(baseline, 1),
        "baseline": "plain torchrec EmbeddingBagCollection + torch.optim.Adagrad",
        "ratio": round(gpurec / baseline, 2),
        "gpurec_collisionless_samples_per_s": round(collisionless, 1),
        "collisionless_vs_fused": round(collisionless / gpurec, 2),
        "id_tables": id_tables,
        "rounds_samples_per_s": {name: [round(x, 1) for x in values] for name, values in rounds.items()},
        "device": device.type,
        "threads": args.threads,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
