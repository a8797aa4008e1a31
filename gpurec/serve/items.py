"""The `items` topic: one record per uploaded item, its metadata, in the live loop's wire format.

An upload service appends an `Item` when a video is published (key = item_id, timestamp = the
upload time in event-time ms); the feed's candidate source (`gpurec.serve.candidates`) follows the
topic to know what exists, how fresh it is and where it belongs (region, language). The fields are
the batch `items` log's columns (`gpurec.data.schema.ITEMS`), with the upload time as epoch ms.

Same conventions as the other records of the loop (`gpurec.stream.records`): a frozen msgspec
struct encoded as a positional MessagePack array, so field order is the wire format and new fields
are only ever appended, with a default; decoding validates every field and raises
`gpurec.errors.InvalidInput` saying what was wrong. (Proposed for `gpurec.stream.records` once that
module settles; kept here, with the code that reads it, meanwhile.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec
import numpy as np
import pyarrow as pa

from gpurec.data.schema import ITEMS
from gpurec.errors import InvalidInput
from gpurec.features.events import Batch, as_table, column, int_column
from gpurec.stream.log import Record
from gpurec.stream.records import Int64, NonNegative

ITEMS_TOPIC: Final = "items"


class Item(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One uploaded item: the `items` log's row, upload time in epoch ms."""

    item_id: Int64
    author_id: Int64
    duration_ms: NonNegative
    upload_ts_ms: NonNegative
    hashtags: tuple[str, ...]
    language: str
    region: str


_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(Item)


def encode_item(item: Item) -> bytes:
    """The item's bytes (deterministic: the same item always encodes to the same bytes)."""
    return _ENCODER.encode(item)


def decode_item(data: bytes) -> Item:
    """Decode and validate one `items` record; InvalidInput names what was wrong."""
    try:
        return _DECODER.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidInput(f"invalid Item record: {exc}") from None


def item_record(item: Item) -> Record:
    """The event-log record of an upload: keyed by item id, at its upload time."""
    return Record(item.item_id, encode_item(item), item.upload_ts_ms)


def items_from_table(data: Batch) -> list[Item]:
    """Items from rows of the `items` log (an Arrow table, a Polars frame, columns or row dicts)."""
    table = as_table(data, "items")
    ids, authors, durations = (int_column(table, c, "items") for c in ("item_id", "author_id", "duration_ms"))
    uploads = int_column(table, "upload_ts", "items", ("upload_ts_ms",))
    if (durations < 0).any() or (uploads < 0).any():
        raise InvalidInput("items: duration_ms and upload_ts must not be negative")
    hashtags = column(table, "hashtags", ITEMS.field("hashtags").type, "items").to_pylist()
    language = column(table, "language", pa.string(), "items").to_pylist()
    region = column(table, "region", pa.string(), "items").to_pylist()
    return [
        Item(i, a, d, u, tuple(t for t in tags if t is not None), lang, reg)
        for i, a, d, u, tags, lang, reg in zip(
            ids.tolist(), authors.tolist(), durations.tolist(), uploads.tolist(), hashtags, language, region, strict=True
        )
    ]


def items_table(items: Iterable[Item]) -> pa.Table:
    """Items as rows of the `items` log's schema (what `OnlineFeatureStore.put_items` takes)."""
    items = list(items)
    return pa.table(
        {
            "item_id": pa.array([i.item_id for i in items], pa.int64()),
            "author_id": pa.array([i.author_id for i in items], pa.int64()),
            "duration_ms": pa.array([i.duration_ms for i in items], pa.int32()),
            "upload_ts": pa.array(np.array([i.upload_ts_ms for i in items], np.int64), pa.int64()).cast(
                ITEMS.field("upload_ts").type
            ),
            "hashtags": pa.array([list(i.hashtags) for i in items], ITEMS.field("hashtags").type),
            "language": pa.array([i.language for i in items], pa.string()),
            "region": pa.array([i.region for i in items], pa.string()),
        },
        schema=ITEMS,
    )


__all__ = ["ITEMS_TOPIC", "Item", "decode_item", "encode_item", "item_record", "items_from_table", "items_table"]
