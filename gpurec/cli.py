"""`gpurec` console command: one subcommand per pipeline stage.

Each subcommand lives next to the stage it runs, as a module with `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `gpurec --help` and
`gpurec <cmd> --help` stay fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("gpurec.data.generate", "write the synthetic short-video world (or a real dataset) as logs"),
    "preprocess": ("gpurec.preprocess.command", "turn logs into training features + manifest (Polars, CPU or GPU)"),
    "train": ("gpurec.train.command", "train the multi-task DLRM on sharded TorchRec tables (torchrun-ready)"),
    "evaluate": ("gpurec.train.evaluate_command", "score a checkpoint vs popularity, logistic regression and the oracle"),
    "export": ("gpurec.serve.export_command", "write a trained checkpoint as a versioned Triton model repository"),
    "serve": ("gpurec.serve.serve_command", "run Triton Inference Server on a model repository (loopback, Ctrl-C stops)"),
    "recommend": ("gpurec.client.recommend_command", "ask Triton for users' top-k items through the client (starts a server if no --url)"),
    "experiment": ("gpurec.experiments.command", "reproducible studies, e.g. collisionless vs hashed embedding tables at equal memory"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpurec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let only that command's module define its arguments.
    if argv and argv[0] in COMMANDS:
        module_name, help_text = COMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        cmd_parser = argparse.ArgumentParser(prog=f"gpurec {argv[0]}", description=help_text)
        module.add_arguments(cmd_parser)
        args = cmd_parser.parse_args(argv[1:])
        return int(module.run(args) or 0)
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
