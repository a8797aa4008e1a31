"""Labelled examples from the event log as training batches, in event-time order, from exact offsets.

The online trainer reads the `examples` topic (the joiner's output: one `Example` per served row,
holding the model inputs exactly as served) through `ExampleFeed`:

- Order. Partitions are merged by (event time, partition, offset), each one consumed as a prefix,
  so a batch mixes users from every partition the way time passed, and the position of the
  trainer is just one next offset per partition: what a checkpoint stores.
- Determinism. Before a batch is chosen every partition's buffer holds the next `size` records (or
  all there are), and the merge takes at most `size`, so the batch is a pure function of the
  positions and the log's content. A trainer restarted from a checkpoint's positions therefore
  builds the same batches an uninterrupted one would (when the records are already there), and
  other ranks rebuild rank 0's batch from the positions alone (`take_until`).
- Conversion. `to_batch` turns examples into gpurec's `TimedBatch` (dense [B, D], a
  `KeyedJaggedTensor` of the served ids by feature, labels by the run's label names, event time),
  the same batch type batch training reads from Parquet. An example whose inputs do not fit the
  model (another dense width, a missing feature: a contract change) is refused with a reason,
  never trained on.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import TrainedRun
from gpurec.stream.log import EventLog, StoredRecord
from gpurec.stream.records import Example, decoder
from gpurec.train.data import TimedBatch

EXAMPLES_TOPIC = "examples"
_decode_example = decoder(Example)


class Taken(NamedTuple):
    """One record taken into a batch: where it was and what it held (None: undecodable)."""

    partition: int
    offset: int
    example: Example | None
    raw: bytes
    error: str


class ExampleFeed:
    """The `examples` topic read from per-partition positions, merged in event-time order."""

    def __init__(self, log: EventLog, positions: dict[int, int], topic: str = EXAMPLES_TOPIC) -> None:
        self.log, self.topic = log, topic
        self.positions = dict(positions)  # partition -> next offset not yet taken into a batch
        self._buffers: dict[int, deque[StoredRecord]] = {p: deque() for p in self.positions}
        self._read_to = dict(self.positions)  # partition -> next offset to read into the buffer

    @classmethod
    def from_start(cls, log: EventLog, topic: str = EXAMPLES_TOPIC) -> ExampleFeed:
        return cls(log, log.start_offsets(topic), topic)

    def available(self, size: int) -> int:
        """Records buffered (after topping every buffer up to `size`): what a batch could take now."""
        self._fill(size)
        return sum(len(b) for b in self._buffers.values())

    def lag(self) -> int:
        """Records in the log not yet taken into a batch."""
        ends = self.log.end_offsets(self.topic)
        return sum(max(0, ends[p] - self.positions[p]) for p in self.positions)

    def plan(self, size: int) -> dict[int, int]:
        """The positions after the next batch of at most `size` records (rank 0 decides them)."""
        self._fill(size)
        positions = dict(self.positions)
        for record in self._merge(size):
            positions[record.partition] = record.offset + 1
        return positions

    def take_until(self, positions: dict[int, int]) -> list[Taken]:
        """The records up to `positions`, in merged order, decoded; advances the feed past them."""
        for partition, end in positions.items():
            while self._read_to[partition] < end:  # another rank's plan may be ahead of our buffers
                if not self._read(partition, end - self._read_to[partition]):
                    raise InvalidInput(f"{self.topic} partition {partition} ends before offset {end}")
        taken: list[Taken] = []
        heads = [(b[0].timestamp_ms, p, b[0].offset) for p, b in self._buffers.items() if b and b[0].offset < positions[p]]
        heapq.heapify(heads)
        while heads:
            _, partition, _ = heapq.heappop(heads)
            buffer = self._buffers[partition]
            record = buffer.popleft()
            taken.append(_decoded(record))
            if buffer and buffer[0].offset < positions[partition]:
                heapq.heappush(heads, (buffer[0].timestamp_ms, partition, buffer[0].offset))
        self.positions.update(positions)
        return taken

    def _merge(self, size: int) -> list[StoredRecord]:
        """The first `size` records of the k-way merge by (event time, partition, offset)."""
        cursor = {p: 0 for p in self._buffers}
        heads = [(b[0].timestamp_ms, p, b[0].offset) for p, b in self._buffers.items() if b]
        heapq.heapify(heads)
        chosen: list[StoredRecord] = []
        while heads and len(chosen) < size:
            _, partition, _ = heapq.heappop(heads)
            buffer, index = self._buffers[partition], cursor[partition]
            chosen.append(buffer[index])
            cursor[partition] = index + 1
            if index + 1 < len(buffer):
                nxt = buffer[index + 1]
                heapq.heappush(heads, (nxt.timestamp_ms, partition, nxt.offset))
        return chosen

    def _fill(self, size: int) -> None:
        for partition, buffer in self._buffers.items():
            if len(buffer) < size:
                self._read(partition, size - len(buffer))

    def _read(self, partition: int, count: int) -> bool:
        records = self.log.read(self.topic, partition, self._read_to[partition], count)
        if records:
            self._buffers[partition].extend(records)
            self._read_to[partition] = records[-1].offset + 1
        return bool(records)


def _decoded(record: StoredRecord) -> Taken:
    try:
        return Taken(record.partition, record.offset, _decode_example(record.value), bytes(record.value), "")
    except InvalidInput as error:
        return Taken(record.partition, record.offset, None, bytes(record.value), str(error))


def to_batch(examples: Sequence[Example], run: TrainedRun) -> TimedBatch:
    """A training batch of examples for the model `run` describes (InvalidInput if one does not fit)."""
    if not examples:
        raise InvalidInput("an empty batch of examples")
    inputs = [example.served.model_inputs() for example in examples]
    dense = np.asarray([i.dense for i in inputs], dtype=np.float32)
    if dense.ndim != 2 or dense.shape[1] != run.num_dense:
        widths = sorted({len(i.dense) for i in inputs})
        raise InvalidInput(f"examples carry {widths} dense values, the model reads {run.num_dense}")
    values: list[int] = []
    lengths: list[int] = []
    for spec in run.sparse_specs:
        for i in inputs:
            ids = i.sparse.get(spec.name)
            if ids is None:
                raise InvalidInput(f"an example has no sparse feature {spec.name!r}")
            if not spec.multi_valued and len(ids) != 1:
                raise InvalidInput(f"single-valued feature {spec.name!r} has {len(ids)} ids in an example")
            values.extend(ids)
            lengths.append(len(ids))
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=[spec.name for spec in run.sparse_specs],
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32),
    )
    try:
        labels = [[float(getattr(example, name)) for name in run.labels] for example in examples]
    except AttributeError as error:
        raise InvalidInput(f"the model's labels {list(run.labels)} are not all example fields: {error}") from None
    event_time = torch.tensor([example.served.ts_ms for example in examples], dtype=torch.int64)
    return TimedBatch(torch.from_numpy(dense), sparse, torch.tensor(labels, dtype=torch.float32), event_time)


def check_fits(example: Example, run: TrainedRun) -> str:
    """Why `example` cannot be trained by this model ("" when it can)."""
    try:
        to_batch([example], run)
    except InvalidInput as error:
        return str(error)
    return ""


def examples_from_features(features: str | Path, split: str, limit: int | None = None, model_version: str = "replay") -> list[Example]:
    """A preprocessed split's rows as the joiner's examples, in file order: the served inputs are
    the feature row (preprocessing computes them point-in-time, as the online store serves them),
    the labels its labels. For replaying a dataset through online training and for tests."""
    import pyarrow.parquet as pq

    from gpurec.preprocess.manifest import load_manifest
    from gpurec.stream.records import ModelInputs, ServedRow, encode_inputs

    manifest = load_manifest(features)
    table = pq.read_table(manifest.split_files(split, features)).slice(0, limit).to_pylist()
    dense = [f.column for f in manifest.dense_features]
    sparse = [(f.name, f.column) for f in manifest.sparse_features]
    labels = list(manifest.label_names)
    out = []
    for row in table:
        ids = {name: tuple(row[col]) if isinstance(row[col], list) else (row[col],) for name, col in sparse}
        served = ServedRow(
            request_id=row["request_id"],
            item_id=row["item_id"],
            user_id=row["user_id"],
            ts_ms=int(row["ts"].timestamp() * 1000),
            position=row["position"],
            model_version=model_version,
            duration_ms=0,
            consent_training=True,
            inputs=encode_inputs(ModelInputs(tuple(float(row[c]) for c in dense), ids)),
        )
        flags = {name: bool(row[name]) for name in labels}
        like, finish = flags.get("like", False), flags.get("finish", False)
        out.append(Example(served, like, finish, False, False, False, False, 0, int(any(flags.values())), False))
    return out
