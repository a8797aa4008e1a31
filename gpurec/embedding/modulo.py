"""Plain-hashing id remap: a hashed 64-bit id goes to row ``id mod rows`` of its table.

Preprocessing hashes every sparse value to a signed 64-bit id (`gpurec.data.hashing`), far
more ids than any table has rows. With ``[model.ids] kind = "hashed"``, ids share rows by
modulo: distinct ids may collide, which costs some accuracy but needs no vocabulary and no
state, so every trainer and server maps an id to the same row.

`ModuloRemap` is an ``nn.Module`` from a KeyedJaggedTensor of hashed ids to a KeyedJaggedTensor
of row ids with the same keys, lengths and weights: the serving lookup of the hashed id map
(`gpurec.embedding.idmap.HashedIds`), with the same interface as the collisionless `IdLookup`.
"""

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class ModuloRemap(nn.Module):
    """Map each feature's hashed ids to ``id mod num_embeddings[feature]``, always in range.

    ``torch.remainder`` takes the sign of the divisor, so negative ids (half of all 64-bit
    hashes) land in ``[0, rows)`` as well. Features of the input that have no entry in
    ``num_embeddings`` are an error rather than passed through, because an unmapped hash would
    index far outside its table. TorchScript-able.
    """

    def __init__(self, num_embeddings: dict[str, int]) -> None:
        super().__init__()
        for feature, rows in num_embeddings.items():
            if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
                raise ValueError(f"num_embeddings[{feature!r}] must be a positive integer, got {rows!r}")
        self.num_embeddings: dict[str, int] = dict(num_embeddings)
        # One shared row count (the common case) needs a single remainder, no per-value divisors.
        distinct_rows = set(num_embeddings.values())
        self._shared_rows: int = distinct_rows.pop() if len(distinct_rows) == 1 else 0
        self.features: list[str] = list(num_embeddings)

    @torch.jit.unused
    def stored_ids(self, feature: str) -> torch.Tensor:
        """Ids with a row of their own: none, every id shares its row by modulo."""
        if feature not in self.num_embeddings:
            raise KeyError(f"ModuloRemap: no feature {feature!r}")
        return torch.empty(0, dtype=torch.int64)

    @torch.jit.unused
    def feature_rows(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """The row of each id of one feature (never -1: every id has a row, maybe a shared one)."""
        return torch.remainder(ids, self.num_embeddings[feature])

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if features.variable_stride_per_key():
            raise ValueError("ModuloRemap does not support variable-batch (VBE) KeyedJaggedTensors")
        keys = features.keys()
        rows_per_key: list[int] = []
        for key in keys:
            if key not in self.num_embeddings:
                raise ValueError("ModuloRemap: feature " + key + " has no row count")
            rows_per_key.append(self.num_embeddings[key])
        values = features.values()
        if self._shared_rows > 0:
            remapped = torch.remainder(values, self._shared_rows)
        else:
            divisors = torch.repeat_interleave(
                torch.tensor(rows_per_key, dtype=values.dtype, device=values.device),
                torch.tensor(features.length_per_key(), dtype=torch.long, device=values.device),
                output_size=values.numel(),
            )
            remapped = torch.remainder(values, divisors)
        return KeyedJaggedTensor(
            keys=keys,
            values=remapped,
            weights=features.weights_or_none(),
            lengths=features.lengths_or_none(),
            offsets=features.offsets_or_none(),
            stride=features.stride(),
            length_per_key=features.length_per_key_or_none(),
            offset_per_key=features.offset_per_key_or_none(),
            inverse_indices=features.inverse_indices_or_none(),
        )
