"""Streaming the preprocessed Parquet shards into TorchRec batches.

A batch is TorchRec's own `Batch` (`TimedBatch`): dense features [B, D], a `KeyedJaggedTensor` of
hashed sparse ids (one key per sparse feature, in manifest order), labels [B, T] (manifest label
order) and each example's event time [B].

Order is a pure function of (seed, epoch): days in event-time order (or shuffled, with
`shuffle_days`), rows shuffled within each day file (a file is one day, the unit of memory).
Time order is the default because collisionless tables expire ids by event time, as a streaming
trainer would. Every rank walks the same global order and keeps its slice of each global
batch, so N ranks with local batch B see exactly the batches one process with batch N*B sees, and a resumed run that skips `start_batch` global batches continues exactly.

A background thread reads and converts ahead (`prefetch` batches), so the trainer waits on I/O
only when reading is slower than training; `wait_seconds` says how long it waited.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.preprocess.manifest import Manifest

EVENT_TIME_COLUMN = "ts"  # the impression's event time, a manifest meta column


@dataclass
class TimedBatch(Batch):
    """TorchRec's Batch plus each example's event time (ms since the epoch, int64 [B]): what
    collisionless tables count ids and expire them by."""

    event_time_ms: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def to(self, device: torch.device, non_blocking: bool = False) -> TimedBatch:
        moved = super().to(device, non_blocking=non_blocking)
        return TimedBatch(moved.dense_features, moved.sparse_features, moved.labels, self.event_time_ms.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        self.event_time_ms.record_stream(stream)

    def pin_memory(self) -> TimedBatch:
        pinned = super().pin_memory()
        return TimedBatch(pinned.dense_features, pinned.sparse_features, pinned.labels, self.event_time_ms.pin_memory())


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 2048  # per rank
    shuffle: bool = True  # rows within each day file
    shuffle_days: bool = False  # False: days in event-time order, as a streaming trainer sees them
    seed: int = 0
    drop_last: bool = True  # keep every step's global batch full (ranks stay in lock-step)
    prefetch: int = 4


class FeatureColumns:
    """Which Parquet columns feed which part of a Batch, from the manifest."""

    def __init__(self, manifest: Manifest) -> None:
        self.dense = [f.column for f in manifest.dense_features]
        self.sparse = [f.column for f in manifest.sparse_features]
        self.keys = [f.name for f in manifest.sparse_features]
        self.labels = list(manifest.label_names)
        self.time = EVENT_TIME_COLUMN

    @property
    def all(self) -> list[str]:
        return [*self.dense, *self.sparse, *self.labels, self.time]

    def to_batch(self, table: pa.Table) -> TimedBatch:
        """Convert a slice of rows (an Arrow table with at least `all` columns) into a Batch."""
        dense = np.stack([table[c].to_numpy() for c in self.dense], axis=1).astype(np.float32, copy=False)
        labels = np.stack([table[c].to_numpy() for c in self.labels], axis=1).astype(np.float32, copy=False)
        values, lengths = [], []
        for column in self.sparse:
            col = table[column].combine_chunks()
            if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                offsets = col.offsets.to_numpy()
                values.append(col.values.to_numpy()[offsets[0] : offsets[-1]])
                lengths.append(np.diff(offsets))
            else:
                values.append(col.to_numpy())
                lengths.append(np.ones(len(col), dtype=np.int64))
        sparse = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys,
            values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
            lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
        )
        event_time = np.array(table[self.time].cast(pa.int64()).to_numpy())  # writable copy
        return TimedBatch(torch.from_numpy(dense), sparse, torch.from_numpy(labels), torch.from_numpy(event_time))


class ParquetBatches:
    """An iterable over one rank's batches of one epoch; iterate again for the next epoch."""

    def __init__(
        self,
        files: list[Path],
        manifest: Manifest,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not files:
            raise ValueError("no feature files to read: is the split empty in the manifest?")
        self.files = [Path(f) for f in files]
        self.columns = FeatureColumns(manifest)
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0  # global batches to skip (resume)
        self.wait_seconds = 0.0
        self.rows = sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.world_size

    def __len__(self) -> int:
        full, rest = divmod(self.rows, self.global_batch)
        return full if self.config.drop_last or rest == 0 else full + 1

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _global_tables(self) -> Iterator[pa.Table]:
        """Global batches (all ranks' rows) in the deterministic order of this epoch."""
        rng = np.random.default_rng([self.config.seed, self.epoch])
        shuffle_days = self.config.shuffle and self.config.shuffle_days
        order = rng.permutation(len(self.files)) if shuffle_days else np.arange(len(self.files))
        carry: pa.Table | None = None
        index = 0
        for file_index in order:
            table = pq.read_table(self.files[file_index], columns=self.columns.all)
            if self.config.shuffle:
                table = table.take(np.random.default_rng([self.config.seed, self.epoch, int(file_index)]).permutation(table.num_rows))
            if carry is not None and carry.num_rows:
                table = pa.concat_tables([carry, table])
            start = 0
            while table.num_rows - start >= self.global_batch:
                if index >= self.start_batch:
                    yield table.slice(start, self.global_batch)
                index += 1
                start += self.global_batch
            carry = table.slice(start)
        if carry is not None and carry.num_rows and not self.config.drop_last and index >= self.start_batch:
            yield carry

    def _rank_batches(self) -> Iterator[Batch]:
        for table in self._global_tables():
            local = -(-table.num_rows // self.world_size)  # the last partial batch splits evenly
            yield self.columns.to_batch(table.slice(self.rank * local, local))

    def __iter__(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch))
        stop = threading.Event()
        done = object()

        def produce() -> None:
            try:
                for batch in self._rank_batches():
                    while not stop.is_set():
                        try:
                            ready.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(done)
            except BaseException as err:  # surface reader errors in the training thread
                ready.put(err)

        thread = threading.Thread(target=produce, name="gpurec-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                waited = time.perf_counter()
                item = ready.get()
                self.wait_seconds += time.perf_counter() - waited
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)
