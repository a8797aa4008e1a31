"""`gpurec consent`: change a user's consent on a running server, effective at their next request.

    gpurec consent --url 127.0.0.1:8001 --repo runs/demo/repo --user 42 --personalisation off
    gpurec consent --url 127.0.0.1:8001 --repo runs/demo/repo --user 42 --training off --json

Calls the `consent` model through `RankerClient.set_consent`: the user's profile in the online
feature store and a `ConsentChange` on the event log's `consent` topic (`gpurec.serve.consent`).
A flag not given keeps its value. `--repo` is the served repository (the client checks requests
against its contract). A refused change (an unknown user) is bad input: one line, exit 2; a server
that cannot be reached or fails: one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpurec.checks import non_negative_int
from gpurec.client.recommend_command import _contract, _host_port
from gpurec.data.pseudonym import add_key_file_argument, load_pseudonymizer
from gpurec.errors import InvalidInput

ON_OFF = {"on": True, "off": False}


def _int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer user id, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be a 64-bit integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, type=_host_port, help="host:port of the running server")
    parser.add_argument("--repo", required=True, type=Path, help="the served model repository (its contract)")
    parser.add_argument("--user", required=True, type=_int64, help="the user's id")
    parser.add_argument("--personalisation", choices=tuple(ON_OFF), default=None, help="personalised feed: on or off")
    parser.add_argument("--training", choices=tuple(ON_OFF), default=None, help="use of their data for training: on or off")
    parser.add_argument("--ts-ms", type=non_negative_int, default=None, help="event time of the change (default: the server's clock)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    add_key_file_argument(parser, "--user is a raw id, sent as its pseudonym under this key")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from gpurec.client import ClientError, InvalidRequest, RankerClient

    if args.personalisation is None and args.training is None:
        raise InvalidInput("give --personalisation on|off, --training on|off, or both")
    pseudonymizer = load_pseudonymizer(args.pseudonym_key_file)
    contract = _contract(args.repo)
    personalisation = None if args.personalisation is None else ON_OFF[args.personalisation]
    training = None if args.training is None else ON_OFF[args.training]
    try:
        with RankerClient(args.url, contract, protocol=args.protocol, pseudonymizer=pseudonymizer) as client:
            result = client.set_consent(args.user, personalisation=personalisation, training=training, ts_ms=args.ts_ms)
    except InvalidRequest as err:  # e.g. an unknown user: the caller's input
        raise InvalidInput(str(err)) from None
    except ClientError as err:
        print(f"gpurec consent: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    flags = {"personalisation": result.personalisation, "training": result.training}
    if args.json:
        print(json.dumps({"user_id": result.user_id, **flags, "ts_ms": result.ts_ms}))
    else:
        shown = ", ".join(f"{name} {'on' if flag else 'off'}" for name, flag in flags.items())
        print(f"user {result.user_id}: {shown} (event time {result.ts_ms})")
    return 0
