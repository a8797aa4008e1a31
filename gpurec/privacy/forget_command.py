"""`gpurec forget`: erase a user from a workspace, then check that nothing of them is left.

    gpurec forget --workspace runs/demo --user 42              # request + purge + verify
    gpurec forget --workspace runs/demo --user 42 --no-purge   # the request only (loop running)
    gpurec forget --workspace runs/demo --user 42 --verify     # only search every artifact
    gpurec forget ... --pseudonym-key-file key                  # --user is the raw id

The steps and what each touches are in `gpurec.privacy.forget`. Exit 0 when the verifier finds
no trace of the user; 1 when it finds one (each trace is printed, or listed in the --json object);
2 for bad input (one line). Running it again finishes an interrupted erasure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpurec.checks import positive_float
from gpurec.client.consent_command import _int64
from gpurec.data.pseudonym import add_key_file_argument, load_pseudonymizer
from gpurec.workspace import Workspace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", required=True, type=Path, help="the deployment's workspace directory")
    parser.add_argument("--user", required=True, type=_int64, help="the user's id (raw when a pseudonym key is given)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--verify", action="store_true", help="only search every artifact for the user (changes nothing)")
    what.add_argument("--no-purge", action="store_true", help="only the request: store + `consent` topic (the loop acts on it)")
    parser.add_argument("--wait-s", type=positive_float, default=10.0, help="how long to wait for a running online trainer")
    add_key_file_argument(parser, "the key that pseudonymised the user ids")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.model.library_warnings import quiet_library_warnings
    from gpurec.privacy.forget import forget_user, verify

    quiet_library_warnings()
    ws = Workspace.open(args.workspace)
    pseudonymizer = load_pseudonymizer(args.pseudonym_key_file)
    user_id = pseudonymizer.pseudonym(args.user) if pseudonymizer is not None else args.user
    if args.verify:
        report = {"user": args.user, **verify(ws, args.user, user_id)}
    else:
        report = forget_user(ws, args.user, pseudonymizer, purge=not args.no_purge, wait_s=args.wait_s)
    verification = report.get("verification")
    if args.json:
        print(json.dumps(report, default=str))
    else:
        _print(report)
    return 0 if verification is None or verification["verified"] else 1


def _print(report: dict) -> None:
    user = report["user"]
    if "request" in report:
        print(f"forget {user}: feature store {report['feature_store']}; request on `consent` at {report['request']}")
    if "purged" in report:
        acknowledged = "acknowledged" if report.get("trainer_acknowledged") else "not running (checkpoints rewritten)"
        print(f"forget {user}: online trainer {acknowledged}; purged {json.dumps(report['purged'], default=str)}")
    verification = report.get("verification")
    if verification is not None:
        traces = verification.get("traces", [])
        verdict = "no trace left" if verification["verified"] else f"{len(traces)} traces left"
        print(f"verify {user}: {verdict} ({verification.get('searched', '')})")
        for trace in traces:
            print(f"  {trace}")
