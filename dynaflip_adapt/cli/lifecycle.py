"""``dynaflip-adapt audit | promote | rollback | history | export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from dynaflip_adapt.cli.common import (
    AdapterArg,
    AdapterOptHidden,
    JsonOpt,
    OverwriteOpt,
    one_adapter,
)
from dynaflip_adapt.cli.output import VERDICT_COLORS, console, err_console, print_json, registry

_OPS = {"<=": "must stay <=", ">=": "must stay >=", "==": "must equal"}


def _num(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    text = str(v)
    return text if len(text) <= 27 else text[:24] + "..."


def _check_line(ch: Any, width: int) -> str:
    """One check: mark, name, value and the rule it is held to; the rule moves to a second,
    indented line when one would not fit in `width` columns."""
    mark = "ok  " if ch.passed else ("warn" if not ch.blocks else "FAIL")
    color = "green" if ch.passed else ("yellow" if not ch.blocks else "red")
    if ch.op == "==" and ch.passed:
        return f"  [{color}]{mark}[/] {ch.name}: {_num(ch.value)}"
    head = f"  {mark} {ch.name}: {_num(ch.value)}"
    rule = f"({_OPS.get(ch.op, ch.op)} {_num(ch.limit)})"
    sep = " " if len(head) + 1 + len(rule) <= width else "\n         "
    return f"  [{color}]{mark}[/] {ch.name}: {_num(ch.value)}{sep}{rule}"


def audit_fix(report: Any, version: str | None) -> str:
    """The one line that ends an audit: what failed and what the tool suggests."""
    failed = [f"{c.name}" for c in report.static if c.blocks]
    failed += [f"{c.name} ({p.policy})" for p in report.policies for c in p.checks if c.blocks]
    ref = version or "ADAPTER"
    if report.verdict == "unaudited":
        return (
            f"unaudited: no policies pinned to site {report.site}; register them (`policies "
            f"register`), or promote with --allow-unaudited"
        )
    if not failed:
        warned = [c.name for p in report.policies for c in p.checks if not c.passed]
        return "passed" + (f" with warnings: {', '.join(sorted(set(warned)))}" if warned else "")
    if any(c.blocks for c in report.static):
        fix = "train an adapter on this backbone (the static checks cannot be tuned away)"
    else:
        fix = (
            f"`adapters rescale {ref} --site {report.site}` registers the largest strength "
            "that passes"
        )
    return f"failed: {', '.join(failed)}; fix: {fix}"


def print_report(report: Any, version: str | None = None) -> None:
    """The audit for a person, readable at 80 columns: one check per line with its rule."""
    c = console()
    w = c.width
    v = report.verdict
    c.print(
        f"audit of {report.adapter} for site {report.site}: [bold {VERDICT_COLORS[v]}]{v}[/]",
        soft_wrap=False,
    )
    passed = sum(s.passed for s in report.static)
    c.print(f"static checks: {passed}/{len(report.static)} passed", highlight=False)
    for s in report.static:
        if not s.passed:
            c.print(_check_line(s, w) + f"\n         {s.detail}", highlight=False)
    if not report.policies:
        c.print("no policies pinned to this site: the audit had nothing to check")
    for p in report.policies:
        c.print(f"policy {p.policy}: [{VERDICT_COLORS[p.verdict]}]{p.verdict}[/]", highlight=False)
        for ch in p.checks:
            c.print(_check_line(ch, w), highlight=False)
    dyn = report.dynamic
    keys = [
        k
        for k in (
            "replay_cka",
            "site_cka",
            "replay_area_old",
            "replay_area_new",
            "site_area_old",
            "site_area_new",
        )
        if k in dyn
    ]
    if keys:
        c.print(
            "geometry: " + ", ".join(f"{k} {dyn[k]:.3f}" for k in keys),
            highlight=False,
            soft_wrap=False,
        )
    c.print(audit_fix(report, version), highlight=False, soft_wrap=False)


def audit_cmd(
    ctx: typer.Context,
    adapter: AdapterArg = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Only this policy version.")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            "--site", help="Audit against this site's policies (default: the adapter's site)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    adapter_opt: AdapterOptHidden = None,
) -> None:
    """Audit an adapter's compatibility with the policies pinned to a site.

    Static checks (backbone sha256, dims, preprocessing, targets) and dynamic ones on the
    adapter's probe set (CKA, each policy's action deviation vs its tolerance, BCT retrieval,
    simplex area). Exit code 0: compatible or warning; 1: incompatible, or unaudited (no policy
    is pinned to the site, so nothing vouches for the adapter). Logged to MLflow.
    """
    from dynaflip_adapt.workflows.lifecycle import AuditRequest, audit_adapter

    ref = one_adapter(adapter, adapter_opt)
    result = audit_adapter(AuditRequest(ref, site, policy), registry=registry(ctx))
    if as_json:
        print_json(result.to_dict())
    else:
        print_report(result.report, result.adapter.version if result.adapter else None)
    if not result.passed:
        raise typer.Exit(1)


def promote_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="Site whose production alias moves.")],
    adapter: AdapterArg = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Promote although the gate refuses (another site's adapter, an incompatible "
            "or unaudited audit); needs --reason. Recorded in history.",
        ),
    ] = False,
    allow_unaudited: Annotated[
        bool,
        typer.Option(
            "--allow-unaudited",
            help="Promote when no policy is pinned to the site (nothing to audit). Recorded.",
        ),
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in history).")] = "",
    as_json: JsonOpt = False,
    adapter_opt: AdapterOptHidden = None,
) -> None:
    """Point a site's production alias at an adapter, if the gate lets it through.

    The gate fails closed: the adapter must have been trained for --site, and the audit
    against every policy pinned to the site must pass. A site with no pinned policies is
    unaudited and needs --allow-unaudited; the rest needs --force --reason. Exit code 1 when
    refused; overrides are recorded in the site's history.
    """
    from dynaflip_adapt.workflows.lifecycle import PromoteRequest, promote_adapter

    ref = one_adapter(adapter, adapter_opt)
    request = PromoteRequest(ref, site, force, allow_unaudited, reason)
    result = promote_adapter(request, registry=registry(ctx))
    if as_json:
        print_json(result.to_dict())
    elif not result.promoted:
        if result.audit is not None:
            print_report(result.audit, result.adapter.version)
        err_console().print(f"[red]not promoted:[/] {result.refused}", highlight=False)
    else:
        assert result.event is not None and result.audit is not None
        how = " (forced)" if force else (" (allowed unaudited)" if allow_unaudited else "")
        console().print(
            f"site {site}: production -> adapter v{result.adapter.version} "
            f"(was {_v(result.event['previous'])}); audit {result.audit.verdict}{how}",
            highlight=False,
        )
    if not result.promoted:
        raise typer.Exit(1)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def rollback_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="Site to roll back.")],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Version to roll back to (default: the previous one)."),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in history).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Move a site's production alias back to the previously promoted adapter (or --to V)."""
    from dynaflip_adapt.workflows.lifecycle import rollback_site

    event = rollback_site(site, to=to, reason=reason, registry=registry(ctx))
    if as_json:
        print_json({"rolled_back": True, "event": event})
    else:
        console().print(
            f"site {site}: production -> adapter {_v(event['version'])} "
            f"(was {_v(event['previous'])})",
            highlight=False,
        )


def history_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="Site.")],
    as_json: JsonOpt = False,
) -> None:
    """Every promotion and rollback of a site: time, user, reason, audit result."""
    from rich.table import Table

    from dynaflip_adapt import activity
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.lifecycle import current, history, rollback_target

    reg = registry(ctx)
    with activity.step(f"reading the history of site {site}"):
        events = history(reg, site)
        now = current(reg, site)
        # What each adapter in the history continues (finetune --from), parent first.
        tags = {v.version: v.tags.get("ancestors", "") for v in reg.versions(ADAPTER_MODEL)}
    seen = {str(e["version"]) for e in events}
    chains = {v: [a for a in tags.get(v, "").split(",") if a] for v in sorted(seen, key=int)}
    back = rollback_target(events)
    if as_json:
        print_json(
            {"site": site, "current": now, "rollback_to": back, "events": events, "chains": chains}
        )
        return
    undo = f"rollback restores {_v(back)}" if back else "nothing to roll back to"
    title = f"site {site} (production: {_v(now)}; {undo})"
    table = Table(title=title)
    cols = ("#", "time (UTC)", "action", "version", "from", "continues", "user", "audit", "reason")
    for col in cols:
        table.add_column(col)
    for e in events:
        how = " (forced)" if e["forced"] else (" (unaudited)" if e["allow_unaudited"] else "")
        table.add_row(
            str(e["seq"]),
            e["time_utc"].replace("T", " ").rstrip("Z"),
            e["action"] + how,
            _v(e["version"]),
            _v(e["previous"]),
            " <- ".join(f"v{a}" for a in chains[str(e["version"])]),
            e["user"],
            e["audit"] or "",
            e["reason"],
        )
    console().print(table)


def export_cmd(
    ctx: typer.Context,
    adapter: Annotated[
        str | None,
        typer.Argument(
            help="Adapter (version, alias, models:/ URI or folder), or 'base' for the bare "
            "backbone.",
            metavar="ADAPTER",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder: new or empty (see --overwrite)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="safetensors, torchscript or onnx.")
    ] = "safetensors",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    adapter_opt: AdapterOptHidden = None,
) -> None:
    """Merge the adapter into the image encoder and write a standalone image-only encoder.

    The export is verified (merged vs unmerged features, and the export run in a clean
    subprocess with dynaflip-adapt and peft unimportable) before it is moved into --out. An
    existing --out must be empty, or a previous export with --overwrite: then only the files
    that export wrote are replaced, and nothing else in the folder is touched.
    """
    from dynaflip_adapt import activity
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.models.export import check_format
    from dynaflip_adapt.outputs import check_export_folder

    ref = one_adapter(adapter, adapter_opt)
    if out is None:
        raise InputError(None, "--out", "nothing", "an output folder")
    # Everything the user typed is checked before the registry or a model loads.
    check_format(fmt)
    target = check_export_folder(out, overwrite=overwrite)

    from dynaflip_adapt.models.export import export_encoder
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL, open_adapter
    from dynaflip_adapt.registry.backbones import load_backbone

    reg = registry(ctx)
    source = None
    with activity.step(f"loading {ref}"):
        if ref == "base":
            bundle, _ = load_backbone(reg, None)
            ad = None
        else:
            bundle, ad, ainfo = open_adapter(reg, ref)
            if ainfo is not None:
                source = {
                    "model": ADAPTER_MODEL,
                    "version": ainfo.version,
                    "registry": reg.store.tracking_uri,
                }
    with activity.step(f"exporting {fmt} and verifying it in a clean process"):
        res = export_encoder(bundle, ad, target, fmt, source=source)
    if as_json:
        print_json(res.to_dict())
    else:
        console().print(
            f"exported {fmt} encoder to {res.folder}: merged vs unmerged max |diff| "
            f"{res.merged_vs_unmerged_max_abs:.2e}, "
            f"standalone export vs merged {res.export_vs_merged_max_abs:.2e}",
            highlight=False,
        )
