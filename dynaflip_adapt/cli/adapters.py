"""``dynaflip-adapt adapters``: list, show and rescale registered adapters."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import BudgetOpt, JsonOpt, StrengthOpt
from dynaflip_adapt.cli.output import console, print_fit, print_json, registry

app = typer.Typer(help="Registered site adapters: list, show, rescale.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option("--site", help="Only this site's adapters.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Adapter versions with their site, base backbone and geometry."""
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL

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
            t.get("parent_version", "") or "-",
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
    from dynaflip_adapt.models.adapter import read_adapter_manifest
    from dynaflip_adapt.registry.adapters import adapter_chain, resolve_adapter

    reg = registry(ctx)
    folder, info = resolve_adapter(reg, ref)
    manifest = read_adapter_manifest(folder)
    chain = adapter_chain(reg, info) if info else []
    steps = [
        {
            "version": v.version,
            "site": v.tags.get("site", ""),
            "data_fingerprint": v.tags.get("data_fingerprint", ""),
            "base_version": v.tags.get("base_version", ""),
            "strength": v.tags.get("strength", "1"),
        }
        for v in chain
    ]
    if as_json:
        print_json(
            {
                "version": info.to_dict() if info else None,
                "path": str(folder),
                "manifest": manifest,
                "chain": steps,
            }
        )
        return
    c = console()
    name = f"v{info.version}" if info else str(folder)
    aliases = f" (aliases: {', '.join(info.aliases)})" if info and info.aliases else ""
    c.print(f"adapter {name} for site {manifest.get('site') or '?'}{aliases}", highlight=False)
    lin = dict(manifest.get("lineage", {}))
    c.print("lineage:", highlight=False)
    for key in sorted(lin):
        c.print(f"  {key}: {_readable(lin[key])}", highlight=False)
    if len(steps) > 1:
        # Continual adaptation: what this adapter was continued from, back to the backbone.
        links = [
            f"v{x['version']} ({x['site']}, logs {x['data_fingerprint'][7:19]})" for x in steps
        ]
        c.print("chain: " + " <- ".join(links) + f" <- backbone v{steps[-1]['base_version']}",
                highlight=False)  # fmt: skip
    on = [k for k, v in manifest.get("anchors", {}).items() if v]
    off = [k for k, v in manifest.get("anchors", {}).items() if not v]
    c.print(f"anchors: {', '.join(on) or 'none'}" + (f" (off: {', '.join(off)})" if off else ""))
    geo = manifest.get("geometry", {})
    if geo:
        c.print("geometry:", highlight=False)
        for key in sorted(geo):
            c.print(f"  {key}: {_readable(geo[key])}", highlight=False)


def _readable(value: object) -> str:
    """A manifest value for a person: numbers rounded, lists joined, nothing spelled 'None'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_readable(v) for v in value) or "-"
    if isinstance(value, dict):
        return "; ".join(f"{k} {_readable(v)}" for k, v in value.items()) or "-"
    return str(value)


@app.command("rescale")
def rescale(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Adapter version, alias or folder.")],
    strength: StrengthOpt = "auto",
    budget: BudgetOpt = 1.0,
    site: Annotated[
        str | None,
        typer.Option("--site", help="Fit against this site's policies (default: the adapter's)."),
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Fit against only this policy version.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a copy of an adapter with its weight update scaled (W0 + s * delta W).

    --strength auto finds the largest s in [0, 1] at which the audit passes against the pinned
    policies (bisection, 1/64 resolution). Exit code 1 when no s > 0 passes; nothing is
    registered then, nor when s = 1 passes (the adapter is fine as it is).
    """
    import tempfile
    from pathlib import Path

    from dynaflip_adapt.errors import EXIT_CHECK_FAILED, InputError
    from dynaflip_adapt.eval.strength import fit_strength, parse_strength, save_scaled
    from dynaflip_adapt.registry.adapters import FINETUNE_EXPERIMENT, open_adapter, register_adapter
    from dynaflip_adapt.registry.lifecycle import audited_policies

    fixed = parse_strength(strength)
    reg = registry(ctx)
    bundle, adapter, info = open_adapter(reg, ref)
    site = site or adapter.manifest.get("site")
    fit = None
    if fixed is None:
        policies = audited_policies(reg, bundle, site, policy)
        if not policies:
            raise InputError(
                None,
                "--site",
                f"no policies pinned to site {site!r}",
                "a site with pinned policies for --strength auto (or give --strength S)",
            )
        fit = fit_strength(bundle, adapter, policies, budget=budget)
        chosen = fit.strength
    else:
        chosen = fixed
    out: dict[str, object] = {
        "adapter": info.version if info else str(adapter.path),
        "site": site,
        "strength": chosen,
        "fit": fit.to_dict() if fit else None,
        "registered": None,
    }
    if fit is not None and not as_json:
        print_fit(fit)
    if chosen == 0.0 or (chosen == 1.0 and fit is not None):
        if as_json:
            print_json(out)
        else:
            console().print(
                "no strength above 0 passes the audit: nothing registered"
                if chosen == 0.0
                else "the adapter passes at full strength: nothing registered",
                highlight=False,
            )
        if chosen == 0.0:
            raise typer.Exit(EXIT_CHECK_FAILED)
        return
    tags = {"site": str(site or ""), "parent_version": info.version if info else ""}
    with tempfile.TemporaryDirectory(dir=reg.store.home) as tmp:
        folder = save_scaled(
            bundle,
            adapter,
            chosen,
            Path(tmp) / "adapter",
            fit=fit,
            lineage={"parent": str(adapter.path), "parent_version": info.version if info else None},
        )
        with reg.run(FINETUNE_EXPERIMENT, f"rescale-{site}", tags) as run:
            run.log_params({"strength": chosen, "budget": budget, "parent": out["adapter"]})
            if fit is not None:
                run.log_dict(fit.to_dict(), "strength_fit.json")
            new = register_adapter(reg, run, folder)
    out["registered"] = new.to_dict()
    if as_json:
        print_json(out)
        return
    console().print(
        f"registered dynaflip-adapter version {new.version} for site {site}: "
        f"v{out['adapter']} at strength {chosen:.4f}",
        highlight=False,
    )
