"""``dynaflip-adapt adapters``: list and show registered adapters."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt
from dynaflip_adapt.cli.output import console, print_json, registry

app = typer.Typer(help="Registered site adapters: list, show.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option("--site", help="Only this site's adapters.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Adapter versions with their site, base backbone and geometry."""
    from dynaflip_adapt.adapters import ADAPTER_MODEL

    versions = [
        v
        for v in registry(ctx).versions(ADAPTER_MODEL)
        if site is None or v.tags.get("site") == site
    ]
    if as_json:
        print_json([v.to_dict() for v in versions])
        return
    table = Table(title=ADAPTER_MODEL)
    for col in ("version", "site", "aliases", "base", "parent", "replay CKA", "site CKA"):
        table.add_column(col)
    for v in versions:
        t = v.tags
        table.add_row(
            v.version,
            t.get("site", ""),
            ", ".join(v.aliases),
            t.get("base_fingerprint", "")[:15] + "...",
            t.get("parent_version", ""),
            t.get("geometry.replay_cka", "")[:6],
            t.get("geometry.site_cka", "")[:6],
        )
    console().print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Adapter version, alias or folder.")],
    as_json: JsonOpt = False,
) -> None:
    """An adapter's manifest: lineage, anchors, geometry fingerprint, files."""
    from dynaflip_adapt.adapters import resolve_adapter
    from dynaflip_adapt.models.adapter import read_adapter_manifest

    folder, info = resolve_adapter(registry(ctx), ref)
    manifest = read_adapter_manifest(folder)
    if as_json:
        print_json(
            {"version": info.to_dict() if info else None, "path": str(folder), "manifest": manifest}
        )
        return
    c = console()
    c.print(
        f"adapter {info.version if info else folder} for site {manifest.get('site')}",
        highlight=False,
    )
    c.print(f"lineage : {manifest.get('lineage')}", highlight=False)
    c.print(f"anchors : {manifest.get('anchors')}", highlight=False)
    c.print(f"geometry: {manifest.get('geometry')}", highlight=False)
