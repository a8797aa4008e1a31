"""`gpurec experiment <study>`: reproducible studies over the whole pipeline.

    gpurec experiment collisionless                       # synthetic world + MovieLens-100K, 1 row per id
    gpurec experiment collisionless --datasets synthetic --rows-per-id 0.5,1,4 --json
    gpurec experiment online                              # frozen vs online (sync 5 s, 60 s, 10 min) vs daily retrain
    gpurec experiment online --quick                      # a small world, one seed: a minute or two

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
    "online": (
        "gpurec.experiments.online",
        "what online training buys on the drifting synthetic world: AUC per day of the frozen batch model, online "
        "training at several sync intervals (deterministic replay) and a daily batch retrain",
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


def _online_arguments(parser: argparse.ArgumentParser) -> None:
    # World and training flags default to None so that --quick can fill them (an explicit flag wins);
    # the defaults named in the help are gpurec.experiments.online's (DEFAULT_WORLD, QUICK).
    parser.add_argument("--out", type=Path, default=Path("runs/experiment-online"), help="work directory (replaced runs)")
    parser.add_argument("--seeds", default=None, help="comma-separated; each seeds the world and training (default: 7,8,9)")
    parser.add_argument("--users", type=positive_int, default=None, help="synthetic world users (default: 2000)")
    parser.add_argument("--items", type=positive_int, default=None, help="synthetic world items (default: 5000)")
    parser.add_argument("--days", type=positive_int, default=None, help="simulated days (default: 7)")
    parser.add_argument("--train-days", type=positive_int, default=None, help="batch training days before serving starts (default: 3)")
    parser.add_argument("--sync-every", default="5,60,600", help="online variants: simulated seconds between syncs (default: 5,60,600)")
    parser.add_argument(
        "--label-delay", type=float, default=600.0, help="simulated seconds from impression to training example: the joiner's window (default: 600)"
    )
    parser.add_argument(
        "--window", type=float, default=0.0, help="the online trainer steps once per this many simulated seconds (default 0: the shortest sync)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=512, help="most examples in one online step (default: 512)")
    parser.add_argument(
        "--reference-batch",
        type=non_negative_int,
        default=None,
        help="an online step of n examples weighs its loss by n / this (default: the batch runs' batch_size; 0: a plain mean)",
    )
    parser.add_argument(
        "--direct-sync", default="5", help="sync intervals applied in memory instead of through delta files, too slow at 5 s (default: 5; '' for none)"
    )
    parser.add_argument("--epochs", type=positive_int, default=None, help="batch training epochs (default: 2; no valid split here to stop on)")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="stop each batch training run after this many steps")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1, the fastest on a shared 2-core machine)")
    parser.add_argument(
        "--quick", action="store_true", help="a small world for CI: 200 users, 500 items, 4 days, 2 training days, seed 7, 1 epoch"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with every result")


def _online_check(study: ModuleType, args: argparse.Namespace) -> None:
    output_dir(args.out, "--out")
    if args.label_delay < 0 or args.window < 0:
        raise InvalidInput("--label-delay and --window must not be negative")
    study.study_from_args(args)  # parses the lists and checks the days: InvalidInput names the flag


_ARGUMENTS = {"collisionless": _collisionless_arguments, "online": _online_arguments}
# study -> check of its arguments, run before the study: bad input is reported as one line, exit 2.
_CHECKS = {"collisionless": _collisionless_check, "online": _online_check}


def run(args: argparse.Namespace) -> int:
    module_name, _help = STUDIES[args.study]
    study = importlib.import_module(module_name)
    _CHECKS[args.study](study, args)
    return int(study.run(args) or 0)
