"""Parameter sync, trainer side: the rows and id-map slots training changed, published as deltas.

Monolith's scheme: every `rows_every_s` the trainer publishes the embedding rows touched since the
last delta with their current values, plus the id-map slots that changed (admissions, expiries,
evictions, cuckoo displacements: found by comparing the map's serving buffers with what was last
published, so nothing the map does can be missed); every `dense_every_s` all dense weights; every
`snapshot_every` deltas a full snapshot, after which older files are deleted (compaction: a
server that starts or falls behind loads the newest snapshot and the deltas after it). Each
delta is numbered, written atomically (`deltafile.write_delta`) and, when an event log is given,
announced on its `sync` topic.

Every delta's header says what it holds: the newest event time of the examples trained into it
(`newest_event_ms`), the examples trained so far, when it was written (`created_ms`, and
`created_mono` on the machine's monotonic clock, which all local processes share), and for a rows
delta `actions`: each trained example's newest action (event ms) with the monotonic time it was
trained. Servers report the seq they serve; freshness (`gpurec.sync.freshness`) is measured from
those stamps.

Sequence numbers continue across restarts (from the newest file in the directory), and a trainer
that restarts from a checkpoint older than its last delta starts with a snapshot, so a server
never combines rows from two different histories.

Under torchrun every rank runs a publisher: rank 0's clock decides when, every rank ships the rows
its shards hold that any rank touched (the touched bitmaps are OR-ed across ranks) and its own
id-map partition's slots, and rank 0 gathers the parts and writes one delta. Column-wise sharded
tables are refused (a delta carries whole rows).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gpurec.embedding.rows import TouchedRows
from gpurec.errors import GpurecError, InvalidInput
from gpurec.model.checkpoint import TrainerState
from gpurec.stream.log import EventLog, Record
from gpurec.sync.deltafile import DeltaNotWritten, Entry, delta_name, list_deltas, write_delta
from gpurec.train.recipe import Trainer

SYNC_TOPIC = "sync"
MAX_STAMPED_ACTIONS = 20_000  # per delta header: enough for freshness percentiles, bounded in size
MODEL_PREFIX = "model."  # the served module wraps the trained DLRM as `model`, its id map as `remap`
REMAP_PREFIX = "remap."


def table_name(feature: str) -> str:
    return f"{MODEL_PREFIX}embedding_bag_collection.embedding_bags.t_{feature}.weight"


class DeltaPublisher:
    """Call `after_step` after every training step on every rank (it is a `train_online` listener).

    Several ranks: rank 0 decides when to publish (its clock) and tells the others; each rank
    contributes what it holds (the rows of its table shards that any rank touched, its own id-map
    partition's changed slots, its examples' action stamps) and rank 0 writes the one delta file,
    so a delta is still atomic and whole.
    """

    def __init__(
        self,
        trainer: Trainer,
        directory: str | Path,
        *,
        rows_every_s: float = 5.0,
        dense_every_s: float = 60.0,
        snapshot_every: int = 100,
        log: EventLog | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        if rows_every_s <= 0 or dense_every_s <= 0 or snapshot_every <= 0:
            raise InvalidInput("rows_every_s, dense_every_s and snapshot_every must be positive")
        self.trainer, self.directory, self.log, self.clock = trainer, Path(directory), log, clock
        self.rows_every_s, self.dense_every_s, self.snapshot_every = rows_every_s, dense_every_s, snapshot_every
        self.specs = {spec.name: spec for spec in trainer.run.sparse_specs}
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.main = not dist.is_initialized() or dist.get_rank() == 0
        for feature, shards in trainer.reinit.shards.items():
            if any(s.col_start != 0 or s.weight.shape[1] != self.specs[feature].embedding_dim for s in shards):
                raise InvalidInput(f"table {feature!r} is sharded by columns: parameter sync ships whole rows (use table_wise or row_wise)")
        trainer.touched = TouchedRows(list(trainer.run.sparse_specs))
        if self.main:
            _remove_temporaries(self.directory)
        existing = list_deltas(self.directory)
        self.seq = _agreed(existing[-1][0] if existing else -1, self.world)
        self.published_slots: dict[str, torch.Tensor] = {}
        self.newest_event_ms = 0
        self.pending_actions: list[tuple[int, float]] = []  # (newest action's event ms, monotonic time trained)
        self.since_snapshot = 0
        self.counts = {"rows": 0, "dense": 0, "snapshot": 0, "rows_shipped": 0, "slots_shipped": 0}
        now = clock()
        self.last_rows = self.last_dense = now
        if self.main and log is not None and SYNC_TOPIC not in log.topics():
            log.create_topic(SYNC_TOPIC, 1)
        self.snapshot(TrainerState())  # where every server starts; also the point after a restart

    # ---- the hook -------------------------------------------------------------------------------

    def after_step(self, trainer: Trainer, state: TrainerState, examples: list) -> None:
        if examples:
            self.newest_event_ms = max(self.newest_event_ms, max(e.served.ts_ms for e in examples))
            trained_at = time.monotonic()
            self.pending_actions.extend((e.last_action_ms, trained_at) for e in examples if e.last_action_ms > 0)
        self.maybe_publish(state)

    def after_forget(self, trainer: Trainer, state: TrainerState) -> None:
        """A user was forgotten: publish the reset rows and slots now, not at the next interval."""
        self.maybe_publish(state, force=True)

    def finish(self, state: TrainerState) -> dict[str, Any]:
        """Publish what is left (rows and dense weights) and report what was published."""
        self.maybe_publish(state, force=True)
        return {"deltas": dict(self.counts), "sync_seq": self.seq}

    def maybe_publish(self, state: TrainerState, force: bool = False) -> None:
        now = self.clock()
        dense_due = force or now - self.last_dense >= self.dense_every_s
        rows_due = force or now - self.last_rows >= self.rows_every_s
        dense_due, rows_due = _agreed((dense_due, rows_due), self.world)  # rank 0's clock decides
        if dense_due:
            self._publish("dense", self._dense_entries(), state)
            self.last_dense = now
        if rows_due:
            actions, self.pending_actions = self.pending_actions[-MAX_STAMPED_ACTIONS:], []
            self._publish("rows", self._row_entries() + self._slot_entries(), state, {"actions": actions})
            self.last_rows = now
        if self.since_snapshot >= self.snapshot_every:
            self.snapshot(state)

    def snapshot(self, state: TrainerState) -> Path | None:
        """Every served tensor in full, then delete what the previous snapshot made redundant."""
        tables = [entry for f in self.specs for entry in self._shard_entries(f, None)]
        slots = self._slot_entries(full=True)
        path = self._publish("snapshot", [*tables, *self._dense_entries(), *slots], state)
        assert self.trainer.touched is not None
        self.trainer.touched.take()  # the snapshot holds them all
        self.since_snapshot = 0
        if self.main:
            self._compact()
        return path

    # ---- entries (this rank's part) -------------------------------------------------------------

    def _row_entries(self) -> list[Entry]:
        assert self.trainer.touched is not None
        touched = self.trainer.touched.take_bitmaps()
        if self.world > 1:  # rows any rank touched: each rank ships those its shards hold
            for bitmap in touched.values():
                as_int = bitmap.to(torch.uint8)
                dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
                bitmap.copy_(as_int.bool())
        entries = []
        for feature, bitmap in touched.items():
            rows = bitmap.nonzero().flatten()
            if rows.numel():
                entries.extend(self._shard_entries(feature, rows))
        return entries

    def _shard_entries(self, feature: str, rows: torch.Tensor | None) -> list[Entry]:
        """(table, rows, current values) for the given rows (all when None) this rank's shards hold."""
        entries = []
        with torch.no_grad():
            for shard in self.trainer.reinit.shards[feature]:
                count = shard.weight.shape[0]
                if rows is None:
                    local = torch.arange(count, device=shard.weight.device)
                else:
                    local = rows.to(shard.weight.device) - shard.row_start
                    local = local[(local >= 0) & (local < count)]
                if local.numel():
                    values = shard.weight[local].detach().cpu().clone()
                    entries.append((table_name(feature), (local + shard.row_start).cpu(), values))
        return entries

    def _dense_entries(self) -> list[Entry]:
        if not self.main:  # replicated on every rank (data parallel): rank 0's copy is everyone's
            return []
        entries = []
        for name, value in self.trainer.model.state_dict().items():
            if isinstance(value, torch.Tensor) and ".embedding_bags." not in name:
                entries.append((MODEL_PREFIX + name, None, value.detach().cpu().clone()))
        return entries

    def _slot_entries(self, full: bool = False) -> list[Entry]:
        start, buffers = self.trainer.ids.serving_slots()  # this rank's own partition
        entries = []
        for name, current in buffers.items():
            current = current.detach().cpu()
            previous = self.published_slots.get(name)
            if full or previous is None:
                changed = torch.arange(current.numel(), dtype=torch.int64)
            else:
                changed = (current != previous).nonzero().flatten()
            if changed.numel():
                entries.append((REMAP_PREFIX + name, changed + start, current[changed].clone()))
            self.published_slots[name] = current.clone()
        return entries

    # ---- writing (rank 0) -----------------------------------------------------------------------

    def _publish(self, kind: str, entries: list[Entry], state: TrainerState, extra: dict[str, Any] | None = None) -> Path | None:
        """Gather every rank's entries (and action stamps) on rank 0, which writes the delta."""
        parts = _gathered((entries, (extra or {}).get("actions", []), self.newest_event_ms), self.world)
        path = self._write(kind, parts, state) if self.main else None
        if not _agreed(path is not None, self.world):
            return None  # a rows delta with nothing changed is not written
        self.seq += 1
        self.counts[kind] += 1
        self.since_snapshot += 1
        return path

    def _write(self, kind: str, parts: list[Any], state: TrainerState) -> Path | None:
        entries = [entry for part, _, _ in parts for entry in part]
        if kind == "rows" and not entries:
            return None
        if kind == "rows":
            self.counts["rows_shipped"] += sum(v.shape[0] for n, _, v in entries if n.startswith(MODEL_PREFIX))
            self.counts["slots_shipped"] += sum(v.numel() for n, _, v in entries if n.startswith(REMAP_PREFIX))
        seq = self.seq + 1
        actions = sorted(a for _, part_actions, _ in parts for a in part_actions)[-MAX_STAMPED_ACTIONS:]
        header = {
            **({"actions": actions} if kind == "rows" else {}),
            "created_ms": int(time.time() * 1000),
            "created_mono": time.monotonic(),
            "newest_event_ms": max(newest for _, _, newest in parts),
            "examples_trained": state.samples,
            "step": state.step,
        }
        try:
            path = write_delta(self.directory, seq, kind, entries, header)
        except DeltaNotWritten as error:  # a full disk: stop in one line; servers keep the deltas before it
            raise GpurecError(f"sync: {error.strerror or error}") from error
        if self.log is not None:
            self.log.append(SYNC_TOPIC, [Record(seq, delta_name(seq, kind).encode(), header["created_ms"])])
        return path

    def _compact(self) -> None:
        """Keep the two newest snapshots and every delta after the older one (a server reading the
        older snapshot while the newer is written still finds its deltas)."""
        snapshots = [seq for seq, kind, _ in list_deltas(self.directory) if kind == "snapshot"]
        if len(snapshots) < 2:
            return
        keep_from = snapshots[-2]
        for seq, _, path in list_deltas(self.directory):
            if seq < keep_from:
                path.unlink(missing_ok=True)


def _remove_temporaries(directory: Path) -> None:
    """Delete the deltas a killed writer left under their temporary names (`deltafile.write_delta`'s
    `.<name>.<pid>.tmp`). Never read (`list_deltas` skips them); one trainer writes a directory, so
    at its start no write is in flight."""
    if directory.is_dir():
        for path in directory.glob(".*.delta.*.tmp"):
            path.unlink(missing_ok=True)


def _agreed(value: Any, world: int) -> Any:
    """Rank 0's value on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gathered(value: Any, world: int) -> list[Any]:
    """Every rank's value, on rank 0 (other ranks get their own only)."""
    if world == 1:
        return [value]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out if out is not None else [value]
