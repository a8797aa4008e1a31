"""The records of the real-time loop and their wire format: typed, immutable, msgpack-encoded.

A feed server logs one `ServedRow` per shown item, users' `Action`s stream back, consent changes
arrive as `ConsentChange`, and the joiner (`gpurec.stream.joiner`) turns them into one `Example`
per served row, plus `DeadLetter`s for what it cannot use. These are the values that go on the
event log, so they are encoded compactly and deterministically (msgspec's MessagePack, structs as
positional arrays: field order *is* the wire format, so new fields are only ever appended, with a
default) and decoding validates every field's type: a record missing a field, with a wrong type or
an id outside int64 raises `gpurec.errors.InvalidInput`, which a runner turns into a dead letter.

msgspec was chosen by measurement (one core, this project's dev machine): decoding and checking
an action took 0.4 us against 7.2 us with the stdlib json and the same checks written in Python
(orjson or the msgpack package plus those checks: 2.9-3.1 us), a served row 2.2 us against 22 us,
at 29 and 291 bytes against 196 and 700; `bench/joiner.py` compares the whole joiner both ways.
A served row's `inputs` stay encoded (checked, then kept as bytes): they are the bulk of every row
the joiner holds and emits, and it never reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Final, TypeVar

import msgspec

from gpurec.errors import InvalidInput

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

# Ids are int64 everywhere (TorchRec's KJT values are int64); msgpack itself would also accept
# uint64, so the bound is part of the type.
Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
NonNegative = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]


class ModelInputs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """The exact inputs the model scored: dense values in the manifest's order, sparse ids by feature."""

    dense: tuple[float, ...]
    sparse: dict[str, tuple[Int64, ...]]


class ServedRow(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One shown item, as the feed server logged it when it scored the request."""

    request_id: Int64
    item_id: Int64
    user_id: Int64
    ts_ms: Int64
    position: NonNegative
    model_version: str
    duration_ms: NonNegative
    consent_training: bool
    """The user's training consent as the server read it at serving time."""
    inputs: msgspec.Raw
    """The model inputs exactly as logged: an encoded `ModelInputs` (`encode_inputs` makes it), checked
    when the row is decoded. Kept encoded, they reach the example byte for byte, and a held row costs
    one buffer instead of dozens of Python objects (decoding them was the joiner's largest cost)."""

    def model_inputs(self) -> ModelInputs:
        """The inputs, decoded."""
        return _decode_inputs(self.inputs, "ServedRow")


class Action(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One user action event on an impression; one impression may get several (watch, later a like)."""

    action_id: Int64
    """Unique per produced event: a producer's redelivery repeats it, and the joiner counts it once."""
    request_id: Int64
    item_id: Int64
    user_id: Int64
    ts_ms: Int64
    watch_ms: NonNegative
    like: bool
    share: bool
    comment: bool
    follow: bool
    skip: bool


class ConsentChange(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A user's consent after a change, at event time `ts_ms` (the latest event time wins).

    A record states the user's whole consent, not a delta: `training` (their data may become
    training examples) and `personalisation` (their feed may be ranked on their profile and
    history). Records written before `personalisation` existed hold only `training`: they decode
    with `personalisation=None`, "not stated", which leaves personalisation as it was.
    """

    user_id: Int64
    training: bool
    ts_ms: Int64
    personalisation: bool | None = None
    forget: bool = False
    """An erasure request (`gpurec forget`): both consents off, and every stage drops what it holds
    of the user (the joiner its state, the online trainer the user's embedding row)."""


class Example(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One labelled training example: the served row unchanged plus the labels of its window.

    Labels follow batch preprocessing (`gpurec.preprocess.features.label_exprs`): `like` from the
    actions, `finish` when an action exists and watch_ms * FINISH_DENOMINATOR >= duration_ms *
    FINISH_NUMERATOR. Several actions merge: booleans OR-ed, `watch_ms` the maximum. `actions` is the
    number of distinct action events merged (0: a negative). A `correction` replaces the example
    emitted earlier for the same (request_id, item_id) with labels updated by a late action.
    """

    served: ServedRow
    like: bool
    finish: bool
    share: bool
    comment: bool
    follow: bool
    skip: bool
    watch_ms: NonNegative
    actions: NonNegative
    correction: bool
    last_action_ms: Int64 = 0
    """Event time of the newest action merged (0: none): where freshness is measured from."""


class DeadLetter(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A record the joiner could not use, as it arrived (`record`: its encoded bytes) and why."""

    source: str
    """Which input it came from: "served", "action" or "consent"."""
    reason: str
    record: bytes
    detail: str = ""


Record = ServedRow | Action | ConsentChange | Example | DeadLetter
# What a `DeadLetter.source` names: the record type its `record` bytes were sent as (the joiner's
# inputs, the online trainer's examples).
DEAD_LETTER_SOURCES: Final[dict[str, type]] = {"served": ServedRow, "action": Action, "consent": ConsentChange, "example": Example}
R = TypeVar("R", ServedRow, Action, ConsentChange, Example, DeadLetter)

_ENCODER: Final = msgspec.msgpack.Encoder()
_INPUTS_DECODER: Final = msgspec.msgpack.Decoder(ModelInputs)
_TOP_INDEX = re.compile(r"`\$\[(\d+)\]")


def encode(record: Record) -> bytes:
    """The record's bytes: the same record always encodes to the same bytes."""
    return _ENCODER.encode(record)


def encode_inputs(inputs: ModelInputs) -> msgspec.Raw:
    """`ServedRow.inputs` for these inputs."""
    return msgspec.Raw(_ENCODER.encode(inputs))


def decode(data: bytes, kind: type[R]) -> R:
    """Decode and validate one record of type `kind`; raises InvalidInput saying what was wrong."""
    return _DECODE[kind](data)


def decoder(kind: type[R]) -> Callable[[bytes], R]:
    """`decode` for one kind, without the dispatch: for a runner's per-record loop."""
    return _DECODE[kind]


def _make_decoder(kind: type[R]) -> Callable[[bytes], R]:
    decode_struct = msgspec.msgpack.Decoder(kind).decode
    decode_inputs = _INPUTS_DECODER.decode

    def decode_one(data: bytes) -> R:
        if type(data) is not bytes:
            data = bytes(data)  # a served row's inputs point into this buffer: it must not change
        try:
            record = decode_struct(data)
        except msgspec.ValidationError as exc:
            raise InvalidInput(f"invalid {kind.__name__} record: {_name_fields(str(exc), kind)}") from None
        except msgspec.DecodeError as exc:
            raise InvalidInput(f"invalid {kind.__name__} record: not MessagePack ({exc})") from None
        if kind is ServedRow:
            inputs = record.inputs
        elif kind is Example:
            inputs = record.served.inputs
        else:
            return record
        try:
            decode_inputs(inputs)  # the inputs stay encoded, but are checked here
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidInput(f"invalid {kind.__name__} record: field `inputs`: {exc}") from None
        return record

    return decode_one


def _decode_inputs(inputs: msgspec.Raw, kind: str) -> ModelInputs:
    try:
        return _INPUTS_DECODER.decode(inputs)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidInput(f"invalid {kind} record: field `inputs`: {exc}") from None


def _name_fields(message: str, kind: type) -> str:
    """msgspec reports array positions (`$[3]`); append the field name so the message is readable."""
    match = _TOP_INDEX.search(message)
    fields = kind.__struct_fields__
    if match is None or int(match.group(1)) >= len(fields):
        return message
    return f"{message} (field `{fields[int(match.group(1))]}`)"


__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "Action",
    "ConsentChange",
    "DeadLetter",
    "Example",
    "ModelInputs",
    "Record",
    "ServedRow",
    "decode",
    "decoder",
    "encode",
    "encode_inputs",
]


_DECODE: Final[dict[type, Callable[[bytes], Record]]] = {
    kind: _make_decoder(kind) for kind in (ServedRow, Action, ConsentChange, Example, DeadLetter)
}
