"""The console command: every subcommand has --help, --help does not import torch, and a bad command
line is one stderr line, exit 2 (each command's bad input: tests/test_cli_errors.py)."""

import subprocess
import sys

import pytest

from gpurec.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"gpurec {command}" in capsys.readouterr().out


def test_help_is_light():
    code = "import sys; from gpurec.cli import main\ntry: main(['generate', '--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.mark.parametrize(
    ("argv", "fragment"), [(["frobnicate"], "invalid choice: 'frobnicate'"), ([], "required: COMMAND"), (["--bogus"], "required: COMMAND")]
)
def test_unknown_command_is_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpurec: ") and fragment in lines[0]
    assert "gpurec --help" in lines[0]  # where the list of commands is


def test_top_level_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "generate" in capsys.readouterr().out


def test_argparse_errors_have_no_usage_block(capsys):
    assert main(["generate", "--users"]) == 2
    err = capsys.readouterr().err
    assert err == "gpurec generate: argument --users: expected one argument\n"
