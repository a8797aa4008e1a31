"""`gpurec pseudonym`: make a key, or rotate raw logs from one pseudonym key to another.

    gpurec pseudonym new-key --out runs/demo/keys/pseudonym.key
    gpurec pseudonym rotate --logs runs/demo/raw --out runs/demo/raw-rotated \\
        --old-key-file old.key --new-key-file new.key [--raw-ids ids.txt]

Rotation re-derives every user id: a pseudonym is one-way, so it needs the raw ids (`--raw-ids`, a
text file of one id per line, from the account database at the edge; by default the world's users
from `--logs`/world.json). It writes a new log directory (the old one is left for the operator to
delete once downstream has moved), refuses logs whose recorded key id is not the old key's, and
refuses a log user id that no raw id maps to. Downstream of the logs see `gpurec.data.pseudonym`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from gpurec.checks import require_dir, require_file
from gpurec.data import logs
from gpurec.data.pseudonym import (
    Pseudonymizer,
    check_key_id,
    load_key,
    new_key_file,
    read_key_id,
    remap_user_ids,
    rotation_map,
    write_key_id,
)
from gpurec.data.schema import LOGS
from gpurec.errors import InvalidInput, OutputExists

USER_ID_LOGS = tuple(name for name, spec in LOGS.items() if "user_id" in spec.schema.names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    new = sub.add_parser("new-key", help="write a fresh random key file (mode 600)")
    new.add_argument("--out", required=True, type=Path, help="the key file to create (never overwritten)")
    rotate = sub.add_parser("rotate", help="copy raw logs with every user id moved from the old key to the new")
    rotate.add_argument("--logs", required=True, type=Path, help="raw logs written with the old key")
    rotate.add_argument("--out", required=True, type=Path, help="new log directory (must not hold logs)")
    rotate.add_argument("--old-key-file", required=True, type=Path)
    rotate.add_argument("--new-key-file", required=True, type=Path)
    rotate.add_argument("--raw-ids", type=Path, default=None, help="raw user ids, one per line (default: the world's)")
    for action in (new, rotate):
        action.add_argument("--json", action="store_true", help="print one JSON object")


def _raw_ids(path: Path | None, log_root: Path) -> list[int]:
    if path is not None:
        require_file(path, "--raw-ids")
        try:
            return [int(line) for line in path.read_text().split()]
        except ValueError:
            raise InvalidInput(f"--raw-ids {path}: expected one integer user id per line") from None
    from gpurec.data.generate import WORLD_FILE, load_world_config
    from gpurec.data.world import World

    if not (log_root / WORLD_FILE).is_file():
        raise InvalidInput(f"--logs {log_root} has no {WORLD_FILE}; give the raw user ids with --raw-ids")
    return World(load_world_config(log_root)).user_ids.tolist()


def rotate_logs(log_root: Path, out: Path, old: Pseudonymizer, new: Pseudonymizer, raw_ids: list[int]) -> dict:
    """Copy `log_root` to `out` with the user ids of `old` replaced by those of `new`; a summary."""
    check_key_id((f"{log_root}", read_key_id(log_root)), ("--old-key-file", old.key_id))
    if out.resolve() == log_root.resolve():
        raise InvalidInput("--out must differ from --logs (a half-rotated directory would mix two keys)")
    if out.exists() and any(out.iterdir()):
        raise OutputExists(f"{out} is not empty; rotate into a new directory")
    mapping = rotation_map(raw_ids, old, new)
    shutil.copytree(log_root, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*USER_ID_LOGS))
    rows = 0
    for log in USER_ID_LOGS:
        for day in logs.list_days(log_root, log):
            for part in logs.day_files(log_root, log, [day]):
                table = remap_user_ids(pq.read_table(part), mapping)
                logs.write_day(table, out, log, day)
                rows += table.num_rows
    write_key_id(out, new.key_id)  # last: a crash before it leaves a directory that says "old key"
    return {"logs": str(log_root), "out": str(out), "old_key_id": old.key_id, "new_key_id": new.key_id,
            "users": mapping.num_rows, "rows_rewritten": rows}


def run(args: argparse.Namespace) -> int:
    if args.action == "new-key":
        path = new_key_file(args.out)
        result = {"key_file": str(path), "key_id": Pseudonymizer(load_key(path)).key_id}
    else:
        require_dir(args.logs, "--logs")
        old, new = Pseudonymizer(load_key(args.old_key_file)), Pseudonymizer(load_key(args.new_key_file))
        if old.key_id == new.key_id:
            raise InvalidInput("--old-key-file and --new-key-file hold the same key")
        result = rotate_logs(args.logs, args.out, old, new, _raw_ids(args.raw_ids, args.logs))
    print(json.dumps(result) if args.json else " ".join(f"{k}={v}" for k, v in result.items()))
    return 0
