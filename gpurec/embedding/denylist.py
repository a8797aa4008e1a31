"""Ids that were forgotten and must never get a row again: a keyed Bloom filter in a tensor.

Forgetting a user (GDPR Art. 17) releases their row; without more, their id would earn a row
again after ``admit_after`` occurrences. The partition therefore remembers *that* an id was
forgotten, but not the id: each forgotten (feature, id) sets ``HASHES`` bits of a fixed-size bit
array, at positions taken from a keyed BLAKE2b digest of the feature name and the id's 8 bytes
under a random 16-byte salt drawn at the first forget (and kept with the filter in checkpoints).
Neither the raw id nor the table key is stored, and the positions are one-way: the filter can
only answer "was this id forgotten?" for an id someone already holds (the check on admission).
Whoever holds a checkpoint and guesses an id can ask the same question: with pseudonymous ids
(keyed hashes, `gpurec.data.pseudonym`) guessing is infeasible without the key.

Why a Bloom filter, not a list of digests: its size is fixed, so a checkpoint's tensors keep
their shapes however many users were forgotten (distributed checkpoints load into tensors of the
saved shape), and it never fills up. It has no false negatives (a forgotten id is always
refused); a never-forgotten id is refused by mistake with probability about
``(1 - exp(-HASHES * n / bits)) ** HASHES`` after n forgets in one partition (2^20 bits: 1e-9 at
10k forgets, 1e-4 at 50k, 7e-3 at 100k), and then reads the shared default row, like an id that
has not earned a row yet. Size it with ``[model.ids] forget_filter_bits``.
"""

from __future__ import annotations

import hashlib
import os

import torch

HASHES = 8  # bits set per forgotten id: one 32-byte digest gives 8 positions
_PERSON = b"gpurec-forget"


class DenyFilter:
    """``add(feature, ids)`` then ``contains(feature, ids)``; ``empty`` until the first add."""

    def __init__(self, bits: int) -> None:
        if bits <= 0 or bits % 8:
            raise ValueError(f"a deny filter needs a positive multiple of 8 bits, got {bits}")
        self.bits = bits
        # On the CPU whatever the training device: it is read only for the few ids admitted per step.
        self.bytes = torch.zeros(bits // 8, dtype=torch.uint8)
        self.salt = torch.zeros(16, dtype=torch.uint8)  # all zero: nothing forgotten yet
        self.empty = True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"deny_filter": self.bytes, "deny_salt": self.salt}

    def refresh(self) -> None:
        """Re-read `empty` after the tensors were loaded from a checkpoint."""
        self.empty = not bool(self.salt.any())

    def _positions(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), HASHES] bit positions of each id."""
        key = bytes(self.salt.tolist())
        prefix = feature.encode() + b"\0"
        out = []
        for value in ids.detach().cpu().tolist():
            digest = hashlib.blake2b(
                prefix + int(value).to_bytes(8, "little", signed=True), key=key, person=_PERSON, digest_size=4 * HASHES
            ).digest()
            out.append([int.from_bytes(digest[4 * i : 4 * i + 4], "little") % self.bits for i in range(HASHES)])
        return torch.tensor(out, dtype=torch.int64).reshape(-1, HASHES)

    def contains(self, feature: str, ids: torch.Tensor) -> torch.Tensor:
        """Bool per id: was it forgotten (or, rarely, does it collide with forgotten ids)."""
        if self.empty or ids.numel() == 0:
            return torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        positions = self._positions(feature, ids)
        bits = (self.bytes[positions >> 3] >> (positions & 7).to(torch.uint8)) & 1
        return bits.bool().all(dim=1).to(ids.device)

    def add(self, feature: str, ids: torch.Tensor) -> int:
        """Deny-list ``ids``; return how many were not on the list yet."""
        if ids.numel() == 0:
            return 0
        if self.empty:
            self.salt.copy_(torch.tensor(list(_nonzero_salt()), dtype=torch.uint8))
            self.empty = False
        new = int((~self.contains(feature, ids)).sum())
        positions = self._positions(feature, ids).flatten()
        masks = torch.ones_like(positions, dtype=torch.uint8) << (positions & 7).to(torch.uint8)
        for index, mask in zip((positions >> 3).tolist(), masks.tolist(), strict=True):
            self.bytes[index] |= mask
        return new


def _nonzero_salt() -> bytes:
    while True:  # all-zero means "empty": never draw it (probability 2^-128, but cheap to rule out)
        salt = os.urandom(16)
        if any(salt):
            return salt
