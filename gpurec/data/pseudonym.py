"""Pseudonymous user ids: raw ids are replaced at the edge by a keyed hash (issue 12, item 3).

Design
------
- **What.** ``pseudonym(raw) = 1 + (int.from_bytes(HMAC-SHA256(key, raw as 8 bytes big-endian)[:8]) mod (2^63 - 1))``,
  a positive int64 (the schema's id type; TorchRec keys are int64). Without the key nobody can go from
  a raw id to its pseudonym or back (HMAC is a PRF; the raw ids, small sparse integers, could be
  enumerated against a *plain* hash in seconds, which is why the hash is keyed).
- **The key** lives outside the data: a file named by ``--pseudonym-key-file`` or the environment
  variable ``GPUREC_PSEUDONYM_KEY_FILE``. Never the key itself in the environment: environments leak
  into child processes, ``/proc/<pid>/environ`` and crash reports. The file must be a regular file,
  not readable by group or others (mode ``0600``/``0400``), and hold at least 16 bytes (surrounding
  whitespace is ignored); ``new_key_file`` writes 32 random bytes as 64 hex characters with mode 0600.
  The key never appears in ``repr``/``str``, logs or exception messages (errors name the file).
- **Key id.** ``key_id = HMAC-SHA256(key, "gpurec-key-id")[:4].hex()``: 8 non-secret hex characters
  written wherever pseudonymous ids are (``pseudonym.json`` beside the raw logs). Data carrying two
  key ids is refused (``check_key_id``), so logs of two keys are never joined by accident: the
  same person would be two users, two different people could not collide but would never match.
- **Collisions.** 63 bits: by the birthday bound the chance that any two of n users share a
  pseudonym is about n^2 / 2^64: 5e-8 at a million users, 5e-4 at 100 million. ``pseudonymize``
  checks its batch anyway (distinct raw ids must give distinct pseudonyms) and raises rather than
  merge two people's histories; the remedy is a new key (rotation).
- **The edge, batch.** ``gpurec generate --pseudonym-key-file K`` writes pseudonyms into every
  ``user_id`` column it writes (users, impressions; actions and the oracle carry no user id) and
  records the key id in ``pseudonym.json``. The key is opt-in: without it the logs keep the world's
  raw ids (the demo and the tests' worlds). The simulator's ground truth (``world.json``, which
  regenerates the world, and the oracle) is the *world's* side, the people, not the platform's data.
- **The edge, live.** The client is the app server: it holds the key and maps raw -> pseudonym
  before a request leaves (``RankerClient(..., pseudonymizer=...)``), so the feed model, the feature
  store, the event log, the joiner's examples and the model only ever see pseudonyms, and the key
  is never in the serving tier (``gpurec consent --pseudonym-key-file`` likewise takes a raw id).
  ``gpurec simulate --pseudonym-key-file`` is the simulated app: the world's raw users go out as the
  same pseudonyms ``generate`` wrote (requests, actions, the profiles it puts in the store), and a
  key other than the one recorded beside ``--world`` is refused.
- **Rotation** changes every user id: a pseudonym cannot be inverted, so the migration needs the
  raw ids (the account database at the edge; for the synthetic world, ``world.json``).
  ``rotation_map`` gives old -> new for a list of raw ids; ``rotate_logs`` (``gpurec pseudonym
  rotate``) rewrites the logs' user ids and their key id. Everything derived from ids must then be
  re-derived: rerun preprocess (features, the user dimension) and retrain or re-key the user rows of
  the embedding tables (a hashed table puts the new id in a different row, so its learnt row is
  lost; a collisionless id map can re-key old -> new with the same map); the online feature store is
  refilled from the new features and the event log started afresh (its records carry old ids).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from gpurec.errors import InputNotFound, InvalidInput

if TYPE_CHECKING:  # pyarrow only where columns are mapped: the client imports this module without it
    import pyarrow as pa

KEY_FILE_ENV = "GPUREC_PSEUDONYM_KEY_FILE"
METADATA_FILE = "pseudonym.json"
SCHEME = "hmac-sha256-63"
MIN_KEY_BYTES = 16
_INT63 = (1 << 63) - 1
_KEY_ID_MESSAGE = b"gpurec-key-id"


class Pseudonymizer:
    """Maps raw user ids to pseudonymous ones with one secret key (see the module docstring)."""

    __slots__ = ("_mac", "key_id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
            raise InvalidInput(f"a pseudonym key must be at least {MIN_KEY_BYTES} bytes")
        # Keyed once; each id copies the keyed state (about 2x faster than hmac.new per id).
        self._mac = hmac.new(bytes(key), digestmod=hashlib.sha256)
        mac = self._mac.copy()
        mac.update(_KEY_ID_MESSAGE)
        self.key_id: str = mac.hexdigest()[:8]

    def __repr__(self) -> str:
        return f"Pseudonymizer(key_id={self.key_id})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # A pickled pseudonymizer would write the key into whatever stores the pickle.
        raise TypeError("a Pseudonymizer is not picklable: it holds the secret key")

    def pseudonym(self, raw_user_id: int) -> int:
        """The pseudonymous id (1 .. 2^63 - 1) of one raw user id (any int64)."""
        mac = self._mac.copy()
        mac.update(int(raw_user_id).to_bytes(8, "big", signed=True))
        return 1 + int.from_bytes(mac.digest()[:8], "big") % _INT63

    def pseudonymize(self, raw_user_ids: pa.Array | pa.ChunkedArray | np.ndarray | Iterable[int]) -> pa.Array:
        """Vectorised: an int64 Arrow array of pseudonyms, one per input id, order kept.

        Hashes each distinct id once and maps the column through the distinct ids (a join), so a
        log of millions of rows costs one HMAC per user, not per row. Raises InvalidInput on nulls
        and on a pseudonym collision within the batch.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        ids = raw_user_ids if isinstance(raw_user_ids, pa.Array | pa.ChunkedArray) else pa.array(raw_user_ids, pa.int64())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        ids = ids.cast(pa.int64())
        if ids.null_count:
            raise InvalidInput("user ids to pseudonymize must not be null")
        unique = pc.unique(ids)
        hashed = np.fromiter((self.pseudonym(u) for u in unique.to_numpy()), dtype=np.int64, count=len(unique))
        if len(np.unique(hashed)) != len(hashed):
            raise InvalidInput(f"two user ids share a pseudonym under key {self.key_id}; rotate to a new key")
        return pa.array(hashed).take(pc.index_in(ids, value_set=unique))

    def replace_user_ids(self, table: pa.Table, column: str = "user_id") -> pa.Table:
        """`table` with its `column` of raw ids replaced by pseudonyms (schema unchanged)."""

        index = table.schema.get_field_index(column)
        field = table.schema.field(index)
        return table.set_column(index, field, self.pseudonymize(table[column]).cast(field.type))


# ---- the key ---------------------------------------------------------------------------------


def load_key(path: str | Path) -> bytes:
    """The key bytes in `path`; refuses a missing, empty, short or group/world-readable file.

    Errors name the file, never its content.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputNotFound(f"pseudonym key file {path} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInput(f"pseudonym key file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise InvalidInput(
            f"pseudonym key file {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            f"chmod 600 {path}"
        )
    key = path.read_bytes().strip()
    if not key:
        raise InvalidInput(f"pseudonym key file {path} is empty")
    if len(key) < MIN_KEY_BYTES:
        raise InvalidInput(f"pseudonym key file {path} holds fewer than {MIN_KEY_BYTES} bytes")
    return key


def add_key_file_argument(parser: argparse.ArgumentParser, use: str) -> None:
    """The `--pseudonym-key-file` flag of a command; `use` says what the key does there."""
    parser.add_argument(
        "--pseudonym-key-file",
        type=Path,
        default=None,
        help=f"{use} (a secret file, mode 600; default: ${KEY_FILE_ENV}, else raw ids)",
    )


def load_pseudonymizer(path: str | Path | None = None) -> Pseudonymizer | None:
    """The pseudonymizer of `path`, else of $GPUREC_PSEUDONYM_KEY_FILE, else None (raw ids)."""
    chosen = path if path is not None else os.environ.get(KEY_FILE_ENV) or None
    return None if chosen is None else Pseudonymizer(load_key(chosen))


def new_key_file(path: str | Path) -> Path:
    """Write a fresh random key (32 bytes as hex) to `path`, mode 0600; refuses to overwrite one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise InvalidInput(f"{path} already exists; a key is never overwritten (its ids would be lost)") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return path


# ---- key ids beside the data -------------------------------------------------------------------


def read_key_id(root: str | Path) -> str | None:
    """The key id recorded in `root`/pseudonym.json, or None when its ids are raw."""
    meta = Path(root) / METADATA_FILE
    return json.loads(meta.read_text())["key_id"] if meta.is_file() else None


def write_key_id(root: str | Path, key_id: str | None) -> None:
    """Record that the user ids under `root` are pseudonyms of key `key_id` (None: raw ids)."""
    meta = Path(root) / METADATA_FILE
    if key_id is None:
        meta.unlink(missing_ok=True)
    else:
        meta.parent.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"scheme": SCHEME, "key_id": key_id}) + "\n")


def check_key_id(*sources: tuple[str, str | None]) -> str | None:
    """The one key id shared by `(name, key_id)` sources; InvalidInput if they differ.

    None means raw ids; raw ids and pseudonyms are as incompatible as two keys.
    """
    seen = {key_id for _name, key_id in sources}
    if len(seen) > 1:
        described = ", ".join(f"{name}: {key_id or 'raw ids'}" for name, key_id in sources)
        raise InvalidInput(f"user ids from different pseudonym keys cannot be mixed ({described})")
    return next(iter(seen), None)


# ---- rotation --------------------------------------------------------------------------------


def rotation_map(raw_user_ids: Iterable[int] | pa.Array | np.ndarray, old: Pseudonymizer, new: Pseudonymizer) -> pa.Table:
    """old_user_id -> new_user_id for every raw id (the migration needs the raw ids: HMAC is one-way)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = pc.unique(pa.array(raw_user_ids, pa.int64()) if not isinstance(raw_user_ids, pa.Array) else raw_user_ids)
    return pa.table({"old_user_id": old.pseudonymize(raw), "new_user_id": new.pseudonymize(raw)})


def remap_user_ids(table: pa.Table, mapping: pa.Table, column: str = "user_id") -> pa.Table:
    """`table` with `column` mapped old -> new; an id missing from `mapping` is refused."""
    import pyarrow.compute as pc

    index = pc.index_in(table[column], value_set=mapping["old_user_id"].combine_chunks())
    if index.null_count:
        raise InvalidInput(f"{index.null_count} user ids are not in the rotation map (the raw ids given miss users)")
    field = table.schema.field(column)
    return table.set_column(table.schema.get_field_index(column), field, mapping["new_user_id"].combine_chunks().take(index))
