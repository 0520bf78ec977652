"""Printing helpers shared by the command groups: JSON for scripts, rich for people."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.table import Table


@dataclass
class State:
    """Global options, stored on the Typer context."""

    debug: bool = False
    tracking_uri: str | None = None


# How each audit verdict is shown.
VERDICT_COLORS = {
    "compatible": "green",
    "warning": "yellow",
    "incompatible": "red",
    "unaudited": "red",
}


def state(ctx: typer.Context) -> State:
    """The global options of the current invocation."""
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def registry(ctx: typer.Context) -> Any:
    """The registry at the store this invocation resolves (imports mlflow: call inside commands)."""
    from dynaflip_adapt import activity
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    store = resolve_store(state(ctx).tracking_uri)
    with activity.step(f"opening the registry at {store.tracking_uri}"):
        return Registry(store)


# Width of tables written to a pipe or file when COLUMNS is unset: rich would assume 80 and
# truncate the audit's and benchmark's tables ("0.1…") in CI logs.
PIPE_WIDTH = 160


def console() -> Console:
    """A console on stdout (rebuilt each time so CliRunner's captured stdout is used)."""
    tty = hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
    width = None if tty or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=sys.stdout, soft_wrap=True, width=width)


def err_console() -> Console:
    """A console on stderr."""
    return Console(file=sys.stderr, soft_wrap=True, highlight=False)


def progress_enabled(as_json: bool) -> bool:
    """Whether to draw progress on stderr: always for people; with --json only when stderr is
    a terminal (the JSON goes to stdout, so a bar there does not disturb it)."""
    return not as_json or err_console().is_terminal


def print_json(data: Any) -> None:
    """Writes JSON to stdout (no colour, no wrapping: for scripts)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def print_fit(fit: object) -> None:
    """The strengths tried by `fit_strength` and why each passed or failed."""
    from dynaflip_adapt.eval.strength import StrengthFit

    assert isinstance(fit, StrengthFit)
    table = Table(title=f"strength fit (budget {fit.budget:g} x tolerance)")
    for col in ("strength", "passed", "verdict", "own-frame deviation", "failed"):
        table.add_column(col)
    for t in fit.trials:
        table.add_row(
            f"{t.strength:.4f}",
            "yes" if t.passed else "[red]no[/]",
            t.verdict,
            ", ".join(f"{k} {v:.3f}" for k, v in t.own_deviation.items()),
            "; ".join(t.failed),
        )
    console().print(table)
    if fit.hint:
        err_console().print(f"[yellow]hint:[/] {fit.hint}", highlight=False)
