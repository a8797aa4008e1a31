"""Erasure requests in the online trainer: follow the `consent` topic for `forget` records.

`gpurec forget` (and the consent model's forget call) append a `ConsentChange(forget=True)` to
the `consent` topic. The online trainer reads that topic next to `examples`; for each forgotten
user it asks the trainer to forget the user's table key (`Trainer.forget`: the row is released,
its embedding and optimizer state zeroed, the id deny-listed) and the delta publisher to publish
at once, so every serving instance reads the default row for the user within one sync interval.

Exactly once like the examples: the follower's positions are part of the checkpoint's offsets
(``consent/<partition>``), so a trainer restarted from an older checkpoint reads the forget again
and forgets again (idempotent).
"""

from __future__ import annotations

import torch

from gpurec.data.hashing_core import hash_id
from gpurec.embedding.cuckoo import fold_empty
from gpurec.errors import InvalidInput
from gpurec.stream.join import CONSENT
from gpurec.stream.log import EventLog
from gpurec.stream.records import ConsentChange, decoder

USER_FEATURE = "user_id"
_decode = decoder(ConsentChange)


def user_table_key(user_id: int) -> int:
    """The id-map key a user's id becomes: what the id maps hold and a verifier searches for.

    ``user_id`` is the id as the data holds it: the pseudonym where ids are pseudonymised at the edge
    (`gpurec.data.pseudonym`), else the raw id. Preprocessing and serving hash it with the feature's
    salt (`hash_id(id, "user_id")`, the ``sparse_user_id`` column) and the id map stores that hash,
    folded off the map's one reserved value as every id is."""
    key = hash_id(int(user_id), USER_FEATURE)
    return int(fold_empty(torch.tensor([key]))[0])


class ForgetFollower:
    """Reads forget requests from the `consent` topic, from the positions a checkpoint recorded."""

    def __init__(self, log: EventLog, offsets: dict[str, int]) -> None:
        self.log = log
        self.positions: dict[int, int] = {}
        self._offsets = offsets

    def _start(self) -> bool:
        if self.positions:
            return True
        if CONSENT not in self.log.topics():
            return False  # no consent topic yet: looked for again at the next poll
        start = self.log.start_offsets(CONSENT)
        for partition in range(self.log.partitions(CONSENT)):
            self.positions[partition] = self._offsets.get(f"{CONSENT}/{partition}", start[partition])
        return True

    def poll(self, max_records: int = 1000) -> list[int]:
        """User ids forgotten since the last poll (undecodable consent records are skipped: the
        joiner dead-letters them)."""
        if not self._start():
            return []
        users: list[int] = []
        for partition, offset in self.positions.items():
            records = self.log.read(CONSENT, partition, offset, max_records)
            for record in records:
                try:
                    change = _decode(record.value)
                except InvalidInput:
                    continue
                if change.forget:
                    users.append(change.user_id)
            if records:
                self.positions[partition] = records[-1].offset + 1
        return users

    def offsets(self) -> dict[str, int]:
        """The positions as checkpoint offsets (``consent/<partition>``)."""
        return {f"{CONSENT}/{p}": o for p, o in self.positions.items()}
