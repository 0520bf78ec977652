"""A rich progress bar with live losses and throughput for training loops."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dynaflip_adapt import activity
from dynaflip_adapt.cli.output import err_console


@contextlib.contextmanager
def spinner(console: Console | None = None) -> Iterator[None]:
    """Shows the library's current `activity.step` as a spinner on stderr while the block runs
    (only on a terminal: logs and pipes get no animation, and stdout stays for --json)."""
    con = console or err_console()
    if not con.is_terminal:
        yield
        return
    status = con.status("", spinner="dots")
    shown = False

    def show(message: str | None) -> None:
        nonlocal shown
        if message is None:
            if shown:
                status.stop()
                shown = False
            return
        status.update(f"{message} ...")
        if not shown:
            status.start()
            shown = True

    with activity.listen(show):
        try:
            yield
        finally:
            if shown:
                status.stop()


@contextlib.contextmanager
def count_progress(title: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient bar over `total` items on stderr; yields ``advance()``."""
    with (
        activity.quiet(),
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console(),
            transient=True,
            disable=not enabled,
        ) as progress,
    ):
        bar = progress.add_task(title, total=total)
        yield lambda: progress.advance(bar)


@contextlib.contextmanager
def logged_training(
    title: str,
    total: int,
    run: Any,
    log_every: int,
    *,
    enabled: bool = True,
    keys: tuple[str, ...] = ("loss",),
) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """`training_progress` that also logs metrics to an MLflow run every `log_every` steps
    (and at the last); yields the ``on_step(step, metrics)`` callback for the training loop."""
    from dynaflip_adapt.workflows.adapt import mlflow_steps

    with (
        training_progress(title, total, enabled=enabled, keys=keys) as bar,
        mlflow_steps(title, total, run, log_every, keys) as log,
    ):

        def on_step(step: int, metrics: dict[str, float]) -> None:
            bar(step, metrics)
            log(step, metrics)

        yield on_step


@contextlib.contextmanager
def training_progress(
    title: str,
    total: int,
    start: int = 0,
    *,
    enabled: bool = True,
    keys: tuple[str, ...] = ("loss",),
) -> Iterator[Callable[[int, dict[str, float]], None]]:
    """Yields ``update(step, metrics)``; shows step, live losses and items/s on stderr."""
    console = err_console()
    # Without a terminal (logs, CI) a live bar never redraws: print a line every ~5% instead.
    plain_every = max(1, total // 20) if enabled and not console.is_terminal else 0
    with (
        activity.quiet(),
        Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled or plain_every > 0,
            transient=False,
        ) as progress,
    ):
        bar = progress.add_task(title, total=total, completed=start, info="")

        def update(step: int, metrics: dict[str, float]) -> None:
            shown = [f"{k} {metrics[k]:.3f}" for k in keys if k in metrics]
            rate = next((v for k, v in metrics.items() if k.endswith("_per_s")), None)
            if rate is not None:
                shown.append(f"{rate:.0f}/s")
            progress.update(bar, completed=step, info="  ".join(shown))
            if plain_every and (step % plain_every == 0 or step == total):
                console.print(f"{title} step {step}/{total}  " + "  ".join(shown), highlight=False)

        yield update


def training_monitor(as_json: bool) -> Callable[..., Any]:
    """The monitor the CLI gives a workflow's training runs (`adapt_site`,
    `pretrain_backbone`): a progress bar on a terminal (none under ``--json``) and the metrics
    to the run's MLflow record."""
    from dynaflip_adapt.cli.output import progress_enabled

    enabled = progress_enabled(as_json)

    def monitor(
        title: str, total: int, run: Any, log_every: int, keys: tuple[str, ...]
    ) -> contextlib.AbstractContextManager[Callable[[int, dict[str, float]], None]]:
        return logged_training(title, total, run, log_every, enabled=enabled, keys=keys)

    return monitor
