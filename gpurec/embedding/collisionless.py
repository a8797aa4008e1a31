"""Collisionless embedding tables (Monolith): every admitted id gets a row of its own.

`CollisionlessIds` sits in front of TorchRec's EmbeddingBagCollection during training. Each
step it turns the batch's KeyedJaggedTensor of hashed ids into one of table rows:

1. every occurrence goes to the partition that owns its id, ``owner_of(id) % world_size``;
   with more than one rank that is an all-to-all, so each id is counted, admitted and expired
   in exactly one place however the batch was split;
2. the owner's `IdPartition` counts it, expires stale ids, admits ids that reached
   ``admit_after`` and answers with the id's row; partition p's rows are the p-th block of the
   table, the block TorchRec's row-wise sharding puts on rank p, so an id's embedding lives on
   the rank that owns its mapping;
3. rows go back to the asking rank; ids without a row read the shared default row (row 0) or
   are dropped from their bag (`unadmitted = "zero"`).

A row handed to a new id is re-initialised, embedding and optimizer state, by `RowReinitializer`
before the step's forward pass, to a value that depends only on the id (`initial_rows`). That
makes training independent of which row an id lands in, so 1 rank and N ranks train the same
model even though their id -> row layouts differ.

`forget` erases ids (a user's right to erasure): each owner releases the id's row, takes back its
sketch count and deny-lists it (`gpurec.embedding.denylist`: a keyed Bloom filter, no id in
clear), so the id reads the default row from then on and is never admitted again; every rank
learns the released rows, to zero their embedding and optimizer state.

The serving side is `IdLookup` (gpurec.embedding.lookup): read-only, TorchScript-able, built from
the same state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.config import DEFAULT_ROW, IdTableConfig
from gpurec.embedding.cuckoo import fold_empty, owner_of
from gpurec.embedding.lookup import IdLookup, drop_from_bags, value_tables
from gpurec.embedding.partition import FORGET_STAT_NAMES, STAT_NAMES, Admitted, FeatureBlock, IdPartition
from gpurec.embedding.tables import SparseFeatureSpec
from gpurec.errors import InvalidInput

FORGET_FIELDS = ("forget_stats", "deny_filter", "deny_salt")  # state added with erasure


def partition_block(rows: int, partition: int, partitions: int) -> tuple[int, int]:
    """(first row, rows) of a partition's block: TorchRec's row-wise split of ``rows``."""
    if rows % partitions:
        raise ValueError(f"{rows} table rows do not split evenly over {partitions} partitions")
    block = rows // partitions
    return partition * block, block


class CollisionlessIds:
    """This rank's partition of every feature's id map, and the step that assigns rows."""

    def __init__(
        self,
        specs: list[SparseFeatureSpec],
        config: IdTableConfig,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        backend: str = "torch",
    ) -> None:
        config.check_features([s.name for s in specs])
        self.specs = {s.name: s for s in specs}
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        blocks = []
        for spec in specs:
            start, block = partition_block(spec.num_embeddings, rank, world_size)
            blocks.append(FeatureBlock(spec.name, config.policy(spec.name), block_start=start, block_rows=block))
        self.partition = IdPartition(
            blocks,
            config.eviction,
            sketch=(config.sketch_width, config.sketch_depth),
            device=device,
            backend=backend,
            forget_filter_bits=config.forget_filter_bits,
        )
        drop = [policy.unadmitted == "zero" for policy in self.partition.policies]
        self._drop_unadmitted = torch.tensor(drop, dtype=torch.bool, device=self.device)
        self._any_drop = any(drop)

    # --- the training step --------------------------------------------------------------------

    def assign(self, features: KeyedJaggedTensor, event_time_ms: torch.Tensor) -> tuple[KeyedJaggedTensor, dict[str, Admitted]]:
        """Rows for a batch of hashed ids, updating counts, admissions and expiry on the way.

        ``event_time_ms`` [B] is each example's event time; the expiry clock is the newest event
        time in the global batch. Returns the row KJT and, per feature, the rows every rank must
        re-initialise (already gathered from all ranks).
        """
        keys = features.keys()
        unknown = [k for k in keys if k not in self.specs]
        if unknown:
            raise ValueError(f"CollisionlessIds: features {unknown} have no id table")
        ids = fold_empty(features.values())
        lengths, batch = features.lengths(), features.stride()
        table_of_key = torch.tensor([self.partition.feature_index(k) for k in keys], device=ids.device)
        segment, feature = value_tables(lengths, batch, table_of_key, ids.numel())
        times = event_time_ms.to(ids.device)[segment % batch]
        clock = self._global_clock(event_time_ms)

        rows, mine = self._owner_rows(ids, feature, times, clock)
        admitted = self._gather_admissions(mine)
        if self._any_drop:
            rows, lengths = drop_from_bags(rows, lengths, segment, (rows < 0) & self._drop_unadmitted[feature])
        rows = torch.where(rows < 0, torch.full_like(rows, DEFAULT_ROW), rows)
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=rows, lengths=lengths, weights=None, stride=batch), admitted

    def _owner_rows(self, ids: torch.Tensor, feature: torch.Tensor, times: torch.Tensor, clock: int) -> tuple[torch.Tensor, dict[str, Admitted]]:
        """Each occurrence's row, computed by the partition that owns the id; and this rank's admissions."""
        if self.world_size == 1:
            return self.partition.assign(feature, ids, times, clock)
        owner = owner_of(ids, self.world_size)
        order = torch.sort(owner, stable=True).indices
        send_counts = torch.bincount(owner, minlength=self.world_size)
        payload = torch.stack([ids[order], feature[order], times[order]], dim=1)
        received, recv_counts = _all_to_all(payload, send_counts)
        rows, admitted = self.partition.assign(received[:, 1], received[:, 0], received[:, 2], clock)
        answered, _ = _all_to_all(rows[:, None], recv_counts)
        result = torch.empty_like(ids)
        result[order] = answered[:, 0]
        return result, admitted

    def _global_clock(self, event_time_ms: torch.Tensor) -> int:
        clock = event_time_ms.max().reshape(1).to(torch.int64)
        if self.world_size > 1:
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)
        return int(clock)

    def _gather_admissions(self, admitted: dict[str, Admitted]) -> dict[str, Admitted]:
        """Every rank's admissions: any rank may hold a shard of a row another rank handed out."""
        mine = {name: (a.rows.cpu(), a.ids.cpu()) for name, a in admitted.items() if a.rows.numel()}
        if self.world_size == 1:
            everyone = [mine]
        else:
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
        merged: dict[str, Admitted] = {}
        for name in self.specs:
            parts = [rank_part[name] for rank_part in everyone if name in rank_part]
            if parts:
                merged[name] = Admitted(
                    rows=torch.cat([p[0] for p in parts]).to(self.device), ids=torch.cat([p[1] for p in parts]).to(self.device)
                )
        return merged

    # --- erasure ------------------------------------------------------------------------------

    @property
    def supports_forget(self) -> bool:
        return True  # every id has its own row: releasing it removes exactly that id's parameters

    def forget(self, ids_by_feature: Mapping[str, torch.Tensor | Sequence[int]]) -> dict[str, torch.Tensor]:
        """Erase hashed ids (table keys) per feature: release their rows, deny-list them for good.

        Every rank calls it with the same ids; the owner of each id does the work. Returns, on
        every rank, the global rows released per feature (sorted): the caller zeroes their
        embedding and optimizer state wherever its shards hold them.
        """
        unknown = [name for name in ids_by_feature if name not in self.specs]
        if unknown:
            raise InvalidInput(f"cannot forget ids of {unknown}: no such id table (tables: {sorted(self.specs)})")
        features, values = [], []
        for name, ids in ids_by_feature.items():
            ids = torch.as_tensor(ids, dtype=torch.int64).flatten().to(self.device)
            features.append(torch.full_like(ids, self.partition.feature_index(name)))
            values.append(fold_empty(ids))
        if not values:
            return {}
        feature, ids = torch.cat(features), torch.cat(values)
        if self.world_size > 1:
            mine = owner_of(ids, self.world_size) == self.rank
            feature, ids = feature[mine], ids[mine]
        released = {name: rows.cpu() for name, rows in self.partition.forget(feature, ids).items()}
        if dist.is_initialized() and dist.get_world_size() > 1:
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, released)
        else:
            everyone = [released]
        merged = {}
        for name in self.specs:
            parts = [part[name] for part in everyone if name in part]
            if parts:
                merged[name] = torch.sort(torch.cat(parts)).values.to(self.device)
        return merged

    # --- state and reporting ------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors named ``p<partition>.<field>``: rank-specific, for DCP."""
        return {f"p{self.rank}.{field}": tensor for field, tensor in self.partition.state_tensors().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, target in self.state_dict().items():
            if key not in state and key.split(".", 1)[1] in FORGET_FIELDS:
                target.zero_()  # written before erasure existed: nothing was forgotten
                continue
            if key not in state:
                raise KeyError(f"id-table state has no {key!r} (was the checkpoint written with {self.world_size} ranks?)")
            target.copy_(state[key])
        self.partition.loaded()

    def check_resume(self, written_world_size: int) -> None:
        if written_world_size != self.world_size:
            raise InvalidInput(
                f"the checkpoint holds collisionless id maps partitioned over {written_world_size} ranks; resume "
                f"it with {written_world_size} ranks (repartitioning id maps to {self.world_size} ranks is not "
                "supported yet)"
            )

    @classmethod
    def merged_lookup(cls, maps: Sequence[CollisionlessIds]) -> IdLookup:
        """Every partition's maps in one read-only `IdLookup` (``maps[p]`` = partition p)."""
        return IdLookup.from_partitions([m.partition for m in maps])

    def serving_slots(self) -> tuple[int, dict[str, torch.Tensor]]:
        """This partition's part of the serving lookup's buffers (`IdLookup.keys`/`slot_rows`, in
        the served layout: global rows) and where it starts in them: what parameter sync diffs
        and ships to servers (admissions, expiries, evictions and cuckoo displacements alike)."""
        part = IdLookup.from_partitions([self.partition])
        return self.rank * part.keys.numel(), {"keys": part.keys, "slot_rows": part.slot_rows}

    def stats(self) -> dict[str, dict[str, float]]:
        """Per feature, summed over ranks: rows used, capacity, occupancy, load factor, counters."""
        part = self.partition
        sizes = [
            [part.size(f), part.capacity[f], table.size(), table.num_slots] for f, table in enumerate(part.tables)
        ]
        local = torch.cat([torch.tensor(sizes, dtype=torch.int64), part.stats, part.forget_stats], dim=1)
        if self.world_size > 1 and dist.is_initialized():
            local = local.to(self.device)
            dist.all_reduce(local)
            local = local.cpu()
        report: dict[str, dict[str, float]] = {}
        for name, row in zip(part.names, local.tolist(), strict=True):
            used, capacity, stored, slots, *counters = row
            entry = {"rows_used": used, "capacity": capacity, "occupancy": used / capacity, "load_factor": stored / slots}
            entry.update(dict(zip(STAT_NAMES + FORGET_STAT_NAMES, counters, strict=True)))
            report[name] = entry
        return report


def _all_to_all(payload: torch.Tensor, send_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange rows of ``payload`` (grouped by destination rank) with every rank."""
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)
    received = payload.new_empty((int(recv_counts.sum()), payload.shape[1]))
    dist.all_to_all_single(
        received, payload.contiguous(), output_split_sizes=recv_counts.tolist(), input_split_sizes=send_counts.tolist()
    )
    return received, recv_counts
