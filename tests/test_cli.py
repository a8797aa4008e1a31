"""The console command: every subcommand has --help, and --help does not import torch."""

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


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
