"""Orchestration: days in time order, shards, splits, output files, manifest and summary.

Memory: the day being computed (its impressions, the actions of it and the next day), the next
day being read and the previous day's features being written, plus the dimension tables (users,
items: loaded whole, see ASSUMPTIONS) and the per-user/per-item counters. Never a whole log.

A shard replays the days before its block in state-only mode (validation, then a group_by over the
narrow columns on the streaming engine; no features, no output) to start from exactly the
counters a single run would have, then featurises only its own days.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from gpurec.checks import output_dir, require_dir
from gpurec.data import logs
from gpurec.data.pseudonym import read_key_id
from gpurec.data.schema import MS_PER_DAY, day_of, day_start_ms
from gpurec.errors import InvalidInput
from gpurec.preprocess.counters import CounterState
from gpurec.preprocess.dims import Dimensions, build_dimensions
from gpurec.preprocess.engine import EngineChoice, resolve_engine
from gpurec.preprocess.features import (
    DENSE_FEATURES,
    FEATURES,
    FINISH_DENOMINATOR,
    FINISH_NUMERATOR,
    HASHING_SCHEME,
    LABELS,
    META_COLUMNS,
    PRIOR_FINISH_RATE,
    PRIOR_LIKE_RATE,
    PRIOR_WEIGHT,
    output_schema,
)
from gpurec.preprocess.manifest import MANIFEST_VERSION, FeatureInfo, Manifest, SplitInfo, shard_manifest_name
from gpurec.preprocess.pipeline import process_day
from gpurec.preprocess.sources import INPUT_LOGS, ValidatedReader, check_inputs
from gpurec.preprocess.splits import SINGLE, SPLITS, Shard, owner_of, split_of

log = logging.getLogger("gpurec.preprocess")

WORLD_FILE = "world.json"
# zstd level 1 writes ~1.7x faster than the default level for ~9% larger files (random 64-bit ids do
# not compress anyway); the trainer reads each file once per epoch, the writer is on the hot path.
# Measured on one 674k-row day (CPU ms to write / MB / CPU ms to read): zstd-1 265 / 32.7 / 101,
# zstd-3 445 / 30.0 / 115, lz4 240 / 39.4 / 64, snappy 248 / 38.4 / 77, none 184 / 57.8 / 49.
# lz4 would save ~10% of the write and read faster, for 20% more disk and network per epoch; most of
# the write is encoding, not compression, so zstd-1 stays.
ZSTD_LEVEL = 1
DIMENSION_LOGS = ("users", "items")
ASSUMPTIONS = (
    "users and items are dimension tables (one row per user / item) and are loaded whole; impressions and actions are read one day at a time",
    "an impression's action is in the actions partition of the impression's day or the next day (late actions); several action rows for one impression: the last wins",
    "counters and labels use consenting users' events only; impressions of unknown or non-consenting users and of unknown items are excluded and counted",
    "cardinality_estimate: distinct values in the dimension tables (consenting users, valid items), an upper bound on the ids in the files; hour: 24",
)


@dataclass(frozen=True)
class Summary:
    """What a run did; `as_json()` is the `--json` output."""

    engine: str
    rows_in: int
    rows_out: dict[str, int]
    rejected: dict[str, int]
    excluded_no_consent: int
    seconds: float
    out: str
    manifest_path: str

    def as_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "rejected": self.rejected,
            "excluded_no_consent": self.excluded_no_consent,
            "seconds": self.seconds,
            "out": self.out,
        }


class _DayInputs:
    """A day's input batch: its impressions (plus those carried over from the previous partition)
    and the actions of that day and the next calendar day, each partition read and validated once.

    Days must be asked for in order (the carry and the action cache depend on it).
    """

    def __init__(self, reader: ValidatedReader, days: list[str]) -> None:
        self.reader = reader
        self.following = dict(zip(days, [*days[1:], None], strict=True))
        self.actions: dict[str, pl.DataFrame] = {}
        self.carried: pl.DataFrame | None = None

    def load(self, day: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        in_day, next_day_rows = self.reader.impressions(day, self.following[day])
        batch = in_day if self.carried is None else pl.concat([self.carried, in_day])
        self.carried = next_day_rows
        following = day_of(day_start_ms(day) + MS_PER_DAY)
        for wanted in (day, following):
            if wanted not in self.actions:
                self.actions[wanted] = self.reader.actions(wanted)
        self.actions = {d: f for d, f in self.actions.items() if d >= day}
        return batch, pl.concat([self.actions[day], self.actions[following]])


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="milliseconds")


def _prepare_out(out: Path, shard: Shard | None, block: list[str]) -> None:
    """Remove what this run will rewrite, so re-running gives the same directory.

    A single run owns the whole directory. A shard owns only its days and its manifest; it cannot
    clear the shared dead letter, so re-running a shard into the same --out appends its rejected
    rows again (start a fresh --out for a full re-run).
    """
    out.mkdir(parents=True, exist_ok=True)
    if shard is None:
        for name in (*SPLITS, "dead_letter"):
            shutil.rmtree(out / name, ignore_errors=True)
        for manifest in out.glob("manifest*.json"):
            manifest.unlink()
        return
    for split in SPLITS:
        for day in block:
            shutil.rmtree(out / split / f"day={day}", ignore_errors=True)
    for stale in (out / "manifest.json", out / shard_manifest_name(shard.index, shard.count)):
        stale.unlink(missing_ok=True)


def _feature_infos(dims: Dimensions) -> list[FeatureInfo]:
    infos = []
    for f in FEATURES:
        card = f.cardinality if isinstance(f.cardinality, int) or f.cardinality is None else dims.cardinality[f.cardinality]
        infos.append(FeatureInfo(f.name, f.kind, f.column, f.dtype, f.multi_valued, card if f.kind == "sparse" else None))
    return infos


def _source(input_dir: Path, days: list[str]) -> dict[str, Any]:
    world = input_dir / WORLD_FILE
    return {
        "input": str(input_dir.resolve()),
        "days": days,
        "world": json.loads(world.read_text()) if world.exists() else None,
        # Which key the user ids are pseudonyms of (None: raw ids), so features of two keys are refused.
        "pseudonym_key_id": read_key_id(input_dir),
    }


def _dense_moments(features: pl.DataFrame) -> dict[str, list[float]]:
    """[count, sum, sum of squares] per dense column (float64 sums: exact enough to merge)."""
    columns = [f.column for f in DENSE_FEATURES]
    sums = features.select(
        *[pl.col(c).cast(pl.Float64).sum().alias(f"{c}:s") for c in columns],
        *[(pl.col(c).cast(pl.Float64) ** 2).sum().alias(f"{c}:q") for c in columns],
    ).row(0, named=True)
    return {c: [float(features.height), sums[f"{c}:s"], sums[f"{c}:q"]] for c in columns}


def _write_day(
    features: pl.DataFrame, out: Path, split: str, day: str
) -> tuple[str, int, str | None, str | None, dict[str, list[float]]]:
    """Write one day's features; (relative path, rows, ts_min, ts_max, dense moments)."""
    relative = Path(split) / f"day={day}" / "part-00000.parquet"
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    features.write_parquet(path, compression="zstd", compression_level=ZSTD_LEVEL)
    ts = features["ts"]
    return str(relative), features.height, _iso(ts.min()), _iso(ts.max()), _dense_moments(features)


def preprocess(
    input_dir: str | Path,
    out_dir: str | Path,
    engine: str = "auto",
    shard: Shard | None = None,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    now_ms: int | None = None,
) -> Summary:
    """Turn the logs under `input_dir` into feature files + manifest under `out_dir`.

    `shard` (i of N) processes only block i of the impression days and writes a shard manifest;
    None processes every day and writes `manifest.json`. `now_ms` is validation's "now" (rows in
    the future are rejected); default: the wall clock at the start of the run.

    Bad input raises before anything is written where it can be (InputNotFound: a missing input
    directory or log; InvalidInput: a file missing a column, `out_dir` a file, bad fractions);
    InvalidInput after validation when every row of a log this run read was rejected, or when
    no feature row came out at all. No manifest is written then, so nothing downstream reads it.
    """
    started = time.perf_counter()
    input_dir, out = Path(input_dir), Path(out_dir)
    choice: EngineChoice = resolve_engine(engine)
    require_dir(input_dir, "input log directory")
    output_dir(out, "output directory")
    for name, value in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise InvalidInput(f"{name} must be in [0, 1), got {value}")
    check_inputs(input_dir)
    days = logs.list_days(input_dir, "impressions")
    unit = shard or SINGLE
    block = unit.block(days)
    prior = days[: days.index(block[0])] if block else []
    assignment = split_of(days, valid_fraction, test_fraction)
    _prepare_out(out, shard, block)

    def owns(log_name: str, day: str) -> bool:
        if log_name in DIMENSION_LOGS:
            return unit.index == 0
        return owner_of(day, days, unit.count) == unit.index

    reader = ValidatedReader(input_dir, out, owns, now_ms if now_ms is not None else int(time.time() * 1000))
    users, items = reader.read_log("users"), reader.read_log("items")
    for dimension in DIMENSION_LOGS:  # before the day loop: these fail fast
        reader.check_not_all_rejected(dimension)
    dims = build_dimensions(users, items)
    log.info("preprocess: engine=%s (%s)", choice.name, choice.reason)
    splits, excluded = _process_days(reader, days, prior, block, dims, choice, out, assignment)
    if prior and block:
        log.info("preprocess: shard %s rebuilt its counters from the %d days before its block", unit.label, len(prior))
    for day in logs.list_days(input_dir, "actions"):  # actions days no impression day reads
        reader.validate_only("actions", day)

    for name in INPUT_LOGS:
        reader.check_not_all_rejected(name)
    rows_out = {name: info.rows for name, info in splits.items()}
    if block and not any(rows_out.values()):
        raise InvalidInput(
            f"no feature rows came out of {reader.rows_read.get('impressions', 0):,} impressions under {input_dir}: "
            f"{reader.rejected.get('impressions', 0):,} rejected (see {out / 'dead_letter'}), "
            f"{excluded['no_consent']:,} excluded (user unknown or without training consent), "
            f"{excluded['unknown_item']:,} excluded (item unknown)"
        )
    rejected = {name: reader.rejected.get(name, 0) for name in ("impressions", "actions", *DIMENSION_LOGS)}
    counts = {
        "rows_in": reader.rows_read.get("impressions", 0),
        "actions_in": reader.rows_read.get("actions", 0),
        "rejected": rejected,
        "excluded_no_consent": excluded["no_consent"],
        "excluded_unknown_item": excluded["unknown_item"],
        "rows_out": rows_out,
    }
    seconds = round(time.perf_counter() - started, 3)
    manifest = Manifest(
        version=MANIFEST_VERSION,
        created_at=_iso(dt.datetime.now(dt.UTC)) or "",
        engine=choice.name,
        source=_source(input_dir, days),
        labels=list(LABELS),
        meta_columns=list(META_COLUMNS),
        features=_feature_infos(dims),
        dense_order=[f.column for f in DENSE_FEATURES],
        splits=splits,
        counts=counts,
        hashing=HASHING_SCHEME,
        constants={**_constants(valid_fraction, test_fraction), "engine_reason": choice.reason},
        shard=None if shard is None else {"index": shard.index, "count": shard.count},
        seconds=seconds,
    )
    path = manifest.write(out)
    return Summary(choice.name, counts["rows_in"], rows_out, rejected, excluded["no_consent"], seconds, str(out), str(path))


def _constants(valid_fraction: float, test_fraction: float) -> dict[str, Any]:
    return {
        "prior_weight": PRIOR_WEIGHT,
        "prior_like_rate": PRIOR_LIKE_RATE,
        "prior_finish_rate": PRIOR_FINISH_RATE,
        "finish_threshold": FINISH_NUMERATOR / FINISH_DENOMINATOR,
        "valid_fraction": valid_fraction,
        "test_fraction": test_fraction,
        "assumptions": list(ASSUMPTIONS),
    }


def _process_days(
    reader: ValidatedReader,
    days: list[str],
    prior: list[str],
    block: list[str],
    dims: Dimensions,
    choice: EngineChoice,
    out: Path,
    assignment: dict[str, str],
) -> tuple[dict[str, SplitInfo], dict[str, int]]:
    """Replay `prior` (counters only), then featurise and write `block`; (splits, exclusion counts).

    I/O overlaps compute: one thread reads and validates the next day while this one computes,
    another writes the previous day's file (Polars and Arrow release the GIL). At most one write
    is queued, so memory stays at a few days.
    """
    inputs = _DayInputs(reader, days)
    state = CounterState.empty()
    splits = {name: SplitInfo() for name in SPLITS}
    excluded = {"no_consent": 0, "unknown_item": 0}
    sequence = [*prior, *block] if block else []
    if not sequence:
        return splits, excluded

    def record(day: str, written: Future) -> None:
        file, rows, ts_min, ts_max, moments = written.result()
        splits[assignment[day]].add_day(day, rows, ts_min, ts_max, file, moments)
        log.info("preprocess: %s -> %s (%d rows)", day, assignment[day], rows)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="preprocess-io") as pool:
        loading = pool.submit(inputs.load, sequence[0])
        writing: tuple[str, Future] | None = None
        for i, day in enumerate(sequence):
            batch, actions = loading.result()
            if i + 1 < len(sequence):
                loading = pool.submit(inputs.load, sequence[i + 1])
            if day not in block:  # replay: counters only
                state = process_day(day, batch, actions, dims, state, choice, with_features=False).state
                continue
            result = process_day(day, batch, actions, dims, state, choice)
            state = result.state
            excluded["no_consent"] += result.excluded_no_consent
            excluded["unknown_item"] += result.excluded_unknown_item
            features = result.features if result.features is not None else pl.DataFrame(schema=output_schema())
            if writing is not None:
                record(*writing)
            writing = (day, pool.submit(_write_day, features, out, assignment[day], day))
        if writing is not None:
            record(*writing)
    return splits, excluded


__all__ = ["ASSUMPTIONS", "Summary", "preprocess"]
