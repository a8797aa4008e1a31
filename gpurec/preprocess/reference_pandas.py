"""An independent pandas implementation of the same features, all days at once, in one frame.

Two jobs: the oracle the tests compare the streaming Polars pipeline against (different mechanism:
merge_asof over all days instead of per-day sorted streams with carried state), and the baseline
of `bench/preprocess.py` (what a competent pandas user would write: vectorised merge, merge_asof,
groupby-cumsum, no loops over rows). It needs every event in memory, which is exactly what the
real pipeline avoids.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gpurec.data import logs
from gpurec.data.hashing import hash_ids_np, hash_string
from gpurec.data.schema import MS_PER_DAY, day_start_ms
from gpurec.data.validate import validate
from gpurec.preprocess.features import (
    DENSE_FEATURES,
    FINISH_DENOMINATOR,
    FINISH_NUMERATOR,
    LABELS,
    META_COLUMNS,
    PRIOR_FINISH_RATE,
    PRIOR_LIKE_RATE,
    PRIOR_WEIGHT,
    SPARSE_FEATURES,
)


@dataclass(frozen=True)
class ReferenceResult:
    features: pd.DataFrame  # every output row, all days, sorted by (ts, request_id, item_id)
    excluded_no_consent: int
    excluded_unknown_item: int


def _read_valid(root: Path, log: str, now_ms: int, by_day: bool = True) -> pd.DataFrame:
    """All valid rows of a log, with `_day` (partition; by_day only) and `_order` (log order).

    Dimension logs (many tiny signup/upload days) are read and validated in one go.
    """
    days = logs.list_days(root, log)
    groups = [[day] for day in days] if by_day else [days]
    frames = []
    for group in groups:
        files = logs.day_files(root, log, group)
        table = pa.concat_tables(pq.read_table(f) for f in files) if files else logs.read(root, log)
        valid = validate(table, log, now_ms=now_ms).valid.to_pandas()
        frames.append(valid.assign(_day=group[0]) if by_day else valid)
    frame = pd.concat(frames, ignore_index=True) if frames else logs.read(root, log).to_pandas()
    return frame.assign(_order=np.arange(len(frame)))


def _ms(series: pd.Series) -> np.ndarray:
    return series.astype("datetime64[ms, UTC]").astype("int64").to_numpy()


def _string_ids(values: pd.Series, feature: str) -> pd.Series:
    mapping = {v: hash_string(v, feature) for v in values.dropna().unique()}
    return values.map(mapping).astype("int64")


def _dimensions(root: Path, now_ms: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    users = _read_valid(root, "users", now_ms, by_day=False).drop_duplicates("user_id", keep="last")
    users = users[users["consent_training"]]
    users = users.assign(
        sparse_user_id=hash_ids_np(users["user_id"].to_numpy(), "user_id"),
        sparse_user_region=_string_ids(users["region"], "user_region"),
        sparse_device=_string_ids(users["device"], "device"),
        sparse_user_language=_string_ids(users["language"], "user_language"),
    )[["user_id", "sparse_user_id", "sparse_user_region", "sparse_device", "sparse_user_language"]]
    items = _read_valid(root, "items", now_ms, by_day=False).drop_duplicates("item_id", keep="last")
    tags = items[["item_id", "hashtags"]].explode("hashtags").dropna()
    tags["tag_id"] = _string_ids(tags["hashtags"], "hashtags")
    tag_lists = tags.groupby("item_id", sort=False)["tag_id"].agg(list)
    items = items.assign(
        sparse_item_id=hash_ids_np(items["item_id"].to_numpy(), "item_id"),
        sparse_author_id=hash_ids_np(items["author_id"].to_numpy(), "author_id"),
        sparse_item_language=_string_ids(items["language"], "item_language"),
        sparse_hashtags=items["item_id"].map(tag_lists),
        upload_ms=_ms(items["upload_ts"]),
    )
    items["sparse_hashtags"] = [v if isinstance(v, list) else [] for v in items["sparse_hashtags"]]
    columns = ["item_id", "duration_ms", "upload_ms", "sparse_item_id", "sparse_author_id", "sparse_item_language", "sparse_hashtags"]
    return users, items[columns]


def _placed_impressions(root: Path, now_ms: int) -> pd.DataFrame:
    """Valid impressions whose ts lies in their partition day or the next partition day."""
    imps = _read_valid(root, "impressions", now_ms)
    days = sorted(imps["_day"].unique())
    following = dict(zip(days, [*days[1:], None], strict=True))
    imps["ts_ms"] = _ms(imps["ts"])
    ts_day = imps["ts_ms"] // MS_PER_DAY
    part_day = imps["_day"].map({d: day_start_ms(d) // MS_PER_DAY for d in days})
    next_day = imps["_day"].map({d: day_start_ms(n) // MS_PER_DAY if n else -1 for d, n in following.items()})
    return imps[(ts_day == part_day) | (ts_day == next_day)]


def _labelled(imps: pd.DataFrame, actions: pd.DataFrame) -> pd.DataFrame:
    """Left-join actions from the impression's day and the next; several matches: last in log order."""
    imps = imps.assign(_imp=np.arange(len(imps)), ts_day=imps["ts_ms"] // MS_PER_DAY)
    day_number = {d: day_start_ms(d) // MS_PER_DAY for d in actions["_day"].unique()}
    acts = actions.assign(action_ms=_ms(actions["ts"]), act_day=actions["_day"].map(day_number))[["request_id", "item_id", "action_ms", "watch_ms", "like", "act_day", "_order"]]
    matched = imps[["_imp", "request_id", "item_id", "ts_day"]].merge(acts, on=["request_id", "item_id"])
    matched = matched[(matched["act_day"] - matched["ts_day"]).isin([0, 1])]
    matched = matched.sort_values("_order").drop_duplicates("_imp", keep="last").set_index("_imp")
    out = imps.join(matched[["action_ms", "watch_ms", "like"]], on="_imp")
    has_action = out["watch_ms"].notna()
    watch = out["watch_ms"].fillna(0).astype("int64")
    out["like"] = out["like"].astype("boolean").fillna(False).astype("float32")
    finish = has_action & (watch * FINISH_DENOMINATOR >= out["duration_ms"].astype("int64") * FINISH_NUMERATOR)
    out["finish"] = finish.astype("float32")
    return out


def _prior_counts(imps: pd.DataFrame, key: str, prefix: str) -> pd.DataFrame:
    """Per impression: the key's impressions, likes, finishes strictly before its ts (merge_asof)."""
    event_ms = np.maximum(imps["action_ms"].fillna(-1).astype("int64"), imps["ts_ms"])
    events = pd.concat(
        [
            pd.DataFrame({key: imps[key], "t": imps["ts_ms"], "n": 1, "likes": 0, "finishes": 0}),
            pd.DataFrame({key: imps[key], "t": event_ms, "n": 0, "likes": imps["like"].astype("int64"), "finishes": imps["finish"].astype("int64")})[
                (imps["like"] > 0) | (imps["finish"] > 0)
            ],
        ]
    )
    per_time = events.groupby([key, "t"], sort=True)[["n", "likes", "finishes"]].sum()
    cumulative = per_time.groupby(level=0).cumsum().reset_index().sort_values("t")
    queries = imps[["_imp", key, "ts_ms"]].sort_values("ts_ms")
    joined = pd.merge_asof(queries, cumulative, left_on="ts_ms", right_on="t", by=key, allow_exact_matches=False)
    counts = joined.set_index("_imp")[["n", "likes", "finishes"]].fillna(0).astype("int64")
    return counts.rename(columns=lambda c: f"{prefix}_{c}")


def reference_features(root: str | Path, now_ms: int) -> ReferenceResult:
    """All output rows of every day, computed in one pass over all logs held in memory."""
    root = Path(root)
    users, items = _dimensions(root, now_ms)
    imps = _placed_impressions(root, now_ms)
    consenting = imps["user_id"].isin(users["user_id"])
    known = imps.merge(users, on="user_id").merge(items, on="item_id")
    labelled = _labelled(known, _read_valid(root, "actions", now_ms))
    labelled = labelled.join(_prior_counts(labelled, "user_id", "user"), on="_imp")
    labelled = labelled.join(_prior_counts(labelled, "item_id", "item"), on="_imp")
    out = labelled[list(META_COLUMNS)].copy()
    for label in LABELS:
        out[label] = labelled[label].astype("float32")
    dense = {
        "user_impressions": np.log1p(labelled["user_n"]),
        "user_like_rate": (labelled["user_likes"] + PRIOR_WEIGHT * PRIOR_LIKE_RATE) / (labelled["user_n"] + PRIOR_WEIGHT),
        "user_finish_rate": (labelled["user_finishes"] + PRIOR_WEIGHT * PRIOR_FINISH_RATE) / (labelled["user_n"] + PRIOR_WEIGHT),
        "item_impressions": np.log1p(labelled["item_n"]),
        "item_like_rate": (labelled["item_likes"] + PRIOR_WEIGHT * PRIOR_LIKE_RATE) / (labelled["item_n"] + PRIOR_WEIGHT),
        "item_finish_rate": (labelled["item_finishes"] + PRIOR_WEIGHT * PRIOR_FINISH_RATE) / (labelled["item_n"] + PRIOR_WEIGHT),
        "item_age_hours": np.log1p(np.clip((labelled["ts_ms"] - labelled["upload_ms"]) / 3_600_000, 0, None)),
        "duration_s": np.log1p(labelled["duration_ms"] / 1000.0),
    }
    for f in DENSE_FEATURES:
        out[f.column] = dense[f.name].astype("float32")
    hour = (labelled["ts_ms"] // 3_600_000) % 24
    sparse = {f.column: labelled.get(f.column) for f in SPARSE_FEATURES}
    sparse["sparse_hour"] = pd.Series(hash_ids_np(hour.to_numpy(), "hour"), index=labelled.index)
    for f in SPARSE_FEATURES:
        out[f.column] = sparse[f.column]
    out = out.sort_values(["ts", "request_id", "item_id"], kind="stable").reset_index(drop=True)
    return ReferenceResult(
        features=out,
        excluded_no_consent=int((~consenting).sum()),
        excluded_unknown_item=int(consenting.sum() - len(known)),
    )


__all__ = ["ReferenceResult", "reference_features"]
