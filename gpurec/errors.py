"""The errors gpurec raises for bad input: the one thing `gpurec <command>` reports without a traceback.

Library code raises a `GpurecError` (or a subclass) when the *input* is wrong: a missing file, a
malformed config, a value out of range, a log missing a column. The console command catches exactly
these and prints one line, ``gpurec <command>: <message>``, exit code 2. Anything else is a bug and
keeps its traceback. The message must say what was wrong and, where it helps, what to do instead.
"""

from __future__ import annotations


class GpurecError(Exception):
    """Bad input to a gpurec stage (reported as one line by the console command, exit 2)."""


class InputNotFound(GpurecError, FileNotFoundError):
    """A file or directory a stage reads does not exist (or is not what it should be)."""


class InvalidInput(GpurecError, ValueError):
    """A value, file or config is present but wrong (out of range, wrong shape, missing column)."""


class OutputExists(InvalidInput, FileExistsError):
    """An output directory already holds what the run would write (appending would double rows)."""
