"""How ids get table rows: one interface, two implementations, so no caller branches on the kind.

Like TorchRec's ``ManagedCollisionModule`` (remap / evict / validate), an `IdMap` is what the
training recipe talks to; `id_map_for` picks the implementation from ``[model.ids] kind``:

- ``hashed`` (`HashedIds`): row = id mod rows; no state, never admits or evicts;
- ``collisionless`` (`gpurec.embedding.collisionless.CollisionlessIds`): every admitted id its
  own row; counts, admits, expires and evicts as it assigns.

Training side: ``assign(kjt of hashed ids, event_time_ms) -> (kjt of rows, {feature: Admitted})``
(the rows handed to new ids this step, to re-initialise), ``state_dict``/``load_state_dict`` (saved
with the model; empty when hashed), ``check_resume(world_size)`` and ``stats()``.

Erasure: ``forget({feature: hashed ids}) -> {feature: released rows}``. A collisionless map
releases each id's own row and deny-lists the id for good (the caller zeroes the rows); a hashed
map returns nothing: its rows are shared by every id with the same remainder, so no row belongs
to one user and none can be reset without erasing others. ``supports_forget`` says which, for
reports; callers call `forget` the same way on both. With hashed tables a forgotten user's trace
stays in the shared rows until the model is retrained without their data.

Serving side: `serving_lookup(maps)` merges every partition of a trained map into a read-only
``nn.Module`` ``forward(kjt of ids) -> kjt of rows`` that TorchScript can script and whose buffers
can be rewritten in place (`ModuloRemap` or `IdLookup`); ``stored_ids(feature)`` lists the ids that
have a row of their own (none when hashed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from gpurec.embedding.collisionless import CollisionlessIds
from gpurec.embedding.config import IdTableConfig
from gpurec.embedding.modulo import ModuloRemap
from gpurec.embedding.partition import Admitted
from gpurec.embedding.tables import SparseFeatureSpec


class IdMap(Protocol):
    """One partition (rank) of every feature's id -> row map during training."""

    def assign(
        self, features: KeyedJaggedTensor, event_time_ms: torch.Tensor
    ) -> tuple[KeyedJaggedTensor, dict[str, Admitted]]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def check_resume(self, written_world_size: int) -> None:
        """Raise if a checkpoint written by ``written_world_size`` ranks cannot resume here."""
        ...

    def stats(self) -> dict[str, dict[str, float]]: ...

    @property
    def supports_forget(self) -> bool:
        """Whether `forget` can release an id's parameters (only collisionless tables can)."""
        ...

    def forget(self, ids_by_feature: Mapping[str, torch.Tensor | Sequence[int]]) -> dict[str, torch.Tensor]:
        """Erase hashed ids per feature; the global rows released per feature (the same on every
        rank), whose embedding and optimizer state the caller resets. Every rank passes the same ids."""
        ...

    def serving_slots(self) -> tuple[int, dict[str, torch.Tensor]]:
        """This partition's slice of the serving lookup's mutable buffers (by buffer name) and
        its start in them; empty when the map never changes (hashing)."""
        ...

    @classmethod
    def merged_lookup(cls, maps: Sequence[IdMap]) -> nn.Module:
        """The serving lookup over every partition (``maps[p]`` = partition p)."""
        ...


class HashedIds:
    """Plain hashing behind the `IdMap` interface: `ModuloRemap`, no state, no admissions."""

    def __init__(self, specs: Sequence[SparseFeatureSpec]) -> None:
        self.remap = ModuloRemap({s.name: s.num_embeddings for s in specs})

    def assign(
        self, features: KeyedJaggedTensor, event_time_ms: torch.Tensor
    ) -> tuple[KeyedJaggedTensor, dict[str, Admitted]]:
        return self.remap(features), {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        return None

    def check_resume(self, written_world_size: int) -> None:
        return None  # stateless: any world size resumes

    def stats(self) -> dict[str, dict[str, float]]:
        return {}

    @property
    def supports_forget(self) -> bool:
        return False  # rows are shared by modulo: no row is one id's to release

    def forget(self, ids_by_feature: Mapping[str, torch.Tensor | Sequence[int]]) -> dict[str, torch.Tensor]:
        """Nothing to release (see the module docstring): the shared rows keep the trace until a retrain."""
        return {}

    def serving_slots(self) -> tuple[int, dict[str, torch.Tensor]]:
        return 0, {}

    @classmethod
    def merged_lookup(cls, maps: Sequence[HashedIds]) -> nn.Module:
        return maps[0].remap


def id_map_for(
    config: IdTableConfig,
    specs: Sequence[SparseFeatureSpec],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> IdMap:
    """Partition ``rank`` of ``world_size`` of the id maps that ``config`` asks for. On CUDA with
    Triton installed, collisionless maps run their lookups and inserts as Triton kernels."""
    if config.kind == "hashed":
        return HashedIds(specs)
    device = torch.device(device)
    backend = "triton" if device.type == "cuda" and _has_triton() else "torch"
    return CollisionlessIds(list(specs), config, rank=rank, world_size=world_size, device=device, backend=backend)


def serving_lookup(maps: Sequence[IdMap]) -> nn.Module:
    """The read-only serving lookup merged from every partition of one trained id map."""
    if not maps:
        raise ValueError("serving_lookup needs at least one id map partition")
    return type(maps[0]).merged_lookup(maps)


def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
