"""``dynaflip-adapt store``: where registry and artifacts live."""

from __future__ import annotations

from typing import Annotated

import typer

from dynaflip_adapt.cli.output import console, print_json, state

app = typer.Typer(help="Where the MLflow registry and artifacts live.", no_args_is_help=True)


@app.command("info")
def info(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the resolved tracking URI, artifact root and home directory (creates nothing)."""
    from dynaflip_adapt.registry.store import resolve_store

    store = resolve_store(state(ctx).tracking_uri)
    if as_json:
        print_json(store.to_dict())
        return
    c = console()
    c.print(f"tracking URI : {store.tracking_uri}  [dim]({store.source})[/]")
    c.print(f"artifact root: {store.artifact_root or '(chosen by the tracking server)'}")
    c.print(f"home         : {store.home}")
