"""The cuckoo id -> row map's device format and hash, in torch: what the kernels must match.

`kernels/cuckoo.py` (OpenAI Triton) and `gpurec.embedding.cuckoo.CuckooTable` (the CPU path and the
reference) both operate on this layout, so the hash and probe live here, below both: the kernels
import nothing from `gpurec`, and `gpurec.embedding` builds its tables on this module.

    keys      int64 [num_buckets * SLOTS]   slot -> id, EMPTY_KEY when free
    slot_rows int32 [num_buckets * SLOTS]   slot -> row, -1 when free

Bucket ``b`` is slots ``[b * SLOTS, (b + 1) * SLOTS)``. The hash is murmur3's 64-bit finaliser with
logical shifts written as arithmetic shift + mask and wrapping int64 multiplies, because those mean
the same thing in torch, numpy (the Triton interpreter) and Triton's compiled code.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SLOTS = 8  # ids per bucket: 8 x int64 = one 64-byte cache line
EMPTY_KEY = -(2**63)  # marks a free slot; the one id it shadows is folded into EMPTY_KEY + 1
SEED_1 = 0x2545F4914F6CDD1D
SEED_2 = 0x1B873593CC9E2D51 - 2**63  # as a signed int64
# murmur3 fmix64 multipliers as signed int64 (Triton and torch take signed literals).
MIX_1 = 0xFF51AFD7ED558CCD - 2**64
MIX_2 = 0xC4CEB9FE1A85EC53 - 2**64
LOW_31 = 0x7FFFFFFF  # (x >> 33) & LOW_31 == logical shift right by 33 of an int64
NON_NEGATIVE = 0x7FFFFFFFFFFFFFFF
DEFAULT_MAX_ROUNDS = 128  # displacement rounds before the ids still homeless are reported as failed


# The constants reach the functions below as default arguments because TorchScript (the served
# artifact scripts them) cannot read module globals; callers never pass them.


def mix64(
    ids: torch.Tensor,
    seed: int,
    m1: int = MIX_1,
    m2: int = MIX_2,
    low_31: int = LOW_31,
    non_negative: int = NON_NEGATIVE,
) -> torch.Tensor:
    """murmur3 fmix64 of ``ids ^ seed``, cleared to a non-negative int64."""
    x = ids ^ seed
    x = x ^ ((x >> 33) & low_31)
    x = x * m1
    x = x ^ ((x >> 33) & low_31)
    x = x * m2
    x = x ^ ((x >> 33) & low_31)
    return x & non_negative


def bucket_pair(
    ids: torch.Tensor, num_buckets: torch.Tensor, seed_1: int = SEED_1, seed_2: int = SEED_2
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two candidate buckets of each id (equal only when ``num_buckets == 1``).

    ``num_buckets`` is an int, or a tensor with one bucket count per id when ids of several
    tables are looked up at once.
    """
    first = mix64(ids, seed_1) % num_buckets
    second = mix64(ids, seed_2) % num_buckets
    # A second hash that lands on the first bucket would halve the id's choices: take the next one.
    second = torch.where(second == first, (first + 1) % num_buckets, second)
    return first, second


def probe(
    keys: torch.Tensor,
    ids: torch.Tensor,
    slot_base: torch.Tensor,
    num_buckets: torch.Tensor,
    slots: int = SLOTS,
) -> torch.Tensor:
    """The slot of ``keys`` holding each id, -1 where absent.

    ``keys`` may hold several tables back to back: an id's table starts at slot ``slot_base`` (a
    multiple of ``slots``) and has ``num_buckets`` buckets (ints, or tensors with one value per id).
    """
    first, second = bucket_pair(ids, num_buckets)
    base = torch.div(slot_base, slots, rounding_mode="floor")
    buckets = keys.view(-1, slots)
    # Whole-bucket row gathers (one 64-byte line per bucket), not 16 scattered element gathers.
    hit = torch.cat(
        [buckets[base + first] == ids.unsqueeze(1), buckets[base + second] == ids.unsqueeze(1)], dim=1
    )
    position = hit.to(torch.int8).argmax(dim=1, keepdim=True)  # at most one hit per id
    found = hit.gather(1, position).squeeze(1)
    position = position.squeeze(1)
    bucket = torch.where(position < slots, base + first, base + second)
    slot = bucket * slots + position % slots
    return torch.where(found, slot, torch.full_like(slot, -1))


class TableStorage(NamedTuple):
    """One table's tensors (or views into a larger pair holding several tables back to back):
    what the kernel wrappers take as ``table`` (``CuckooTable`` has the same three attributes)."""

    keys: torch.Tensor
    slot_rows: torch.Tensor
    num_buckets: int


def empty_storage(num_buckets: int, device: torch.device | str = "cpu") -> TableStorage:
    """A table of ``num_buckets`` free buckets."""
    slots = num_buckets * SLOTS
    return TableStorage(
        torch.full((slots,), EMPTY_KEY, dtype=torch.int64, device=device),
        torch.full((slots,), -1, dtype=torch.int32, device=device),
        num_buckets,
    )
