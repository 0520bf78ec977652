"""Root of the ``dynaflip-adapt`` CLI: global options, error handling, exit codes."""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from dynaflip_adapt import __version__
from dynaflip_adapt.cli import adapters as adapters_cmd
from dynaflip_adapt.cli import backbones as backbones_cmd
from dynaflip_adapt.cli import data as data_cmd
from dynaflip_adapt.cli import evaluate as eval_cmd
from dynaflip_adapt.cli import finetune as finetune_cmd
from dynaflip_adapt.cli import flow as flow_cmd
from dynaflip_adapt.cli import inspect as inspect_cmd
from dynaflip_adapt.cli import lifecycle as lifecycle_cmd
from dynaflip_adapt.cli import monitor as monitor_cmd
from dynaflip_adapt.cli import policies as policies_cmd
from dynaflip_adapt.cli import pretrain as pretrain_cmd
from dynaflip_adapt.cli import recipes as recipes_cmd
from dynaflip_adapt.cli import sim as sim_cmd
from dynaflip_adapt.cli import store as store_cmd
from dynaflip_adapt.cli.output import State, err_console
from dynaflip_adapt.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUNTIME,
    EXIT_TERMINATED,
    DynaflipError,
)
from dynaflip_adapt.outputs import is_no_room

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 a check failed; 2 bad input or usage; 3 runtime failure; "
    "130 interrupted (Ctrl-C); 143 terminated (SIGTERM)."
)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (runs end KILLED, checkpoints stay) but exits 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class DynaflipGroup(TyperGroup):
    """Turns library errors into one line on stderr and a documented exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Usage errors (unknown option, a value out of range, a missing argument) are one
        line too, with exit code 2, like every other bad input."""
        from typer import _click
        from typer.exceptions import Abort

        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # a group called alone: its help
            sys.exit(exc.exit_code)
        except _click.exceptions.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else (prog_name or "")
            err_console().print(
                f"[bold red]error:[/] {_one_line(exc.format_message())} (see '{where} --help')",
                highlight=False,
            )
            sys.exit(exc.exit_code if exc.exit_code else EXIT_BAD_INPUT)
        except _click.exceptions.ClickException as exc:
            err_console().print(f"[bold red]error:[/] {_one_line(exc.format_message())}")
            sys.exit(exc.exit_code)
        except Abort:
            err_console().print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        from dynaflip_adapt.cli.progress import spinner

        previous = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread (embedded use): leave SIGTERM alone
            previous = None
        try:
            with spinner():
                return super().invoke(ctx)
        except DynaflipError as exc:
            if _debug(ctx):
                raise
            err_console().print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            ctx.exit(exc.exit_code)
        except Terminated:
            if _debug(ctx):
                raise
            err_console().print("terminated")
            ctx.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            err_console().print("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            # The reader went away (`... | head`): not an error of ours, and nothing to say.
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - swallow the final flush
            ctx.exit(1)
        except Exception as exc:
            if _is_cli_control(exc) or _debug(ctx):
                raise
            if is_no_room(exc):  # a writer not wrapped in `outputs.writing`
                where = getattr(exc, "filename", None)
                err_console().print(
                    f"[bold red]error:[/] {where + ': ' if where else ''}could not write "
                    f"({_one_line(str(exc))}): disk full, a file-size limit or a read-only store",
                    markup=True,
                    highlight=False,
                )
                ctx.exit(EXIT_RUNTIME)
            err_console().print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                "(rerun with --debug for the traceback, and please report it)",
                markup=True,
                highlight=False,
            )
            ctx.exit(EXIT_RUNTIME)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _is_cli_control(exc: BaseException) -> bool:
    """Usage errors, --help exits and typer.Exit: handled by click/typer themselves.

    Newer typer vendors click (``typer._click``), so match on the module, not on a class.
    """
    return type(exc).__module__.split(".")[0] in ("click", "typer")


def _debug(ctx: typer.Context) -> bool:
    obj = ctx.find_root().obj
    return bool(getattr(obj, "debug", False))


app = typer.Typer(
    cls=DynaflipGroup,
    name="dynaflip-adapt",
    help=(
        "Adapt DynaFLIP robot-vision backbones to new sites with LoRA, keep their geometry, "
        "version adapters in MLflow and audit compatibility. " + EXIT_CODES_HELP
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(recipes_cmd.app, name="recipes")
app.add_typer(sim_cmd.app, name="sim")
app.add_typer(flow_cmd.app, name="flow")
app.command("finetune")(finetune_cmd.finetune)
app.command("pretrain")(pretrain_cmd.pretrain)
app.add_typer(backbones_cmd.app, name="backbones")
app.add_typer(adapters_cmd.app, name="adapters")
app.add_typer(policies_cmd.app, name="policies")
app.command("audit")(lifecycle_cmd.audit_cmd)
app.command("promote")(lifecycle_cmd.promote_cmd)
app.command("rollback")(lifecycle_cmd.rollback_cmd)
app.command("history")(lifecycle_cmd.history_cmd)
app.command("export")(lifecycle_cmd.export_cmd)
app.command("monitor")(monitor_cmd.monitor_cmd)
app.command("inspect")(inspect_cmd.inspect_cmd)
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(store_cmd.app, name="store")


def _reflow(doc: str | None) -> str | None:
    """A docstring as help text: hard line breaks inside a paragraph become spaces, so the
    terminal re-wraps it cleanly at any width (paragraphs stay apart)."""
    if not doc:
        return doc
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p.strip()) for p in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    for cmd in typer_app.registered_commands:
        if cmd.callback is not None:
            cmd.callback.__doc__ = _reflow(cmd.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            info = group.typer_instance.info
            if isinstance(info.help, str):
                info.help = _reflow(info.help)
            _reflow_help(group.typer_instance)


_reflow_help(app)

_type_rich = TyperOption.display_type_rich


def _display_type_rich(self: TyperOption, ctx: Any) -> str | None:
    # A flag takes no value: typer would show "<bool>" beside it.
    return None if self.is_flag else _type_rich(self, ctx)


TyperOption.display_type_rich = _display_type_rich  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dynaflip-adapt {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")
    ] = False,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri",
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else an embedded sqlite "
            "registry under $DYNAFLIP_HOME, default ~/.dynaflip).",
        ),
    ] = None,
    registry_timeout: Annotated[
        float | None,
        typer.Option(
            "--registry-timeout",
            min=0.1,
            help="Seconds one tracking-server request may take (default 5; one retry). An "
            "unreachable server fails with exit code 3 within about 3x this.",
        ),
    ] = None,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options."""
    from dynaflip_adapt.registry.client import TIMEOUT_ENV

    if registry_timeout is not None:
        os.environ[TIMEOUT_ENV] = f"{registry_timeout:g}"
    ctx.obj = State(debug=debug, tracking_uri=tracking_uri)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="dynaflip-adapt")
    except Terminated:
        sys.exit(EXIT_TERMINATED)
    except KeyboardInterrupt:  # raised outside a command (e.g. while parsing)
        if "--debug" in (argv or sys.argv):
            traceback.print_exc()
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
