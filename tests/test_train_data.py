"""The Parquet -> TorchRec batch loader: layout, determinism, rank slicing, resume."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gpurec.preprocess.manifest import load_manifest
from gpurec.train.data import FeatureColumns, LoaderConfig, ParquetBatches


def _loader(features, rank=0, world_size=1, **config):
    manifest = load_manifest(features)
    return ParquetBatches(manifest.split_files("train", features), manifest, LoaderConfig(**config), rank, world_size)


def test_batch_matches_the_parquet_rows(small_features):
    manifest = load_manifest(small_features)
    table = pq.read_table(manifest.split_files("train", small_features)[0]).slice(0, 64)
    columns = FeatureColumns(manifest)
    batch = columns.to_batch(table)
    assert batch.dense_features.shape == (64, len(manifest.dense_features))
    assert torch.equal(batch.dense_features[:, 0], torch.tensor(table[columns.dense[0]].to_numpy()))
    assert batch.labels.shape == (64, len(manifest.label_names))
    kjt = batch.sparse_features.to_dict()
    assert list(kjt) == [f.name for f in manifest.sparse_features]
    user = manifest.sparse_features[0]
    assert kjt[user.name].values().tolist() == table[user.column].to_pylist()
    multi = next(f for f in manifest.sparse_features if f.multi_valued)
    lists = table[multi.column].to_pylist()
    assert kjt[multi.name].lengths().tolist() == [len(v) for v in lists]
    assert kjt[multi.name].values().tolist() == [x for v in lists for x in v]


def _label_rows(loader) -> list[np.ndarray]:
    return [torch.cat([b.dense_features, b.labels], dim=1).numpy() for b in loader]


def test_order_is_a_function_of_seed_and_epoch(small_features):
    a = _label_rows(_loader(small_features, batch_size=256, seed=1))
    b = _label_rows(_loader(small_features, batch_size=256, seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    other = _loader(small_features, batch_size=256, seed=1)
    other.set_epoch(1)
    assert not np.array_equal(a[0], _label_rows(other)[0])


def test_two_ranks_split_each_global_batch(small_features):
    whole = _label_rows(_loader(small_features, batch_size=256, seed=3))
    rank0 = _label_rows(_loader(small_features, 0, 2, batch_size=128, seed=3))
    rank1 = _label_rows(_loader(small_features, 1, 2, batch_size=128, seed=3))
    assert len(whole) == len(rank0) == len(rank1) > 10
    for w, r0, r1 in zip(whole, rank0, rank1, strict=True):
        assert np.array_equal(w, np.concatenate([r0, r1]))


def test_resume_skips_exactly_the_consumed_batches(small_features):
    whole = _label_rows(_loader(small_features, batch_size=256, seed=4))
    resumed = _loader(small_features, batch_size=256, seed=4)
    resumed.set_epoch(0, start_batch=5)
    assert all(np.array_equal(x, y) for x, y in zip(whole[5:], _label_rows(resumed), strict=True))


def test_every_row_once_per_epoch_without_drop_last(small_features):
    loader = _loader(small_features, batch_size=1000, shuffle=False, drop_last=False)
    assert sum(b.labels.shape[0] for b in loader) == loader.rows
    assert loader.wait_seconds >= 0.0


def test_reader_errors_reach_the_trainer(small_features, tmp_path):
    """A file the background thread cannot read raises in the training loop, not silently."""
    manifest = load_manifest(small_features)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), wrong)
    loader = ParquetBatches([wrong], manifest, LoaderConfig(batch_size=2))
    with pytest.raises(Exception, match="dense_"):
        list(loader)
