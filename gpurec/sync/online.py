"""Online training: `gpurec train --online`, learning from the joiner's examples as they arrive.

Read it top to bottom (`train_online`): join the process group, pick the checkpoint to start
from (this run's latest, else `--init`: a batch run or any checkpoint), build the SAME sharded
model, fused optimizers and id maps as batch training (`gpurec.train.recipe.build_trainer`) and load
it, then loop: rank 0 plans the next micro-batch (a full batch, or a partial one once its first
example has waited `linger_s`), every rank takes its slice of it, steps, and every
`checkpoint_every_s` the model is checkpointed together with the next offset of every partition.

Exactly once: the checkpoint is the only record of progress. A trainer killed at any instant
restarts from its latest checkpoint's model AND offsets, so the examples trained after that
checkpoint are trained again into a model that never saw them: every example is in the final
model exactly once. The checkpoint also keeps a count and an order-independent digest of the
examples trained, which tests compare with the log. The consumer group's committed offsets are
written after each checkpoint for monitoring (lag) only.

Metrics: every step's logits come from the forward pass before its update, so they are scores of
examples the model has not trained on: progressive validation (the AUC of an online learner). They
are saved with each checkpoint (`gpurec.sync.progressive`), exactly once like the examples, and
the report's `auc_<task>` covers every example the run has trained.

Multi-rank (torchrun): rank 0 reads the log and plans; the plan is just the positions after the
batch (`ExampleFeed.plan`), broadcast to every rank, which rebuilds the same merged batch from
them and keeps its slice, exactly like the batch loader splits a global batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gpurec.data.hashing_core import splitmix64
from gpurec.errors import InputNotFound, InvalidInput
from gpurec.model.checkpoint import (
    TrainerState,
    find_checkpoint,
    latest_checkpoint,
    read_trained_run,
    save_checkpoint,
)
from gpurec.stream.log import EventLog, Record
from gpurec.stream.records import DeadLetter, Example, encode
from gpurec.sync.examples import EXAMPLES_TOPIC, ExampleFeed, Taken, check_fits, to_batch
from gpurec.sync.forget import USER_FEATURE, ForgetFollower, user_table_key
from gpurec.sync.progressive import ProgressiveScores, load_progressive, task_aucs
from gpurec.train.config import TrainConfig
from gpurec.train.distributed import init_distributed
from gpurec.train.recipe import Trainer, build_trainer

DEAD_LETTER_TOPIC = "trainer.dead_letter"
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class OnlineSettings:
    """How `gpurec train --online` consumes the log (batch sizes are global: all ranks together)."""

    batch_size: int = 512
    linger_s: float = 1.0  # a partial batch trains once its oldest example has waited this long
    checkpoint_every_s: float = 30.0  # wall-clock seconds between checkpoints (with the offsets)
    max_steps: int = 0  # stop after this many steps in total (0: no limit)
    group: str = "trainer"  # consumer group whose committed offsets show the trainer's lag
    poll_s: float = 0.05
    topic: str = EXAMPLES_TOPIC
    # A step of n examples (all ranks) weighs its loss by n / reference_batch, so that an example
    # moves the model as far as it did in batch training whatever the micro-batch size. None: the
    # train config's batch_size; 0: no weighting (each step a plain mean, as in batch training).
    # Without it, 5-example steps after a 512-example batch run cost 0.033 like-AUC on the next
    # day of the synthetic world (`gpurec experiment online`, README).
    reference_batch: int | None = None

    def __post_init__(self) -> None:
        if self.reference_batch is not None and self.reference_batch < 0:
            raise InvalidInput(f"reference_batch must not be negative, got {self.reference_batch}")
        if self.batch_size <= 0 or self.linger_s < 0 or self.checkpoint_every_s <= 0 or self.max_steps < 0:
            raise InvalidInput("batch_size and checkpoint_every_s must be positive, linger_s and max_steps not negative")


def example_key_hash(example: Example) -> int:
    """A 64-bit hash of the example's identity (served row and whether it is a correction)."""
    served = example.served
    mixed = splitmix64((served.request_id & _MASK) ^ splitmix64(served.item_id & _MASK))
    return mixed ^ int(example.correction)


def examples_digest(examples: list[Example]) -> int:
    """The order-independent digest of a set of trained examples (what `TrainerState.digest` holds)."""
    return sum(example_key_hash(e) for e in examples) & _MASK


class StepListener(Protocol):
    """Told after every step (parameter sync publishes from here) and once at the end."""

    def after_step(self, trainer: Trainer, state: TrainerState, examples: list[Example]) -> None: ...

    def finish(self, state: TrainerState) -> dict[str, Any]: ...

    def after_forget(self, trainer: Trainer, state: TrainerState) -> None: ...


def train_online(
    log: EventLog,
    out_dir: str | Path,
    settings: OnlineSettings,
    train_config: TrainConfig | None = None,
    *,
    init: str | Path | None = None,
    drain: bool = False,
    stop: threading.Event | None = None,
    progress: bool = True,
    listener: Callable[[Trainer], StepListener] | None = None,
) -> dict[str, Any]:
    """Train on `examples` until stopped (or, with `drain`, until none are left); return a report.

    `train_config` (learning rates, sharding, seed, device) defaults to the one the starting
    checkpoint was trained with, so online training continues batch training's optimisation.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidInput(f"--out {out_dir} is a file, not a directory")
    own = latest_checkpoint(out_dir)
    if own is None and init is None:
        raise InputNotFound(f"{out_dir} has no checkpoint to resume: give --init (a batch training run or checkpoint)")
    source = own if own is not None else find_checkpoint(init)
    if settings.topic not in log.topics():
        raise InputNotFound(f"the event log has no {settings.topic!r} topic (is the joiner running?)")
    written = read_trained_run(source)
    if train_config is None:
        train_config = TrainConfig.from_dict(dict(written.train_config))
    ctx = init_distributed(train_config.device)
    run = dataclasses.replace(
        written, world_size=ctx.world_size, train_config=dataclasses.asdict(train_config), resumed_from=str(source)
    )
    # Normalisation buffers start neutral; the checkpoint overwrites them with the batch run's.
    trainer = build_trainer(run, train_config, ctx, ([0.0] * run.num_dense, [1.0] * run.num_dense))
    loaded = trainer.resume(source)
    state = loaded if own is not None else TrainerState(run=run)
    state.run = run
    listening = listener(trainer) if listener is not None else None

    partitions = log.partitions(settings.topic)
    start = log.start_offsets(settings.topic)
    positions = {p: state.offsets.get(f"{settings.topic}/{p}", start[p]) for p in range(partitions)}
    feed = ExampleFeed(log, positions, settings.topic)
    forgets = ForgetFollower(log, state.offsets)
    scores = ProgressiveScores(out_dir, run.model_config.tasks, ctx.rank)
    scores.forget_after(state.step)  # scores saved ahead of a checkpoint that never completed
    bar = _progress_bar(progress and ctx.is_main)
    stop = stop or threading.Event()
    started, first_step = time.perf_counter(), state.step
    last_checkpoint, waiting_since = time.monotonic(), None
    trained = invalid = forgotten = 0
    checkpoint = own

    reference = settings.reference_batch if settings.reference_batch is not None else train_config.batch_size
    trainer.model.train()
    while True:
        plan, done, save = None, False, False
        if ctx.is_main:
            available = feed.available(settings.batch_size)
            now = time.monotonic()
            waiting_since = (waiting_since or now) if available else None
            lingered = waiting_since is not None and now - waiting_since >= settings.linger_s
            if available >= max(ctx.world_size, 1) and (available >= settings.batch_size or lingered or drain):
                plan = feed.plan(settings.batch_size)
                waiting_since = None
            at_limit = settings.max_steps and state.step + (plan is not None) >= settings.max_steps
            done = stop.is_set() or bool(at_limit) or (drain and plan is None)
            save = now - last_checkpoint >= settings.checkpoint_every_s
            users = forgets.poll()
        else:
            users = []
        plan, done, save, users = _broadcast((plan, done, save, users), ctx.world_size)
        if users:  # erasure requests: before any step, so no later step trains the user's row again
            trainer.forget({USER_FEATURE: torch.tensor([user_table_key(u) for u in users], dtype=torch.int64)})
            forgotten += len(users)
            if listening is not None:
                listening.after_forget(trainer, state)
        if plan is not None:
            taken = feed.take_until(plan)
            usable, letters = _usable(taken, run)
            examples = [t.example for t in usable]
            invalid += len(letters)
            if ctx.is_main and letters:
                _dead_letter(log, letters)
            if len(examples) >= ctx.world_size:
                local = math.ceil(len(examples) / ctx.world_size)
                share = usable[ctx.rank * local : (ctx.rank + 1) * local]
                mine = [t.example for t in share]
                scale = len(examples) / reference if reference else 1.0
                result = trainer.step(to_batch(mine, run).to(ctx.device), loss_scale=scale)
                scores.add(result.logits, share)
                state.step += 1
                state.samples += len(examples)
                state.digest = (state.digest + examples_digest(examples)) & _MASK
                trained += len(examples)
                if listening is not None:
                    listening.after_step(trainer, state, mine)
            state.offsets = {f"{settings.topic}/{p}": o for p, o in feed.positions.items()}
            bar.update(len(taken))
            bar.set_postfix(step=state.step, lag=feed.lag() if ctx.is_main else 0, refresh=False)
        if ctx.is_main:
            state.offsets.update(forgets.offsets())
        if save or (done and state.step > (_step_of(checkpoint))):
            scores.save(state.step)  # before the checkpoint: a crash in between leaves files past it
            checkpoint = _checkpoint(out_dir, trainer, state, log, settings, ctx.is_main)
            last_checkpoint = time.monotonic()
        if done:
            break
        if plan is None:
            time.sleep(settings.poll_s)
    bar.close()
    synced = listening.finish(state) if listening is not None else {}
    if checkpoint is None:  # nothing trained, nothing saved: still leave a resumable checkpoint
        checkpoint = _checkpoint(out_dir, trainer, state, log, settings, ctx.is_main)
    seconds = time.perf_counter() - started
    report = {
        "steps": state.step - first_step,
        "examples": trained,
        "examples_total": state.samples,
        "invalid": invalid,
        "forgotten_users": forgotten,
        "seconds": round(seconds, 3),
        "examples_per_s": round(trained / max(seconds, 1e-9), 1),
        "lag": feed.lag(),
        "offsets": dict(state.offsets),
        "digest": state.digest,
        "checkpoint": str(checkpoint),
        "started_from": str(source),
        "world_size": ctx.world_size,
        "reference_batch": reference,
        "id_tables": trainer.ids.stats(),
        **{f"auc_{task}": value for task, value in task_aucs(load_progressive(out_dir), run.model_config.tasks).items()},
        **synced,
    }
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "online_summary.json").write_text(json.dumps(report, indent=2))
    return report


def _usable(taken: list[Taken], run) -> tuple[list[Taken], list[DeadLetter]]:
    """The records this model can train on, and dead letters for the rest (with the reason)."""
    decoded = [t for t in taken if t.example is not None]
    letters = [DeadLetter("example", "undecodable", t.raw, t.error) for t in taken if t.example is None]
    try:
        to_batch([t.example for t in decoded], run) if decoded else None
        return decoded, letters
    except InvalidInput:
        good = []
        for record in decoded:
            reason = check_fits(record.example, run)
            if reason:
                letters.append(DeadLetter("example", "does not fit the model", record.raw, reason))
            else:
                good.append(record)
        return good, letters


def _dead_letter(log: EventLog, letters: list[DeadLetter]) -> None:
    """At least once: a crash before the next checkpoint writes these letters again on replay."""
    if DEAD_LETTER_TOPIC not in log.topics():
        log.create_topic(DEAD_LETTER_TOPIC, 1)
    log.append(DEAD_LETTER_TOPIC, [Record(0, encode(letter), 0) for letter in letters])


def _checkpoint(out_dir: Path, trainer: Trainer, state: TrainerState, log: EventLog, settings: OnlineSettings, main: bool):
    path = save_checkpoint(out_dir, trainer.model, trainer.optimizer, state, ids=trainer.ids)
    if main:  # for lag monitoring only: the checkpoint's offsets are the trainer's truth
        offsets = {(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1])): v for k, v in state.offsets.items()}
        log.commit(settings.group, offsets=offsets)
    return path


def _step_of(checkpoint: Path | None) -> int:
    return -1 if checkpoint is None else int(checkpoint.name.removeprefix("step-"))


def _broadcast(value: Any, world_size: int) -> Any:
    """Rank 0's value on every rank."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _progress_bar(enabled: bool):
    import sys

    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 15.0
    return tqdm(desc="train --online", unit="example", disable=not enabled, mininterval=interval)
