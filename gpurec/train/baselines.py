"""Reference predictors the ranker must beat (popularity, logistic regression) and the ceiling it
cannot beat (the simulator's oracle), scored on the same evaluation rows in the same order.

A DLRM number means little alone: an AUC of 0.70 is good when popularity gets 0.55 and the true
probabilities get 0.72, and poor when popularity already gets 0.69. Each function here returns
`{task: predictions}` aligned row for row with the evaluation frame (`read_split`), so
`gpurec.train.evaluate` scores every predictor with the same metric code.

- popularity: per raw `item_id`, the task's label mean on the train split, smoothed toward the
  global train rate: (positives + w * global) / (impressions + w), w = `prior_weight` (10). Items
  never seen in train get the global rate.
- logistic regression: see `logreg_scores`.
- oracle: the simulator's p_like / p_finish for each (request_id, item_id); synthetic data only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from sklearn.linear_model import SGDClassifier

from gpurec.preprocess.manifest import Manifest

ORACLE_COLUMNS: dict[str, str] = {"like": "p_like", "finish": "p_finish"}
"""Which oracle column is the true probability of which task."""

HASH_WIDTH = 2**18
LOGREG_ALPHA = 1e-4
LOGREG_EPOCHS = 10
LOGREG_MAX_ROWS = 1_000_000


def scan_split(manifest: Manifest, data_dir: str | Path, split: str) -> pl.LazyFrame:
    """A split's rows in file (day) order, lazily; raises ValueError for an absent or empty split."""
    if split not in manifest.splits:
        raise ValueError(f"{data_dir}: no split {split!r} in the manifest (have {sorted(manifest.splits)})")
    files = manifest.split_files(split, data_dir)
    if not files or manifest.splits[split].rows == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no rows; preprocess more days or change the split fractions")
    return pl.scan_parquet([str(f) for f in files])


def read_split(manifest: Manifest, data_dir: str | Path, split: str) -> pl.DataFrame:
    """Every row of a split in file order: the order `ParquetBatches(shuffle=False)` yields them."""
    return scan_split(manifest, data_dir, split).collect()


def popularity_scores(
    train: pl.LazyFrame, rows: pl.DataFrame, tasks: list[str], prior_weight: float = 10.0
) -> dict[str, np.ndarray]:
    """Each row's item's smoothed train label rate per task (unknown items: the global train rate).

    `train` needs `item_id` and the task columns; `rows` needs `item_id`. The smoothing keeps an
    item seen once with a like from scoring 1.0 above items with thousands of impressions.
    """
    counts = train.group_by("item_id").agg(pl.len().alias("_n"), *[pl.col(t).sum().alias(f"_pos_{t}") for t in tasks])
    totals = counts.select(pl.col("_n").sum(), *[pl.col(f"_pos_{t}").sum() for t in tasks]).collect()
    impressions = totals["_n"].item()
    if not impressions:
        raise ValueError("popularity baseline: the train split has no rows")
    rates = {t: totals[f"_pos_{t}"].item() / impressions for t in tasks}
    item_rates = counts.select(
        "item_id",
        *[((pl.col(f"_pos_{t}") + prior_weight * rates[t]) / (pl.col("_n") + prior_weight)).alias(t) for t in tasks],
    )
    scored = (
        rows.lazy()
        .select("item_id")
        .with_row_index("_row")
        .join(item_rates, on="item_id", how="left")
        .sort("_row")
        .select(*[pl.col(t).fill_null(rates[t]) for t in tasks])
        .collect()
    )
    return {t: scored[t].to_numpy().astype(np.float64) for t in tasks}


class HashedDesign:
    """Rows -> a sparse design matrix for a linear model: the dense features standardised with the
    train split's mean and standard deviation, then a one-hot of every sparse id hashed into
    `width` shared columns (column = id mod width; the ids are already salted per feature, so each
    feature's values land on independent columns up to collisions; a multi-valued feature sets
    one column per value).
    """

    def __init__(self, manifest: Manifest, width: int = HASH_WIDTH) -> None:
        self.dense = [f.column for f in manifest.dense_features]
        self.sparse = [f.column for f in manifest.sparse_features]
        self.width = width
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, train: pl.DataFrame) -> HashedDesign:
        values = train.select(self.dense).to_numpy().astype(np.float64)
        self.mean, std = values.mean(axis=0), values.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        return self

    def transform(self, rows: pl.DataFrame) -> sp.csr_matrix:
        if self.mean is None or self.std is None:
            raise RuntimeError("HashedDesign.fit must run before transform")
        n = rows.height
        dense = (rows.select(self.dense).to_numpy().astype(np.float64) - self.mean) / self.std
        row_ids, col_ids = [], []
        for column in self.sparse:
            values = rows[column]
            if values.dtype == pl.List:
                row_ids.append(np.repeat(np.arange(n), values.list.len().to_numpy()))
                values = values.explode().drop_nulls()
            else:
                row_ids.append(np.arange(n))
            col_ids.append(values.to_numpy().astype(np.int64) % self.width)
        r, c = np.concatenate(row_ids), np.concatenate(col_ids)
        one_hot = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, self.width))
        one_hot.sum_duplicates()
        one_hot.data[:] = 1.0  # two values of a row colliding in one column still make a 0/1 feature
        return sp.hstack([sp.csr_matrix(dense), one_hot], format="csr")


def sample_train(manifest: Manifest, data_dir: str | Path, max_rows: int, seed: int = 0) -> pl.DataFrame:
    """The train split, or a uniform sample of `max_rows` of it (seeded) when it is larger."""
    train = scan_split(manifest, data_dir, "train")
    total = manifest.splits["train"].rows
    if total <= max_rows:
        return train.collect()
    keep = np.random.default_rng(seed).choice(total, size=max_rows, replace=False)
    index = pl.Series("keep", np.sort(keep), dtype=pl.UInt32)
    return train.with_row_index("_row").filter(pl.col("_row").is_in(index)).drop("_row").collect()


def logreg_scores(
    train: pl.DataFrame,
    rows: pl.DataFrame,
    manifest: Manifest,
    tasks: list[str],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Logistic regression on the model's own inputs, one model per task.

    Setup: `HashedDesign` (the dense features standardised with train statistics + every sparse
    id one-hot in 2**18 hashed columns), fit with `SGDClassifier(loss="log_loss", alpha=1e-4,
    max_iter=10, tol=None, average=True, random_state=seed)`: 10 passes of L2-regularised SGD
    with averaged weights. `evaluate` trains it on the whole train split, or on a seeded uniform
    sample of `LOGREG_MAX_ROWS` (1M) rows when the split is larger (`sample_train`).

    Why this setup: on the demo world's 407k train rows it fits in about 2 s per task on 2 CPU
    cores and ranks within 0.002 AUC of `LogisticRegression(solver="liblinear", C=0.01)`, which
    takes 8-18 s per task. Weaker L2 (alpha 1e-6, C=1) overfits the hashed id columns (like
    AUC 0.56-0.63 instead of 0.67); without averaging SGD is badly calibrated.
    """
    design = HashedDesign(manifest).fit(train)
    x_train, x_rows = design.transform(train), design.transform(rows)
    scores = {}
    for task in tasks:
        labels = train[task].to_numpy()
        if np.unique(labels).size < 2:
            raise ValueError(f"logistic regression baseline: task {task!r} has a single class in the train split")
        model = SGDClassifier(
            loss="log_loss", alpha=LOGREG_ALPHA, max_iter=LOGREG_EPOCHS, tol=None, average=True, random_state=seed
        )
        model.fit(x_train, labels)
        scores[task] = model.predict_proba(x_rows)[:, 1]
    return scores


def oracle_scores(rows: pl.DataFrame, oracle: pl.LazyFrame, tasks: list[str]) -> dict[str, np.ndarray]:
    """The oracle's true probability for each row (joined on request_id, item_id), per task it has.

    Every impression has an oracle row, so a missing or duplicated one means the features and the
    logs do not belong together; that is an error, not a smaller evaluation set.
    """
    wanted = [t for t in tasks if t in ORACLE_COLUMNS]
    joined = (
        rows.lazy()
        .select("request_id", "item_id")
        .with_row_index("_row")
        .join(oracle.select("request_id", "item_id", *[ORACLE_COLUMNS[t] for t in wanted]), on=["request_id", "item_id"], how="left")
        .sort("_row")
        .collect()
    )
    if joined.height != rows.height:
        raise ValueError(f"oracle log has duplicate (request_id, item_id) keys: {joined.height} joined rows for {rows.height}")
    missing = joined[ORACLE_COLUMNS[wanted[0]]].null_count() if wanted else 0
    if missing:
        raise ValueError(f"{missing} of {rows.height} evaluation rows have no oracle row: are the features from these logs?")
    return {t: joined[ORACLE_COLUMNS[t]].to_numpy().astype(np.float64) for t in wanted}
