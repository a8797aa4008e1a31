"""Deterministic replay of online training: what serving would have scored, sync by sync.

`train_online` reads a live log and the wall clock; this driver replays a fixed list of examples
in event-time order against a simulated clock, so a study can ask how stale serving parameters
cost accuracy, with the same result on every run:

- Labels arrive late. An impression at event time `ts` becomes a training example at
  `ts + label_delay_s` (the joiner emits it when its action window closes: 600 s by default).
- The trainer is the online trainer's own `Trainer` (`gpurec.train.recipe.build_trainer`, resumed
  from a batch run, batches made by `to_batch`). It steps once per `window_s` of simulated time
  on the examples that became available in that window (at most `batch_size` per step), as a
  trainer that keeps up with the log does.
- Serving. There is one served module per sync interval S, each fed by its own `DeltaPublisher`
  whose clock is the simulated time, so it publishes every S seconds of SIMULATED time, and a
  `DeltaApplier` applies what it wrote. An impression at `ts` is scored by a served module as it
  stood at `ts`: only the deltas published before `ts`. Scores come before training on the
  example (the label delay guarantees it), i.e. progressive validation as serving saw it.

One trainer serves every interval: the log is fixed, so the trainer's path does not depend on
how often it syncs; only what each served module sees does. Each publisher gets its own record of
touched rows (`_PublisherView`), since taking them is what a publish does.

A served module changes only when a delta is applied, so the examples that arrive between two of
its deltas are scored together, just before the next one is applied: the same scores as one
request at a time, at a fraction of the cost.

Sync paths. The default is the real one: delta files (atomic write, checksum, fsync) polled by a
`DeltaApplier`. Intervals listed in `direct_s` skip the files: the publisher's very same entries
(touched rows, changed id-map slots, dense weights) go straight to the applier's all-or-nothing
apply. At a 5 s sync the file path writes tens of thousands of full dense deltas per simulated day,
which is what makes it slow here; the values served are the same either way (the report checks
that every served module ends equal).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpurec.embedding.rows import TouchedRows
from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import TrainerState, find_checkpoint, read_trained_run
from gpurec.stream.records import Example
from gpurec.sync.deltafile import DeltaApplier, Entry
from gpurec.sync.examples import to_batch
from gpurec.sync.publish import MODEL_PREFIX, REMAP_PREFIX, DeltaPublisher
from gpurec.train.config import TrainConfig
from gpurec.train.distributed import init_distributed
from gpurec.train.recipe import Trainer, build_trainer

Score = Callable[[float, int, int], None]  # (sync interval, start, end): score examples[start:end] now


@dataclass(frozen=True)
class ReplaySettings:
    sync_every_s: tuple[float, ...] = (5.0, 60.0, 600.0)  # one served module per interval
    label_delay_s: float = 600.0  # impression -> training example (the joiner's default window)
    window_s: float = 0.0  # the trainer steps once per this much simulated time (0: the shortest sync)
    batch_size: int = 512  # most examples in one step (a busier window takes several)
    direct_s: tuple[float, ...] = ()  # intervals synced by direct apply instead of delta files
    snapshot_every: int = 200  # deltas between full snapshots on the file path (compaction)
    # A step of n examples weighs its loss by n / reference_batch (None: the batch run's
    # batch_size; 0: no weighting, every step a plain mean), as `train_online` does.
    reference_batch: int | None = None

    def __post_init__(self) -> None:
        if not self.sync_every_s or any(s <= 0 for s in self.sync_every_s):
            raise InvalidInput(f"sync intervals must be positive seconds, got {self.sync_every_s}")
        if len(set(self.sync_every_s)) != len(self.sync_every_s):
            raise InvalidInput(f"sync intervals repeat: {self.sync_every_s}")
        if self.reference_batch is not None and self.reference_batch < 0:
            raise InvalidInput(f"reference_batch must not be negative, got {self.reference_batch}")
        if self.label_delay_s < 0 or self.window_s < 0 or self.batch_size <= 0 or self.snapshot_every <= 0:
            raise InvalidInput(
                "label_delay_s and window_s must not be negative, batch_size and snapshot_every positive"
            )

    @property
    def step_window_s(self) -> float:
        return self.window_s or min(self.sync_every_s)


class _EventClock:
    """The publishers' clock: simulated seconds, moved by the replay."""

    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


class _PublisherView:
    """The trainer as one publisher sees it: the shared model, tables and id maps, but its own
    record of touched rows (a publish takes them, and each interval publishes at its own pace)."""

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer
        self.touched: TouchedRows | None = None  # set by DeltaPublisher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class _AllTouched:
    """What the trainer records touched rows into: every publisher's record at once."""

    def __init__(self, parts: list[TouchedRows]) -> None:
        self.parts = parts

    def add(self, rows: Any) -> None:
        for part in self.parts:
            part.add(rows)


class _DirectPublisher(DeltaPublisher):
    """A `DeltaPublisher` whose deltas go straight to an applier: same entries, no files."""

    def __init__(self, trainer: Any, applier: DeltaApplier, **settings: Any) -> None:
        self.applier = applier
        super().__init__(trainer, applier.directory, **settings)  # the directory stays empty

    def _write(self, kind: str, parts: list[Any], state: TrainerState) -> Path | None:
        entries: list[Entry] = [entry for part, _, _ in parts for entry in part]
        if kind == "rows" and not entries:
            return None  # as on the file path: nothing changed, nothing published
        if kind == "rows":
            self.counts["rows_shipped"] += sum(
                v.shape[0] for n, _, v in entries if n.startswith(MODEL_PREFIX)
            )
            self.counts["slots_shipped"] += sum(
                v.numel() for n, _, v in entries if n.startswith(REMAP_PREFIX)
            )
        header = {
            "newest_event_ms": self.newest_event_ms,
            "examples_trained": state.samples,
            "step": state.step,
        }
        self.applier._apply(
            self.seq + 1, kind, header, entries
        )  # the applier's checked, all-or-nothing apply
        return self.directory


@dataclass
class _Served:
    interval: float
    publisher: DeltaPublisher
    applier: DeltaApplier
    direct: bool
    scored_to: int = 0  # examples before this index are scored


def load_trainer(init: str | Path, train_config: TrainConfig | None = None) -> tuple[Trainer, TrainerState]:
    """The online trainer resumed from a batch run or checkpoint (model, optimizer state, id maps),
    as `train_online` starts it."""
    source = find_checkpoint(init)
    written = read_trained_run(source)
    if train_config is None:
        train_config = TrainConfig.from_dict(dict(written.train_config))
    ctx = init_distributed(train_config.device)
    if ctx.world_size != 1:
        raise InvalidInput("replay runs as one process")
    run = dataclasses.replace(
        written, world_size=1, train_config=dataclasses.asdict(train_config), resumed_from=str(source)
    )
    trainer = build_trainer(run, train_config, ctx, ([0.0] * run.num_dense, [1.0] * run.num_dense))
    trainer.resume(source)
    return trainer, TrainerState(run=run)


def replay_online(
    init: str | Path,
    examples: Sequence[Example],
    served: Mapping[float, nn.Module],
    score: Score,
    work_dir: str | Path,
    settings: ReplaySettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Replay `examples` (sorted by event time) through online training from `init`, keeping each
    module of `served` (one per sync interval, all loaded from `init`) in sync at its interval, and
    calling `score(interval, start, end)` whenever examples[start:end] must be scored by
    `served[interval]` as it stands. Returns counts, timings and the end-of-replay agreement check."""
    settings = settings or ReplaySettings()
    if set(served) != set(settings.sync_every_s):
        raise InvalidInput(
            f"served modules for {sorted(served)}, sync intervals {sorted(settings.sync_every_s)}"
        )
    ts_ms = np.fromiter((e.served.ts_ms for e in examples), dtype=np.int64, count=len(examples))
    if len(ts_ms) and np.any(np.diff(ts_ms) < 0):
        raise InvalidInput("replay needs the examples in event-time order")
    work_dir = Path(work_dir)
    started = time.perf_counter()
    trainer, state = load_trainer(init)
    run = trainer.run
    delay_ms, window_ms = round(settings.label_delay_s * 1000), round(settings.step_window_s * 1000)
    available_ms = ts_ms + delay_ms
    clock = _EventClock((int(available_ms[0]) // window_ms * window_ms) / 1000 if len(ts_ms) else 0.0)

    sides: list[_Served] = []
    views = []
    for interval in settings.sync_every_s:
        view = _PublisherView(trainer)
        applier = DeltaApplier(served[interval], work_dir / f"sync-{_label(interval)}")
        options = {"rows_every_s": interval, "dense_every_s": interval, "clock": clock}
        direct = interval in settings.direct_s
        if direct:  # one snapshot at the start, then deltas only: nothing to compact in memory
            publisher: DeltaPublisher = _DirectPublisher(view, applier, snapshot_every=1 << 62, **options)
        else:
            publisher = DeltaPublisher(
                view, applier.directory, snapshot_every=settings.snapshot_every, **options
            )
            applier.poll()  # the starting snapshot
        sides.append(_Served(interval, publisher, applier, direct))
        views.append(view)
    trainer.touched = _AllTouched([v.touched for v in views])  # type: ignore[assignment]

    reference = settings.reference_batch
    if reference is None:
        reference = int(run.train_config["batch_size"])
    bar = _progress_bar(progress, len(examples))
    steps = 0
    sync_seconds = 0.0
    trainer.model.train()
    for start, end, window_end_ms in _steps(available_ms, window_ms, settings.batch_size):
        chunk = list(examples[start:end])
        trainer.step(to_batch(chunk, run), loss_scale=len(chunk) / reference if reference else 1.0)
        steps += 1
        state.step += 1
        state.samples += len(chunk)
        # The trainer has now trained on everything that became available before this moment.
        now_ms = (
            window_end_ms
            if end == len(examples) or available_ms[end] >= window_end_ms
            else int(available_ms[end])
        )
        clock.now_s = now_ms / 1000
        synced = time.perf_counter()
        for side in sides:
            _sync(side, state, chunk, ts_ms, now_ms, score)
        sync_seconds += time.perf_counter() - synced
        bar.update(len(chunk))
    bar.close()
    for side in sides:  # the impressions after the last sync see the last applied deltas
        if side.scored_to < len(examples):
            score(side.interval, side.scored_to, len(examples))
            side.scored_to = len(examples)
        side.publisher.finish(state)  # everything trained, so every served module should agree
        if not side.direct:
            side.applier.poll()
    return {
        "steps": steps,
        "examples": state.samples,
        "window_s": settings.step_window_s,
        "label_delay_s": settings.label_delay_s,
        "seconds": round(time.perf_counter() - started, 3),
        "sync_seconds": round(sync_seconds, 3),
        "deltas": {
            _label(s.interval): {**s.publisher.counts, "path": "direct" if s.direct else "files"}
            for s in sides
        },
        "served_agree": _agree([served[s.interval] for s in sides]),
    }


def _steps(available_ms: np.ndarray, window_ms: int, batch_size: int):
    """(start, end, window end ms) of each step: the examples available within one window, at
    most `batch_size` at a time."""
    if not len(available_ms):
        return
    windows = available_ms // window_ms
    bounds = [0, *(np.flatnonzero(np.diff(windows)) + 1).tolist(), len(available_ms)]
    for lo, hi in itertools.pairwise(bounds):
        window_end = int(windows[lo] + 1) * window_ms
        for start in range(lo, hi, batch_size):
            yield start, min(start + batch_size, hi), window_end


def _sync(
    side: _Served, state: TrainerState, chunk: list[Example], ts_ms: np.ndarray, now_ms: int, score: Score
) -> None:
    publisher, now = side.publisher, now_ms / 1000
    due = (
        now - publisher.last_rows >= publisher.rows_every_s
        or now - publisher.last_dense >= publisher.dense_every_s
    )
    if due:  # impressions before now were served by the module as it is: score them before it changes
        upto = int(np.searchsorted(ts_ms, now_ms, side="left"))
        if upto > side.scored_to:
            score(side.interval, side.scored_to, upto)
            side.scored_to = upto
    before = publisher.seq
    publisher.after_step(publisher.trainer, state, chunk)
    if publisher.seq != before and not side.direct:
        side.applier.poll()
    if side.applier.version != publisher.seq:
        raise RuntimeError(
            f"served module for {_label(side.interval)} is at delta {side.applier.version}, published {publisher.seq}"
        )


def _agree(modules: list[nn.Module]) -> bool:
    first = modules[0].state_dict()
    return all(all(torch.equal(first[k], v) for k, v in m.state_dict().items()) for m in modules[1:])


def _label(interval: float) -> str:
    return f"{interval:g}s"


def _progress_bar(enabled: bool, total: int):
    import sys

    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc="replay online", unit="example", disable=not enabled, mininterval=interval)
