"""Errors raised by the library.

Library code never prints or exits: it raises a `DynaflipError` subclass whose message names the
file, the key, what was found and what was expected. Only `dynaflip_adapt.cli` turns these into
one-line messages and exit codes.

Exit codes (stable, documented in the README):

====  =======================================================
0     success
1     a check ran and failed (validation found problems, audit incompatible)
2     bad input or usage (malformed logs, bad recipe, unknown name)
3     runtime failure (training diverged, registry unreachable, disk full)
130   interrupted (Ctrl-C)
143   terminated (SIGTERM): handled like Ctrl-C
====  =======================================================
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class DynaflipError(Exception):
    """Base class of every error the library raises on purpose."""

    exit_code: int = EXIT_RUNTIME


class InputError(DynaflipError):
    """Bad user input: a malformed file, a missing key, a wrong shape or value, an unknown name.

    The message reads ``FILE: KEY: found FOUND, expected EXPECTED`` so that a user can go straight
    to the offending entry.

    Args:
        file: The file (or name) the problem is in; ``None`` when there is no file.
        key: The key inside the file (HDF5 path, recipe field, option name).
        found: What was found, in words.
        expected: What was expected, in words.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(
        self,
        file: str | Path | None,
        key: str | None,
        found: str,
        expected: str,
    ) -> None:
        self.file = None if file is None else str(file)
        self.key = key
        self.found = found
        self.expected = expected
        super().__init__(format_problem(self.file, key, found, expected))


class CheckFailed(DynaflipError):
    """A check ran to completion and its verdict is negative (exit code 1)."""

    exit_code = EXIT_CHECK_FAILED


class RuntimeFailure(DynaflipError):
    """The work could not be done for a reason other than the input (exit code 3)."""

    exit_code = EXIT_RUNTIME


def format_problem(file: str | None, key: str | None, found: str, expected: str) -> str:
    """Formats one problem as ``FILE: KEY: found FOUND, expected EXPECTED``."""
    parts = [p for p in (file, key) if p]
    where = ": ".join(parts)
    body = f"found {found}, expected {expected}"
    return f"{where}: {body}" if where else body
