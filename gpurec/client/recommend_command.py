"""`gpurec recommend`: ask a Triton server for a few users' top-k items through `gpurec.client`.

    gpurec recommend --repo runs/demo/repo --features runs/demo/features --users 3 --k 5
    gpurec recommend --repo runs/demo/repo --url 127.0.0.1:8001 --protocol grpc --features ...

Without `--url` it starts Triton on `--repo` itself and stops it when done, even on failure (what
`make demo` runs). Users and candidates come from the preprocessed feature files (the dense
features would come from a feature store; it does not exist yet): each user's context is their
first row of the split, the candidates are the split's first `--candidates` distinct items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gpurec.checks import port, positive_int, require_dir
from gpurec.errors import InputNotFound, InvalidInput


def _host_port(text: str) -> str:
    host, colon, number = text.rpartition(":")
    if not colon or not host or "/" in text:
        raise argparse.ArgumentTypeError(f"must be host:port (e.g. 127.0.0.1:8001), got {text!r}")
    try:
        port(number)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be host:port with a port 1-65535, got {text!r}") from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, type=Path, help="model repository (its newest contract.json; served if no --url)")
    parser.add_argument("--features", required=True, type=Path, help="preprocessed features (gpurec preprocess --out)")
    parser.add_argument("--url", type=_host_port, default=None, help="host:port of a running server (default: start one on --repo)")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    parser.add_argument("--split", default="test", help="split to take users and candidates from (default: test)")
    parser.add_argument("--users", type=positive_int, default=3, help="how many users (default: 3)")
    parser.add_argument("--candidates", type=positive_int, default=50, help="candidates per user (default: 50)")
    parser.add_argument("--k", type=positive_int, default=5, help="items to recommend per user (default: 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def is_user_feature(name: str) -> bool:
    """Per-user (request context) features; everything else describes the candidate item."""
    return name.startswith("user") or name in ("device", "hour")


def requests_from_features(contract: Any, features: Path, split: str, users: int, candidates: int, k: int) -> list[tuple[int, Any]]:
    """(raw user id, RecommendRequest) for `users` users sharing one pool of `candidates` items, from the feature files.

    InputNotFound / InvalidInput when `features` is no features directory or the split has no rows.
    """
    import polars as pl

    from gpurec.client import RecommendRequest
    from gpurec.preprocess.manifest import load_manifest

    manifest = load_manifest(features)
    files = manifest.require_rows(split, features)
    frame = pl.concat([pl.read_parquet(f) for f in files], how="vertical_relaxed")
    names = {n: f"dense_{n}" for n in contract.dense_features}
    names |= {n: f"sparse_{n}" for n in (*contract.sparse_features, *contract.multi_valued_features)}
    items = frame.unique("item_id", keep="first", maintain_order=True).head(candidates)
    people = frame.unique("user_id", keep="first", maintain_order=True).head(users)
    if items.height == 0 or people.height == 0:
        raise InvalidInput(f"the {split!r} split of {features} has no rows")
    pool = {n: items[c].to_list() for n, c in names.items() if not is_user_feature(n)}
    out = []
    for row in people.iter_rows(named=True):
        user = {n: row[c] for n, c in names.items() if is_user_feature(n)}
        out.append((row["user_id"], RecommendRequest(user, pool, k, items["item_id"].to_numpy())))
    return out


def _contract(repo: Path) -> Any:
    """The newest serving contract in --repo; InputNotFound when there is none to read."""
    from gpurec.client import load_contract

    require_dir(repo, "--repo")
    try:
        return load_contract(repo)
    except FileNotFoundError as err:  # gpurec.client raises it for a missing or unreadable contract
        raise InputNotFound(f"--repo {repo}: {err}") from None


def run(args: argparse.Namespace) -> int:
    from gpurec.client import ClientError, RankerClient

    contract = _contract(args.repo)
    if args.candidates > contract.max_batch_size:
        raise InvalidInput(
            f"--candidates {args.candidates} is more than the model's max_batch_size {contract.max_batch_size} "
            f"(rows per request); ask for fewer, or export with a larger --max-batch-size"
        )
    asks = requests_from_features(contract, args.features, args.split, args.users, args.candidates, args.k)
    server = None
    try:
        url = args.url
        if url is None:
            from gpurec.serve.server import TritonServer

            server = TritonServer(args.repo).start()
            url = server.grpc_url if args.protocol == "grpc" else server.http_url
            print(f"gpurec recommend: started tritonserver on {args.repo} ({args.protocol}://{url})", file=sys.stderr)
        with RankerClient(url, contract, protocol=args.protocol) as client:
            results = client.recommend_many([r for _, r in asks])
    except (ClientError, RuntimeError) as err:  # RuntimeError: TritonServerError (no server, not ready)
        print(f"gpurec recommend: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            code = server.stop()
            print(f"gpurec recommend: stopped tritonserver (exit code {code})", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "users": [
                {"user_id": int(user), "item_ids": rec.item_ids.tolist(), "scores": [round(float(s), 6) for s in rec.scores]}
                for (user, _), rec in zip(asks, results, strict=True)
            ]
        }))
        return 0
    print(f"top {args.k} of {len(asks[0][1].item_ids)} candidates per user ({args.protocol}):")
    for (user, _), rec in zip(asks, results, strict=True):
        items = "  ".join(f"{item}:{score:.4f}" for item, score in zip(rec.item_ids.tolist(), rec.scores.tolist(), strict=True))
        print(f"  user {user}: {items}")
    return 0
