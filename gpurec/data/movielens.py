"""MovieLens-100K as the four event logs: the real-data path of `gpurec generate`.

The data are read from the installed `recbole` wheel (the `data` extra), never copied into the
repo: the MovieLens licence forbids redistribution. Every choice below turns an explicit rating
into the implicit feed signals the rest of gpurec trains on.

Impressions (one per rating: a rating means the movie was put in front of the user)
- request_id: one request per (user, second), i.e. the ratings a user submitted in one second
  are read as one page of results. It is `user_id * 10**10 + unix_seconds`, which is unique,
  readable (user 196 at 881250949 -> 196_0881250949), and stable if the source is filtered.
  (user, item) is unique in MovieLens, so (request_id, item_id) is unique.
- position: 0-based rank within the request in item_id order (MovieLens records no slot order).
- ts: rating second in ms; surface "movielens", model_version "ml-100k".

Actions (one per impression)
- ts = impression ts + 1 ms: strictly after its impression, yet in the same second and so the
  same day partition; floor(ts / 1000) is still the source timestamp.
- like = rating >= 4. watch_ms = duration_ms * rating / 5, so finish (watch_ms >= 0.9 *
  duration_ms) means rating == 5: like and finish are distinct labels (55% vs 21%).
- skip = rating <= 2 (watched at most 40%). share / comment / follow are not observed: False.

Items
- author_id: MovieLens has no creator, so the release year is the pseudo-author (a cohort of
  movies of one era; 0 if unknown). The first genre would be biased: genres are listed
  alphabetically, so "Action" would "author" most movies.
- duration_ms: a nominal 60 minutes for every movie (runtimes are not in the data; 60 keeps a
  5-star watch within the validator's one-hour bound on watch time).
- upload_ts: 1 January of the release year (only the year is given), or the item's first rating
  if that is earlier or the year is unknown, so no impression precedes its item's upload.
- hashtags: the genre names as written ("Sci-Fi", "Children's"); the "unknown" genre -> [].
- language "en", region "us".

Users
- region: US ZIP codes -> "us-<first digit>" (the ZIP national area), Canadian postcodes -> "ca",
  anything else -> "unknown". device: the occupation, a categorical stand-in (no devices here).
- language "en"; signup_ts: the user's first rating; consent flags all True (a public research
  dataset, given for recommendation research).
- Age and gender have no clean place in the schema and are not in the logs; `read_users` gives
  the raw profile (user_id, age, gender, occupation, zip_code) for experiments that want them.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
from pathlib import Path

import polars as pl
import pyarrow as pa

from gpurec.data.logs import list_days, write_by_day
from gpurec.data.schema import LOGS
from gpurec.errors import InputNotFound, OutputExists

DURATION_MS = 60 * 60 * 1000
"""Nominal runtime of every movie (60 minutes: a full watch stays within validate.MAX_WATCH_MS)."""
REQUEST_USER_STRIDE = 10**10
"""request_id = user_id * stride + unix_seconds; seconds stay below 10**10 until 2286."""
ACTION_OFFSET_MS = 1
_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
_INSTALL_HINT = "run `make setup`, or `pip install --no-deps recbole==1.2.1` (the `data` extra)"


class DatasetNotFound(InputNotFound, RuntimeError):
    """The MovieLens-100K files are not where they were looked for (RuntimeError: what it was before
    it became an InputNotFound, kept for callers that catch that)."""


def find_movielens_100k() -> Path:
    """The ml-100k folder inside the installed recbole wheel, found without importing recbole.

    Importing recbole would pull in torch and its unmet dependencies (it is installed --no-deps);
    `find_spec` only locates the package.
    """
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFound(
            f"MovieLens-100K comes with the recbole package, which is not installed: {_INSTALL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    _check_folder(folder)
    return folder


def _check_folder(folder: Path) -> None:
    missing = [name for name in _FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetNotFound(f"MovieLens-100K files {missing} not found in {folder}: {_INSTALL_HINT}")


def _read_tsv(path: Path, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """A recbole atomic file (tab-separated, `name:type` header, no quoting) with plain names."""
    frame = pl.read_csv(path, separator="\t", quote_char=None, infer_schema=False)
    frame = frame.rename({c: c.split(":")[0] for c in frame.columns})
    return frame.select([pl.col(name).cast(dtype) for name, dtype in schema.items()])


def read_ratings(folder: Path) -> pl.DataFrame:
    """user_id, item_id, rating (Float64), ts_s (unix seconds) in file order."""
    frame = _read_tsv(
        folder / "ml-100k.inter",
        {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "timestamp": pl.Float64},
    )
    return frame.with_columns(ts_s=pl.col("timestamp").round().cast(pl.Int64)).drop("timestamp")


def read_users(folder: Path | None = None) -> pl.DataFrame:
    """The raw user profile (user_id, age, gender, occupation, zip_code), incl. what the logs drop."""
    folder = find_movielens_100k() if folder is None else Path(folder)
    schema = {"user_id": pl.Int64, "age": pl.Int32, "gender": pl.String, "occupation": pl.String}
    return _read_tsv(folder / "ml-100k.user", {**schema, "zip_code": pl.String})


def _ms(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.Datetime("ms", "UTC"))


def _impressions_actions(ratings: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    events = (
        ratings.with_columns(
            request_id=pl.col("user_id") * REQUEST_USER_STRIDE + pl.col("ts_s"),
            ts_ms=pl.col("ts_s") * 1000,
        )
        .sort("ts_s", "user_id", "item_id")
        .with_columns(position=pl.int_range(pl.len(), dtype=pl.Int32).over("request_id"))
    )
    impressions = events.select(
        "request_id",
        ts=_ms(pl.col("ts_ms")),
        user_id="user_id",
        item_id="item_id",
        position="position",
        surface=pl.lit("movielens"),
        model_version=pl.lit("ml-100k"),
    )
    rating = pl.col("rating")
    actions = events.select(
        "request_id",
        "item_id",
        ts=_ms(pl.col("ts_ms") + ACTION_OFFSET_MS),
        watch_ms=(rating * DURATION_MS / 5).round().cast(pl.Int32),
        like=rating >= 4,
        share=pl.lit(False),
        comment=pl.lit(False),
        follow=pl.lit(False),
        skip=rating <= 2,
    )
    return impressions, actions


def _items(folder: Path, ratings: pl.DataFrame) -> pl.DataFrame:
    raw = _read_tsv(
        folder / "ml-100k.item", {"item_id": pl.Int64, "release_year": pl.String, "class": pl.String}
    )
    first_ms = ratings.group_by("item_id").agg(first_ms=pl.col("ts_s").min() * 1000)
    year = pl.col("release_year").cast(pl.Int32, strict=False)
    year_start_ms = pl.date(year, 1, 1).cast(pl.Datetime("ms")).cast(pl.Int64)
    return (
        raw.join(first_ms, on="item_id", how="left")
        .sort("item_id")
        .select(
            "item_id",
            author_id=year.fill_null(0).cast(pl.Int64),
            duration_ms=pl.lit(DURATION_MS, dtype=pl.Int32),
            upload_ts=_ms(pl.min_horizontal(year_start_ms, pl.col("first_ms"))),
            hashtags=pl.col("class").str.split(" ").list.filter(pl.element() != "unknown"),
            language=pl.lit("en"),
            region=pl.lit("us"),
        )
    )


def _users(folder: Path, ratings: pl.DataFrame) -> pl.DataFrame:
    first_ms = ratings.group_by("user_id").agg(first_ms=pl.col("ts_s").min() * 1000)
    zip_code = pl.col("zip_code").str.to_uppercase()
    region = (
        pl.when(zip_code.str.contains(r"^\d{5}$"))
        .then(pl.lit("us-") + zip_code.str.slice(0, 1))
        .when(zip_code.str.contains(r"^[A-Z]\d[A-Z]"))
        .then(pl.lit("ca"))
        .otherwise(pl.lit("unknown"))
    )
    return (
        read_users(folder)
        .join(first_ms, on="user_id", how="left")
        .sort("user_id")
        .select(
            "user_id",
            region=region,
            device=pl.col("occupation"),
            language=pl.lit("en"),
            signup_ts=_ms(pl.col("first_ms")),
            consent_personalisation=pl.lit(True),
            consent_training=pl.lit(True),
        )
    )


def _to_arrow(frame: pl.DataFrame, log: str) -> pa.Table:
    """Cast to the log's exact schema; a null in a non-nullable field fails here, not downstream."""
    schema = LOGS[log].schema
    table = frame.to_arrow().cast(schema)
    table.validate(full=True)
    if nulls := [f.name for f in schema if not f.nullable and table[f.name].null_count]:
        raise ValueError(f"{log} columns {nulls} have nulls after conversion")
    return table


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat()


def convert_movielens_100k(out_dir: str | Path, *, source_dir: str | Path | None = None) -> dict:
    """Write MovieLens-100K as impressions/actions/items/users logs under `out_dir`.

    No oracle log: there is no ground truth for real data. Refuses an `out_dir` that already holds
    any of these logs, because `write_by_day` appends parts and a rerun would duplicate every row.
    Returns a JSON-ready summary for the CLI.
    """
    folder = find_movielens_100k() if source_dir is None else Path(source_dir)
    _check_folder(folder)
    out = Path(out_dir)
    logs = ("impressions", "actions", "items", "users")
    existing = [log for log in logs if list_days(out, log)]
    if existing:
        raise OutputExists(f"{out} already holds logs {existing}; choose an empty directory")

    ratings = read_ratings(folder)
    impressions, actions = _impressions_actions(ratings)
    frames = {"impressions": impressions, "actions": actions}
    frames.update(items=_items(folder, ratings), users=_users(folder, ratings))
    tables = {log: _to_arrow(frames[log], log) for log in logs}  # all validated before any write
    for log in logs:
        write_by_day(tables[log], out, log)

    ts_ms = impressions["ts"].dt.epoch("ms")
    finished = actions["watch_ms"] >= 0.9 * DURATION_MS  # rates from the written labels
    return {
        "dataset": "movielens-100k",
        "source": str(folder),
        "out": str(out),
        "ratings": ratings.height,
        "impressions": impressions.height,
        "actions": actions.height,
        "requests": impressions["request_id"].n_unique(),
        "users": frames["users"].height,
        "items": frames["items"].height,
        "days": len(list_days(out, "impressions")),
        "like_rate": round(actions["like"].mean(), 4),
        "finish_rate": round(finished.mean(), 4),
        "skip_rate": round(actions["skip"].mean(), 4),
        "mean_rating": round(ratings["rating"].mean(), 4),
        "first_ts": _iso(ts_ms.min()),
        "last_ts": _iso(ts_ms.max()),
    }


__all__ = ["DatasetNotFound", "convert_movielens_100k", "find_movielens_100k", "read_ratings", "read_users"]
