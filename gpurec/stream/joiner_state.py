"""The joiner's state entries: what each key holds, and their encoding (msgpack, like the records).

A runner stores these key/value pairs next to its input offsets; `Joiner.restore` rebuilds a joiner
from them. Keys: META_KEY (watermark, sequence, counters, the config the state was built with),
ROW_PREFIX + pack_key(request_id, item_id) (a held served row and its merged actions),
EARLY_PREFIX + the same (actions waiting for that row), CONSENT_PREFIX + pack_user(user_id) (a
user's last consent change).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Final, TypeVar

import msgspec

from gpurec.errors import InvalidInput
from gpurec.stream.records import Action, ServedRow


class RowState(msgspec.Struct, array_like=True, gc=False):
    """A served row in its window or in grace, with its merged actions (served None: not eligible)."""

    seq: int
    ts_ms: int
    user_id: int
    served: ServedRow | None  # None: no training consent; never emitted, and its inputs not kept
    actions: int = 0
    like: bool = False
    share: bool = False
    comment: bool = False
    follow: bool = False
    skip: bool = False
    watch_ms: int = 0
    action_ids: tuple[int, ...] = ()  # every action_id seen for this key, for duplicate detection
    last_action_ms: int = 0  # event time of the newest action merged (freshness is measured from it)


class EarlyAction(msgspec.Struct, array_like=True, gc=False):
    """An action waiting for its served row."""

    seq: int
    action: Action


class ConsentState(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A user's last consent change: revoked, or re-granted at ts_ms (rows up to it stay excluded)."""

    training: bool
    ts_ms: int


class JoinerMeta(msgspec.Struct, array_like=True):
    window_ms: int
    grace_ms: int
    late_policy: str
    watermark: int
    seq: int
    counts: dict[str, int]
    dead_letters: dict[str, int]


META_KEY: Final = b"m"
ROW_PREFIX: Final = b"r"
EARLY_PREFIX: Final = b"e"
CONSENT_PREFIX: Final = b"u"
_PAIR: Final = struct.Struct(">qq")
_ONE: Final = struct.Struct(">q")

pack_key: Final = _PAIR.pack
"""pack_key(request_id, item_id) -> 16 bytes: the joiner's key for an impression."""
pack_user: Final = _ONE.pack
"""pack_user(user_id) -> 8 bytes."""
encode_state: Final = msgspec.msgpack.Encoder().encode

_ROW = msgspec.msgpack.Decoder(RowState)
_EARLY = msgspec.msgpack.Decoder(list[EarlyAction])
_CONSENT = msgspec.msgpack.Decoder(ConsentState)
_META = msgspec.msgpack.Decoder(JoinerMeta)
T = TypeVar("T")

Decoded = tuple[JoinerMeta, dict[bytes, RowState], dict[bytes, list[EarlyAction]], dict[int, ConsentState]]


def decode_entries(entries: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]]) -> Decoded | None:
    """(meta, rows, waiting actions, consent) from state entries; None for no entries at all."""
    entries = dict(entries.items() if isinstance(entries, Mapping) else entries)
    if not entries:
        return None
    if META_KEY not in entries:
        raise InvalidInput(f"joiner state has {len(entries)} entries but no meta entry {META_KEY!r}")
    meta = _decode(_META, entries.pop(META_KEY), META_KEY)
    rows: dict[bytes, RowState] = {}
    early: dict[bytes, list[EarlyAction]] = {}
    consent: dict[int, ConsentState] = {}
    for entry_key, value in entries.items():
        prefix, rest = entry_key[:1], entry_key[1:]
        if prefix == ROW_PREFIX and len(rest) == _PAIR.size:
            rows[rest] = _decode(_ROW, value, entry_key)
        elif prefix == EARLY_PREFIX and len(rest) == _PAIR.size:
            early[rest] = _decode(_EARLY, value, entry_key)
        elif prefix == CONSENT_PREFIX and len(rest) == _ONE.size:
            consent[_ONE.unpack(rest)[0]] = _decode(_CONSENT, value, entry_key)
        else:
            raise InvalidInput(f"joiner state has an entry with an unknown key {entry_key!r}")
    return meta, rows, early, consent


def _decode(decoder: msgspec.msgpack.Decoder[T], value: bytes, entry_key: bytes) -> T:
    try:
        return decoder.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidInput(f"joiner state entry {entry_key!r} is corrupt: {exc}") from None


__all__ = [
    "CONSENT_PREFIX",
    "EARLY_PREFIX",
    "META_KEY",
    "ROW_PREFIX",
    "ConsentState",
    "EarlyAction",
    "JoinerMeta",
    "RowState",
    "decode_entries",
    "encode_state",
    "pack_key",
    "pack_user",
]
