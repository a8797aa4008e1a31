"""`gpurec experiment <study>`: reproducible studies over the whole pipeline.

    gpurec experiment collisionless                       # synthetic world + MovieLens-100K, 1 row per id
    gpurec experiment collisionless --datasets synthetic --rows-per-id 0.5,1,4 --json

Arguments are defined here, without importing torch, so `--help` stays fast; a study's module is
imported only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType

from gpurec.checks import non_negative_int, output_dir, positive_int
from gpurec.errors import InvalidInput

# study -> (module with run(args), one-line help)
STUDIES: dict[str, tuple[str, str]] = {
    "collisionless": (
        "gpurec.experiments.collisionless",
        "collisionless vs hashed (id mod rows) embedding tables at equal memory: test AUC and collision rates",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    studies = parser.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, (_module, help_text) in STUDIES.items():
        study = studies.add_parser(name, help=help_text, description=help_text)
        _ARGUMENTS[name](study)


def _collisionless_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults mirror gpurec.experiments.collisionless (DEFAULT_WORLD, DEFAULT_OUT), kept literal
    # here so that --help does not import the study (and torch).
    parser.add_argument(
        "--datasets", default="synthetic,movielens-100k", help="comma-separated: synthetic, movielens-100k (or movielens)"
    )
    parser.add_argument(
        "--rows-per-id",
        default="1",
        help="memory settings, comma-separated (e.g. 0.5,1,4): table rows = this x the id-cardinality estimate (default: 1)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-collisionless"), help="work directory (replaced runs)")
    parser.add_argument("--seed", type=non_negative_int, default=7, help="seeds the synthetic world and training (default: 7)")
    parser.add_argument("--users", type=positive_int, default=2000, help="synthetic world users (default: 2000)")
    parser.add_argument("--items", type=positive_int, default=5000, help="synthetic world items (default: 5000)")
    parser.add_argument("--days", type=positive_int, default=7, help="synthetic world days (default: 7)")
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: each dataset's config)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop each training run after this many steps")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every result")


def _collisionless_check(study: ModuleType, args: argparse.Namespace) -> None:
    """The study's own parsers decide what --datasets and --rows-per-id accept."""
    output_dir(args.out, "--out")
    for flag, parse, text in (
        ("--datasets", study.parse_datasets, args.datasets),
        ("--rows-per-id", study.parse_rows_per_id, args.rows_per_id),
    ):
        try:
            parse(text)
        except ValueError as err:
            message = str(err)
            raise InvalidInput(message if message.startswith(flag) else f"{flag}: {message}") from None


_ARGUMENTS = {"collisionless": _collisionless_arguments}
# study -> check of its arguments, run before the study: bad input is reported as one line, exit 2.
_CHECKS = {"collisionless": _collisionless_check}


def run(args: argparse.Namespace) -> int:
    module_name, _help = STUDIES[args.study]
    study = importlib.import_module(module_name)
    _CHECKS[args.study](study, args)
    return int(study.run(args) or 0)
