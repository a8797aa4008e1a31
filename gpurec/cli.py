"""`gpurec` console command: one subcommand per pipeline stage.

Each subcommand lives next to the stage it runs, as a module with `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `gpurec --help` and
`gpurec <cmd> --help` stay fast (no torch import).

Error policy: bad input (a `gpurec.errors.GpurecError`, or a bad argument) is reported as exactly
one line on stderr, ``gpurec <command>: <what was wrong>``, exit code 2. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from gpurec.errors import GpurecError

EXIT_BAD_INPUT = 2

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("gpurec.data.generate", "write the synthetic short-video world (or a real dataset) as logs"),
    "preprocess": ("gpurec.preprocess.command", "turn logs into training features + manifest (Polars, CPU or GPU)"),
    "train": ("gpurec.train.command", "train the multi-task DLRM on sharded TorchRec tables (torchrun-ready)"),
    "evaluate": ("gpurec.train.evaluate_command", "score a checkpoint vs popularity, logistic regression and the oracle"),
    "export": ("gpurec.serve.export_command", "write a trained checkpoint as a versioned Triton model repository"),
    "serve": ("gpurec.serve.serve_command", "run Triton Inference Server on a model repository (loopback, Ctrl-C stops)"),
    "recommend": ("gpurec.client.recommend_command", "ask Triton for users' top-k items through the client (starts a server if no --url)"),
    "consent": ("gpurec.client.consent_command", "change a user's personalisation / training consent on a running server (next request)"),
    "join": ("gpurec.stream.join_command", "join served rows with actions into labelled examples, exactly once (long-running)"),
    "simulate": ("gpurec.client.simulate_command", "drive the feed with the synthetic world's users live: requests, actions, uploads on the log"),
    "demo": ("gpurec.demo", "the whole pipeline on the embedded default: batch stages, then the live feed, joiner and simulated users"),
    "pseudonym": ("gpurec.data.pseudonym_command", "make a pseudonym key, or rotate raw logs' user ids to a new key"),
    "forget": ("gpurec.privacy.forget_command", "erase a user from a workspace (store, log, Parquet, checkpoints, deltas, repo) and verify"),
    "export-user": ("gpurec.privacy.export_command", "write what the system observed about one user (events, profile, consent history) as JSON"),
    "retention": ("gpurec.privacy.retention_command", "delete a workspace's data older than its retention windows (raw, features, topics, deltas, logs)"),
    "experiment": ("gpurec.experiments.command", "reproducible studies, e.g. collisionless vs hashed embedding tables at equal memory"),
}


class UsageError(GpurecError):
    """A command line argparse refused (unknown flag, missing or out-of-range value)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a refused command line raises UsageError (one line, exit 2, no usage block).

    Sub-parsers (`gpurec experiment <study>`) are made of this class too, since argparse creates
    them with the parent's class.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ---- the command ----------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="gpurec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with '; ')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Parse the command name first, then let only that command's module define its arguments.
    if not argv or argv[0] not in COMMANDS:
        try:
            build_parser().parse_args(argv)
        except UsageError as err:
            print(f"gpurec: {one_line(err)} (`gpurec --help` lists the commands)", file=sys.stderr)
        return EXIT_BAD_INPUT
    name = argv[0]
    module_name, help_text = COMMANDS[name]
    if name == "train" and "--online" in argv[1:]:
        # Online training reads the event log, downstream of the train stage: its own module.
        module_name, help_text = "gpurec.sync.online_command", "train on the event log's examples as they arrive"
    module = importlib.import_module(module_name)
    cmd_parser = ArgumentParser(prog=f"gpurec {name}", description=help_text)
    module.add_arguments(cmd_parser)
    try:
        args = cmd_parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    except GpurecError as err:
        print(f"gpurec {name}: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
