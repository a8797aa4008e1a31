"""`gpurec export-user`: write what the system observed about one user as a readable JSON file.

    gpurec export-user --workspace runs/demo --user 42                 # runs/demo/privacy/export-42.json
    gpurec export-user --workspace runs/demo --user 42 --pseudonym-key-file key --out /tmp/42.json

`--user` is the id as the user knows it; with a pseudonym key (the workspace's ids are
pseudonyms) the export searches for its pseudonym and names both. A user the workspace holds
nothing of is bad input (one line, exit 2). See `gpurec.privacy.export_user` for what is in it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpurec.client.consent_command import _int64
from gpurec.data.pseudonym import add_key_file_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", required=True, type=Path, help="the deployment's workspace directory")
    parser.add_argument("--user", required=True, type=_int64, help="the user's id (raw, as the user knows it)")
    add_key_file_argument(parser, "--user is a raw id; the workspace stores its pseudonym under this key")
    parser.add_argument("--out", type=Path, default=None, help="the file to write (default: WORKSPACE/privacy/export-<user>.json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (the path and counts)")


def run(args: argparse.Namespace) -> int:
    from gpurec.data.pseudonym import load_pseudonymizer
    from gpurec.errors import InvalidInput
    from gpurec.privacy.export_user import export_user, write_export
    from gpurec.workspace import Workspace

    workspace = Workspace.open(args.workspace)
    out = args.out if args.out is not None else workspace.privacy / f"export-{args.user}.json"
    if out.is_dir():
        raise InvalidInput(f"--out {out} is a directory; give a file name")
    export = export_user(workspace, args.user, load_pseudonymizer(args.pseudonym_key_file))
    path = write_export(export, out)
    if args.json:
        print(json.dumps({"path": str(path), "user_id": args.user, "counts": export["counts"]}))
    else:
        counts = ", ".join(f"{name} {n}" for name, n in export["counts"].items() if n)
        print(f"wrote {path} ({counts})")
    return 0
