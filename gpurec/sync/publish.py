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

One rank only for now: with several ranks each rank holds other tables' shards, and publishing
would gather them first (InvalidInput says so).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from gpurec.embedding.rows import TouchedRows
from gpurec.errors import InvalidInput
from gpurec.model.checkpoint import TrainerState
from gpurec.stream.log import EventLog, Record
from gpurec.sync.deltafile import Entry, delta_name, list_deltas, write_delta
from gpurec.train.recipe import Trainer

SYNC_TOPIC = "sync"
MAX_STAMPED_ACTIONS = 20_000  # per delta header: enough for freshness percentiles, bounded in size
MODEL_PREFIX = "model."  # the served module wraps the trained DLRM as `model`, its id map as `remap`
REMAP_PREFIX = "remap."


def table_name(feature: str) -> str:
    return f"{MODEL_PREFIX}embedding_bag_collection.embedding_bags.t_{feature}.weight"


class DeltaPublisher:
    """Call `after_step` after every training step (it is an `train_online` hook)."""

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
        if trainer.run.world_size != 1:
            raise InvalidInput("publishing deltas from several ranks is not supported yet: run the online trainer as one process")
        if rows_every_s <= 0 or dense_every_s <= 0 or snapshot_every <= 0:
            raise InvalidInput("rows_every_s, dense_every_s and snapshot_every must be positive")
        self.trainer, self.directory, self.log, self.clock = trainer, Path(directory), log, clock
        self.rows_every_s, self.dense_every_s, self.snapshot_every = rows_every_s, dense_every_s, snapshot_every
        self.specs = {spec.name: spec for spec in trainer.run.sparse_specs}
        trainer.touched = TouchedRows(list(trainer.run.sparse_specs))
        existing = list_deltas(self.directory)
        self.seq = existing[-1][0] if existing else -1
        self.published_slots: dict[str, torch.Tensor] = {}
        self.newest_event_ms = 0
        self.pending_actions: list[tuple[int, float]] = []  # (newest action's event ms, monotonic time trained)
        self.since_snapshot = 0
        self.counts = {"rows": 0, "dense": 0, "snapshot": 0, "rows_shipped": 0, "slots_shipped": 0}
        now = clock()
        self.last_rows = self.last_dense = now
        if log is not None and SYNC_TOPIC not in log.topics():
            log.create_topic(SYNC_TOPIC, 1)
        self.snapshot(TrainerState())  # where every server starts; also the point after a restart

    # ---- the hook -------------------------------------------------------------------------------

    def after_step(self, trainer: Trainer, state: TrainerState, examples: list) -> None:
        if examples:
            self.newest_event_ms = max(self.newest_event_ms, max(e.served.ts_ms for e in examples))
            trained_at = time.monotonic()
            self.pending_actions.extend((e.last_action_ms, trained_at) for e in examples if e.last_action_ms > 0)
        self.maybe_publish(state)

    def finish(self, state: TrainerState) -> dict[str, Any]:
        """Publish what is left (rows and dense weights) and report what was published."""
        self.maybe_publish(state, force=True)
        return {"deltas": dict(self.counts), "sync_seq": self.seq}

    def maybe_publish(self, state: TrainerState, force: bool = False) -> None:
        now = self.clock()
        if force or now - self.last_dense >= self.dense_every_s:
            self._publish("dense", self._dense_entries(), state)
            self.last_dense = now
        if force or now - self.last_rows >= self.rows_every_s:
            entries = self._row_entries() + self._slot_entries()
            if entries:
                actions, self.pending_actions = self.pending_actions[-MAX_STAMPED_ACTIONS:], []
                self._publish("rows", entries, state, {"actions": actions})
            self.last_rows = now
        if self.since_snapshot >= self.snapshot_every:
            self.snapshot(state)

    def snapshot(self, state: TrainerState) -> Path:
        """Every served tensor in full, then delete what the previous snapshot made redundant."""
        tables = [(table_name(f), None, self._rows(f, None)) for f in self.specs]
        slots = self._slot_entries(full=True)
        path = self._publish("snapshot", [*tables, *self._dense_entries(), *slots], state)
        assert self.trainer.touched is not None
        self.trainer.touched.take()  # the snapshot holds them all
        self.since_snapshot = 0
        self._compact()
        return path

    # ---- entries --------------------------------------------------------------------------------

    def _row_entries(self) -> list[Entry]:
        assert self.trainer.touched is not None
        entries = []
        for feature, rows in self.trainer.touched.take().items():
            if rows.numel():
                entries.append((table_name(feature), rows.cpu(), self._rows(feature, rows)))
                self.counts["rows_shipped"] += rows.numel()
        return entries

    def _rows(self, feature: str, rows: torch.Tensor | None) -> torch.Tensor:
        """Current values of a table's rows (all when None), from this rank's local shards."""
        spec = self.specs[feature]
        shards = self.trainer.reinit.shards[feature]
        whole = [s for s in shards if s.col_start == 0 and s.weight.shape[1] == spec.embedding_dim]
        if len(whole) != len(shards) or sum(s.weight.shape[0] for s in whole) != spec.num_embeddings:
            raise InvalidInput(f"table {feature!r} is not held whole by this rank (column-wise or spread over ranks)")
        with torch.no_grad():
            table = whole[0].weight if len(whole) == 1 else torch.cat([s.weight for s in sorted(whole, key=lambda s: s.row_start)])
            return (table if rows is None else table[rows.to(table.device)]).detach().cpu().clone()

    def _dense_entries(self) -> list[Entry]:
        entries = []
        for name, value in self.trainer.model.state_dict().items():
            if isinstance(value, torch.Tensor) and ".embedding_bags." not in name:
                entries.append((MODEL_PREFIX + name, None, value.detach().cpu().clone()))
        return entries

    def _slot_entries(self, full: bool = False) -> list[Entry]:
        start, buffers = self.trainer.ids.serving_slots()
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
                self.counts["slots_shipped"] += changed.numel()
            self.published_slots[name] = current.clone()
        return entries

    # ---- writing --------------------------------------------------------------------------------

    def _publish(self, kind: str, entries: list[Entry], state: TrainerState, extra: dict[str, Any] | None = None) -> Path:
        self.seq += 1
        header = {
            **(extra or {}),
            "created_ms": int(time.time() * 1000),
            "created_mono": time.monotonic(),
            "newest_event_ms": self.newest_event_ms,
            "examples_trained": state.samples,
            "step": state.step,
        }
        path = write_delta(self.directory, self.seq, kind, entries, header)
        self.counts[kind] += 1
        self.since_snapshot += 1
        if self.log is not None:
            self.log.append(SYNC_TOPIC, [Record(self.seq, delta_name(self.seq, kind).encode(), header["created_ms"])])
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
