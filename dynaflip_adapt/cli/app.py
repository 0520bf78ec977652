"""Root of the ``dynaflip-adapt`` CLI: global options, error handling, exit codes."""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from dynaflip_adapt import __version__
from dynaflip_adapt.cli import adapters as adapters_cmd
from dynaflip_adapt.cli import backbones as backbones_cmd
from dynaflip_adapt.cli import data as data_cmd
from dynaflip_adapt.cli import evaluate as eval_cmd
from dynaflip_adapt.cli import finetune as finetune_cmd
from dynaflip_adapt.cli import flow as flow_cmd
from dynaflip_adapt.cli import inspect as inspect_cmd
from dynaflip_adapt.cli import lifecycle as lifecycle_cmd
from dynaflip_adapt.cli import policies as policies_cmd
from dynaflip_adapt.cli import pretrain as pretrain_cmd
from dynaflip_adapt.cli import recipes as recipes_cmd
from dynaflip_adapt.cli import sim as sim_cmd
from dynaflip_adapt.cli import store as store_cmd
from dynaflip_adapt.cli.output import State, err_console
from dynaflip_adapt.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, DynaflipError

EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 a check failed; 2 bad input or usage; 3 runtime failure; 130 interrupted."
)


class DynaflipGroup(TyperGroup):
    """Turns library errors into one line on stderr and a documented exit code."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except DynaflipError as exc:
            if _debug(ctx):
                raise
            err_console().print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            if _debug(ctx):
                raise
            err_console().print("interrupted")
            ctx.exit(EXIT_INTERRUPTED)
        except Exception as exc:
            if _is_cli_control(exc) or _debug(ctx):
                raise
            err_console().print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                "(rerun with --debug for the traceback, and please report it)",
                markup=True,
                highlight=False,
            )
            ctx.exit(EXIT_RUNTIME)


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
app.command("inspect")(inspect_cmd.inspect_cmd)
app.add_typer(eval_cmd.app, name="eval")
app.add_typer(store_cmd.app, name="store")


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
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Global options."""
    ctx.obj = State(debug=debug, tracking_uri=tracking_uri)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="dynaflip-adapt")
    except KeyboardInterrupt:  # raised outside a command (e.g. while parsing)
        if "--debug" in (argv or sys.argv):
            traceback.print_exc()
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
