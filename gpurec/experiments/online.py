"""What online training buys on the drifting synthetic world: AUC per simulated day of

- frozen: the batch model trained on days 1..T (T = `train_days`, 3 by default), never updated;
- online, sync every S (5 s, 60 s, 10 min): that batch model trained on online from day T+1 on,
  replayed in event-time order (`gpurec.sync.replay`): every impression is scored by a served
  ranker that holds only the deltas published before it, then trained on once its label is in
  (`label_delay_s` later, the joiner's window);
- daily retrain: on day d, a batch model trained from scratch (same config and seed) on days
  1..d-1, as a nightly job would have delivered at midnight (day T+1 is the frozen model itself).

Batch training uses the default config for a fixed 2 epochs (`--epochs`): there is no valid split
for the config's early stopping, since every day after the training days is a test day.

Every variant is scored through the served TorchScript ranker (`build_serving_ranker`) on the
same impressions: the test split (days T+1..N) of the preprocessed world, in event-time order.
For each seed the world, its logs, features and every training run are made from scratch (the
seed seeds the world and training); the report gives like- and finish-AUC per day per variant,
their mean and spread over seeds, and the frozen model on its own last training day (in-sample).

Splits: preprocessing's own time split (`valid_fraction` 0, `test_fraction` = later days / all
days) makes the train split exactly days 1..k; the same logs are preprocessed once per k the
study trains on. Feature rows are point-in-time, so they are identical in every copy; only the
train split (and its dense normalisation) differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from gpurec.data.schema import MS_PER_DAY
from gpurec.data.world import WorldConfig
from gpurec.errors import InvalidInput
from gpurec.model.config import ModelConfig
from gpurec.preprocess.manifest import load_manifest
from gpurec.sync.replay import ReplaySettings
from gpurec.train.config import DEFAULT_CONFIG, TrainConfig, load_configs

DEFAULT_WORLD = WorldConfig(users=2000, items=5000, days=7, seed=7)  # the `make demo` world
DEFAULT_OUT = Path("runs/experiment-online")
DEFAULT_SEEDS: tuple[int, ...] = (7, 8, 9)
DEFAULT_SYNC: tuple[float, ...] = (5.0, 60.0, 600.0)
DEFAULT_REPLAY = ReplaySettings(
    sync_every_s=DEFAULT_SYNC, direct_s=(5.0,)
)  # 5 s: delta files are too slow (see replay)
# A CI-sized run: a small world, two training days, two online days, one seed, one epoch.
QUICK = {"users": 200, "items": 500, "days": 4, "train_days": 2, "seeds": "7", "epochs": 1}
TASKS: tuple[str, ...] = ("like", "finish")
SORT_KEY = ["ts", "request_id", "item_id"]  # event-time order, ties broken the same way everywhere


@dataclasses.dataclass(frozen=True)
class Study:
    world: WorldConfig = DEFAULT_WORLD  # its seed is replaced by each of `seeds`
    train_days: int = 3
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    replay: ReplaySettings = DEFAULT_REPLAY
    # Batch training: the default config, but a fixed number of epochs: the config's own stopping
    # rule needs a valid split, and here every day after training is a test day.
    epochs: int = 2
    max_steps: int | None = None
    threads: int = 1  # torch intra-op threads while the study runs

    def __post_init__(self) -> None:
        if not 1 <= self.train_days < self.world.days:
            raise InvalidInput(
                f"--train-days must be at least 1 and below --days ({self.world.days}), got {self.train_days}"
            )
        if not self.seeds:
            raise InvalidInput("--seeds: give at least one seed")

    def variants(self) -> list[str]:
        return ["frozen", *(online_name(s) for s in self.replay.sync_every_s), "daily"]


def online_name(interval: float) -> str:
    return f"online-{interval:g}s"


def variant_label(name: str, train_days: int) -> str:
    if name == "frozen":
        return f"frozen batch model (days 1-{train_days})"
    if name == "daily":
        return "batch retrained daily (from scratch)"
    seconds = float(name.removeprefix("online-").removesuffix("s"))
    every = f"{seconds / 60:g} min" if seconds > 60 and seconds % 60 == 0 else f"{seconds:g} s"
    return f"online, sync every {every}"


# ---- data and models --------------------------------------------------------------------------


def prepare_world(root: Path, world: WorldConfig, train_days: int) -> dict[int, Path]:
    """Logs of `world` under root/raw, preprocessed once per training cut k = train_days..days-1
    (train split = days 1..k, test = the rest); returns {k: features directory}."""
    from gpurec.data.generate import generate_synthetic
    from gpurec.preprocess.run import preprocess

    shutil.rmtree(root, ignore_errors=True)
    generate_synthetic(world, root / "raw")
    out = {}
    for k in range(train_days, world.days):
        features = root / f"features-train-days-1-{k}"
        preprocess(
            root / "raw",
            features,
            engine="cpu",
            valid_fraction=0.0,
            test_fraction=(world.days - k) / world.days,
        )
        splits = load_manifest(features).splits
        days = splits["train"].days + splits["test"].days
        if len(splits["train"].days) != k or splits["train"].days != sorted(days)[:k]:
            raise RuntimeError(
                f"preprocess made train days {splits['train'].days}, expected the first {k} of {days}"
            )
        out[k] = features
    return out


def served_ranker(run_dir: Path) -> tuple[torch.jit.ScriptModule, Any]:
    """The served TorchScript ranker of a training run, and its contract."""
    from gpurec.model.trained import load_trained_model
    from gpurec.serve.artifact import build_serving_ranker
    from gpurec.serve.export import contract_for

    model, lookup, run = load_trained_model(run_dir)
    contract = contract_for(model, run, max_batch_size=8192)
    return build_serving_ranker(model, lookup, contract), contract


def ranker_inputs(
    frame: pl.DataFrame, contract: Any
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from gpurec.serve.artifact import to_tensors
    from gpurec.serve.contract import rows_from_features

    return to_tensors(rows_from_features(contract, frame), contract)


def score_rows(
    module: torch.jit.ScriptModule, inputs: tuple, start: int, end: int, chunk: int = 8192
) -> dict[str, np.ndarray]:
    """Each task's served probability for rows [start, end) of `inputs`."""
    dense, single, multi = inputs
    parts: dict[str, list[np.ndarray]] = {t: [] for t in TASKS}
    with torch.inference_mode():
        for lo in range(start, end, chunk):
            hi = min(lo + chunk, end)
            out = module(dense[lo:hi], single[lo:hi], [m[lo:hi] for m in multi])
            for task in TASKS:
                parts[task].append(out[task].reshape(-1).numpy().copy())
    return {t: np.concatenate(p) if p else np.empty(0, dtype=np.float32) for t, p in parts.items()}


def split_frame(features: Path, split: str, files: Sequence[Path] | None = None) -> pl.DataFrame:
    manifest = load_manifest(features)
    chosen = list(files) if files is not None else manifest.split_files(split, features)
    return pl.concat([pl.read_parquet(f) for f in chosen]).sort(SORT_KEY)


def day_numbers(frame: pl.DataFrame, first_day: str) -> np.ndarray:
    """1-based simulated day of each row (day 1 = the first day of the logs)."""
    epoch_day = (date.fromisoformat(first_day) - date(1970, 1, 1)).days
    return (frame["ts"].dt.epoch("ms").to_numpy() // MS_PER_DAY - epoch_day + 1).astype(np.int64)


def day_aucs(
    labels: dict[str, np.ndarray], scores: dict[str, np.ndarray], days: np.ndarray, wanted: Sequence[int]
) -> dict[str, Any]:
    """AUC per task per day (None where a day has one class), and over all the days together."""
    from gpurec.train.metrics import auc

    def safe(y: np.ndarray, s: np.ndarray) -> float | None:
        return round(float(auc(y, s)), 6) if 0 < y.sum() < len(y) else None

    out: dict[str, Any] = {}
    for task in TASKS:
        out[task] = [safe(labels[task][days == d], scores[task][days == d]) for d in wanted]
        out[f"{task}_all"] = safe(labels[task], scores[task])
    return out


# ---- one seed ---------------------------------------------------------------------------------


def run_seed(
    study: Study,
    seed: int,
    root: Path,
    configs: tuple[ModelConfig, TrainConfig],
    progress: bool,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from gpurec.sync.examples import examples_from_features
    from gpurec.sync.replay import replay_online
    from gpurec.train.recipe import train

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    world = dataclasses.replace(study.world, seed=seed)
    T, N = study.train_days, world.days
    say(f"seed {seed}: writing the world's logs and features under {root}")
    features = prepare_world(root, world, T)
    seconds["prepare"] = time.perf_counter() - clock

    model_config, train_config = configs[0], dataclasses.replace(configs[1], seed=seed)
    runs: dict[int, Path] = {}
    for k, data in features.items():  # k = T is the frozen model; k > T the daily retrains
        clock = time.perf_counter()
        say(f"seed {seed}: batch training on days 1-{k}")
        runs[k] = root / f"batch-days-1-{k}"
        train(data, runs[k], model_config, train_config, progress=progress)
        seconds[f"train_days_1_{k}"] = time.perf_counter() - clock

    main = features[T]
    manifest = load_manifest(main)
    first_day = manifest.splits["train"].days[0]
    frame = split_frame(main, "test")
    days = day_numbers(frame, first_day)
    online_days = list(range(T + 1, N + 1))
    labels = {t: frame[t].to_numpy().astype(np.float64) for t in TASKS}
    frozen, contract = served_ranker(runs[T])
    inputs = ranker_inputs(frame, contract)
    n = frame.height
    scores: dict[str, dict[str, np.ndarray]] = {}

    clock = time.perf_counter()
    scores["frozen"] = score_rows(frozen, inputs, 0, n)
    daily = {t: np.full(n, np.nan) for t in TASKS}
    for d in online_days:  # day d is served by the model trained on days 1..d-1
        module, other = served_ranker(runs[d - 1])
        if (other.dense_features, other.sparse_features, other.multi_valued_features) != (
            contract.dense_features,
            contract.sparse_features,
            contract.multi_valued_features,
        ):
            raise RuntimeError(f"the model trained on days 1-{d - 1} reads other inputs than the frozen one")
        rows = np.flatnonzero(days == d)
        if rows.size:  # rows are in time order, so a day is one contiguous block
            part = score_rows(module, inputs, int(rows[0]), int(rows[-1]) + 1)
            for t in TASKS:
                daily[t][rows[0] : rows[-1] + 1] = part[t]
    scores["daily"] = daily
    last_train = split_frame(main, "train", [manifest.split_files("train", main)[-1]])
    in_sample = score_rows(frozen, ranker_inputs(last_train, contract), 0, last_train.height)
    seconds["score_batch_models"] = time.perf_counter() - clock

    clock = time.perf_counter()
    say(
        f"seed {seed}: replaying days {T + 1}-{N} through online training (sync every {', '.join(f'{s:g} s' for s in study.replay.sync_every_s)})"
    )
    examples = examples_from_features(main, "test")
    examples.sort(key=lambda e: (e.served.ts_ms, e.served.request_id, e.served.item_id))
    order = np.array([(e.served.request_id, e.served.item_id) for e in examples], dtype=np.int64).reshape(
        -1, 2
    )
    if not np.array_equal(order, frame.select("request_id", "item_id").to_numpy().astype(np.int64)):
        raise RuntimeError("the replayed examples are not the scored rows in the same order")
    served = {s: served_ranker(runs[T])[0] for s in study.replay.sync_every_s}
    online = {s: {t: np.full(n, np.nan) for t in TASKS} for s in study.replay.sync_every_s}

    def score(interval: float, start: int, end: int) -> None:
        part = score_rows(served[interval], inputs, start, end)
        for t in TASKS:
            online[interval][t][start:end] = part[t]

    replay = replay_online(runs[T], examples, served, score, root / "replay", study.replay, progress=progress)
    shutil.rmtree(root / "replay", ignore_errors=True)  # delta files: up to hundreds of MB, done with
    for interval, values in online.items():
        scores[online_name(interval)] = values
    seconds["replay"] = time.perf_counter() - clock
    for name, values in scores.items():
        if any(np.isnan(v).any() for v in values.values()):
            raise RuntimeError(f"{name}: some impressions were never scored")

    return {
        "seed": seed,
        "days": online_days,
        "dates": sorted(manifest.splits["test"].days),
        "impressions": [int((days == d).sum()) for d in online_days],
        "positives": {t: [int(labels[t][days == d].sum()) for d in online_days] for t in TASKS},
        "auc": {name: day_aucs(labels, scores[name], days, online_days) for name in study.variants()},
        "frozen_on_last_train_day": {
            "day": T,
            **{t: round(float(_auc(last_train[t].to_numpy(), in_sample[t])), 6) for t in TASKS},
        },
        "replay": replay,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def _auc(labels: Any, scores: np.ndarray) -> float:
    from gpurec.train.metrics import auc

    return auc(np.asarray(labels, dtype=np.float64), scores)


# ---- the study --------------------------------------------------------------------------------


def summarize(per_seed: list[dict[str, Any]], variants: Sequence[str]) -> dict[str, Any]:
    """Mean, standard deviation (over seeds, ddof 1; 0 for one seed), min and max per day."""
    out: dict[str, Any] = {}
    for name in variants:
        out[name] = {}
        for task in TASKS:
            for key in (task, f"{task}_all"):
                values = np.array([r["auc"][name][key] for r in per_seed], dtype=np.float64)  # None -> nan
                values = values.reshape(len(per_seed), -1)
                std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(values.shape[1])
                stats = {
                    "mean": values.mean(axis=0),
                    "std": std,
                    "min": values.min(axis=0),
                    "max": values.max(axis=0),
                }
                out[name][key] = {
                    k: [None if np.isnan(x) else round(float(x), 4) for x in v] for k, v in stats.items()
                }
                if key.endswith("_all"):
                    out[name][key] = {k: v[0] for k, v in out[name][key].items()}
    return out


def run_study(
    out: Path, study: Study | None = None, progress: bool = False, say: Callable[[str], None] = lambda _: None
) -> dict[str, Any]:
    """Run every seed; write results.json and auc_by_day.png under `out`; return the report."""
    study = study or Study()
    started = time.perf_counter()
    out = Path(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(study.threads)  # tiny online steps: extra threads only spin on a busy machine
    # Read once: every seed trains with the same config even if the file changes meanwhile.
    configs = load_configs(DEFAULT_CONFIG, epochs=study.epochs, max_steps=study.max_steps)
    try:
        per_seed = []
        for seed in study.seeds:
            per_seed.append(run_seed(study, seed, out / f"seed-{seed}", configs, progress, say))
            (out / f"seed-{seed}" / "result.json").write_text(
                json.dumps(per_seed[-1], indent=2) + "\n"
            )  # kept if a later seed fails
    finally:
        torch.set_num_threads(threads)
    replay = study.replay
    report = {
        "settings": {
            "users": study.world.users,
            "items": study.world.items,
            "days": study.world.days,
            "train_days": study.train_days,
            "seeds": list(study.seeds),
            "sync_every_s": list(replay.sync_every_s),
            "label_delay_s": replay.label_delay_s,
            "trainer_window_s": replay.step_window_s,
            "trainer_max_batch": replay.batch_size,
            "direct_sync_s": list(replay.direct_s),
            "reference_batch": replay.reference_batch if replay.reference_batch is not None else configs[1].batch_size,
            "daily_retrain": "from scratch on days 1..d-1, same config and seed",
            "batch_training": {
                k: getattr(configs[1], k)
                for k in ("epochs", "batch_size", "dense_lr", "sparse_lr", "max_steps")
            },
            "threads": study.threads,
        },
        "variants": {name: variant_label(name, study.train_days) for name in study.variants()},
        "days": per_seed[0]["days"],
        "summary": summarize(per_seed, study.variants()),
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    from gpurec.experiments.online_report import plot

    report["plot"] = str(plot(report, out / "auc_by_day.png"))
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ---- command ----------------------------------------------------------------------------------


def parse_numbers(text: str, flag: str, kind: type = float, allow_empty: bool = False) -> list[Any]:
    """Comma-separated non-negative numbers (positive for floats), in order, without repeats."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise InvalidInput(f"{flag} takes numbers separated by commas, got {text!r}") from None
    if (not values and not allow_empty) or any(v < 0 or (kind is float and v == 0) for v in values):
        raise InvalidInput(
            f"{flag} takes {'positive' if kind is float else 'non-negative'} numbers separated by commas, got {text!r}"
        )
    return list(dict.fromkeys(values))


def study_from_args(args: Any) -> Study:
    """Explicit flags win over --quick's small world, which wins over the defaults."""
    preset = QUICK if args.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        return value if value is not None else preset.get(name, default)

    world = WorldConfig(users=pick("users", 2000), items=pick("items", 5000), days=pick("days", 7))
    sync = tuple(parse_numbers(args.sync_every, "--sync-every"))
    direct = tuple(v for v in parse_numbers(args.direct_sync, "--direct-sync", allow_empty=True) if v in sync)
    replay = ReplaySettings(
        sync_every_s=sync,
        label_delay_s=args.label_delay,
        window_s=args.window,
        batch_size=args.batch_size,
        direct_s=direct,
        reference_batch=args.reference_batch,
    )
    seeds = tuple(parse_numbers(str(pick("seeds", "7,8,9")), "--seeds", kind=int))
    return Study(world, pick("train_days", 3), seeds, replay, pick("epochs", 2), args.max_steps, args.threads)


def run(args: Any) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings

    quiet_library_warnings()
    study = study_from_args(args)
    say = (lambda _: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with quiet:
        report = run_study(args.out, study, progress=not args.json, say=say)
    if args.json:
        print(json.dumps(report))
    else:
        from gpurec.experiments.online_report import print_report

        print_report(report, args.out)
    return 0
