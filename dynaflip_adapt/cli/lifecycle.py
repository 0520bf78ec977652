"""``dynaflip-adapt audit | promote | rollback | history | export``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt
from dynaflip_adapt.cli.output import console, err_console, print_json, registry
from dynaflip_adapt.errors import EXIT_CHECK_FAILED

COLORS = {"compatible": "green", "warning": "yellow", "incompatible": "red"}


def run_audit(
    registry: Any,
    adapter_ref: str,
    site: str | None,
    policy: str | None,
    opened: tuple[Any, Any, Any] | None = None,
) -> tuple[Any, Any, str]:
    """(report, adapter version info, audit run id) for an adapter against a site's policies;
    `opened` is ``open_adapter(registry, adapter_ref)`` when the caller already has it."""
    from dynaflip_adapt.adapters import ADAPTER_MODEL, open_adapter
    from dynaflip_adapt.audit import audit
    from dynaflip_adapt.lifecycle import audited_policies, log_audit

    bundle, adapter, ainfo = opened or open_adapter(registry, adapter_ref)
    site = site or adapter.manifest.get("site")
    policies = audited_policies(registry, bundle, site, policy)
    name = f"{ADAPTER_MODEL} v{ainfo.version}" if ainfo else str(adapter.path)
    report = audit(bundle, adapter, policies, name=name, site=site)
    data = report.to_dict()
    run_id = log_audit(registry, data, site, ainfo.version if ainfo else None)
    return report, ainfo, run_id


def print_report(report: Any) -> None:
    c = console()
    v = report.verdict
    c.print(f"audit of {report.adapter} for site {report.site}: [bold {COLORS[v]}]{v}[/]")
    bad_static = [s for s in report.static if not s.passed]
    for s in bad_static:
        c.print(
            f"  [red]static check failed[/] {s.name}: {s.value} vs {s.limit} ({s.detail})",
            highlight=False,
        )
    if not report.policies:
        c.print("  no policies pinned to this site: only static and geometry checks ran")
    table = Table(title="per-policy verdicts")
    for col in ("policy", "verdict", "check", "value", "limit", "ok"):
        table.add_column(col, no_wrap=col in ("check", "verdict"))
    for p in report.policies:
        for i, ch in enumerate(p.checks):
            val = f"{ch.value:.4f}" if isinstance(ch.value, float) else str(ch.value)[:24]
            lim = f"{ch.limit:.4f}" if isinstance(ch.limit, float) else str(ch.limit)[:24]
            table.add_row(
                p.policy if i == 0 else "",
                f"[{COLORS[p.verdict]}]{p.verdict}[/]" if i == 0 else "",
                ch.name,
                val,
                lim,
                "yes"
                if ch.passed
                else ("[yellow]warn[/]" if ch.severity == "warning" else "[red]no[/]"),
            )
    if report.policies:
        c.print(table)
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
    c.print("  geometry: " + ", ".join(f"{k} {dyn[k]:.3f}" for k in keys), highlight=False)


def audit_cmd(
    ctx: typer.Context,
    adapter: Annotated[
        str, typer.Option("--adapter", "-a", help="Adapter version, alias or folder.")
    ],
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
) -> None:
    """Audit an adapter's compatibility with the policies pinned to a site.

    Static checks (backbone sha256, dims, preprocessing, targets) and dynamic ones on the
    adapter's probe set (CKA, each policy's action deviation vs its tolerance, BCT retrieval,
    simplex area). Exit code 0 compatible (or warning), 1 incompatible. Logged to MLflow.
    """
    report, _, run_id = run_audit(registry(ctx), adapter, site, policy)
    if as_json:
        print_json(report.to_dict() | {"mlflow_run": run_id})
    else:
        print_report(report)
    if report.verdict == "incompatible":
        raise typer.Exit(EXIT_CHECK_FAILED)


def promote_cmd(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Adapter version to put in production.")],
    site: Annotated[str, typer.Option("--site", help="Site whose production alias moves.")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even if the audit fails (needs --reason).")
    ] = False,
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in history).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Point a site's production alias at an adapter, after the audit passes.

    The audit covers every policy pinned to the site. Exit code 1 when it fails and --force is
    not given; --force needs --reason, and both are recorded in the site's history.
    """
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.lifecycle import promote

    if force and not reason.strip():
        raise InputError(None, "--force", "no --reason", "a reason, recorded in the site's history")
    reg = registry(ctx)
    report, ainfo, run_id = run_audit(reg, version, site, None)
    if ainfo is None:
        raise InputError(None, "VERSION", repr(version), "a registered adapter version or alias")
    if report.verdict == "incompatible" and not force:
        if as_json:
            print_json({"promoted": False, "audit": report.to_dict()})
        else:
            print_report(report)
            err_console().print(
                f"[red]not promoted:[/] the audit is incompatible for site {site}; "
                f"`adapters rescale {ainfo.version} --site {site}` registers the largest "
                "strength of it that passes (or --force --reason to override)",
                highlight=False,
            )
        raise typer.Exit(EXIT_CHECK_FAILED)
    event = promote(
        reg,
        ainfo.version,
        site,
        audit_verdict=report.verdict,
        audit_run=run_id,
        forced=force,
        reason=reason,
    )
    if as_json:
        print_json({"promoted": True, "event": event, "audit": report.to_dict()})
    else:
        console().print(
            f"site {site}: production -> adapter v{ainfo.version} "
            f"(was {event['previous'] or 'none'}); audit {report.verdict}"
            f"{' (forced)' if force else ''}",
            highlight=False,
        )


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
    from dynaflip_adapt.lifecycle import rollback

    event = rollback(registry(ctx), site, to=to, reason=reason)
    if as_json:
        print_json(event)
    else:
        console().print(
            f"site {site}: production -> adapter v{event['version']} (was v{event['previous']})",
            highlight=False,
        )


def history_cmd(
    ctx: typer.Context,
    site: Annotated[str, typer.Option("--site", help="Site.")],
    as_json: JsonOpt = False,
) -> None:
    """Every promotion and rollback of a site: time, user, reason, audit result."""
    import datetime

    from dynaflip_adapt.lifecycle import current, history

    reg = registry(ctx)
    events = history(reg, site)
    if as_json:
        print_json({"site": site, "current": current(reg, site), "events": events})
        return
    table = Table(title=f"site {site} (production: v{current(reg, site)})")
    for col in ("#", "time (UTC)", "action", "version", "from", "user", "audit", "reason"):
        table.add_column(col)
    for e in events:
        t = datetime.datetime.fromtimestamp(e["time"], datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        table.add_row(
            str(e["seq"]),
            t,
            e["action"] + (" (forced)" if e["forced"] else ""),
            e["version"] or "",
            e["previous"] or "",
            e["user"] or "",
            e["audit"] or "",
            e["reason"] or "",
        )
    console().print(table)


def export_cmd(
    ctx: typer.Context,
    version: Annotated[
        str, typer.Argument(help="Adapter version/alias/folder, or 'base' for the bare backbone.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="safetensors, torchscript or onnx.")
    ] = "safetensors",
    as_json: JsonOpt = False,
) -> None:
    """Merge the adapter into the image encoder and write a standalone image-only encoder.

    The export is verified: merged vs unmerged features, and the export run in a clean
    subprocess with dynaflip-adapt and peft unimportable.
    """
    from dynaflip_adapt.adapters import open_adapter
    from dynaflip_adapt.backbones import load_backbone
    from dynaflip_adapt.export import export_encoder

    reg = registry(ctx)
    if version == "base":
        bundle, _ = load_backbone(reg, None)
        adapter = None
    else:
        bundle, adapter, _ = open_adapter(reg, version)
    res = export_encoder(bundle, adapter, out, fmt)
    if as_json:
        print_json(res.to_dict())
    else:
        console().print(
            f"exported {fmt} encoder to {res.folder}: merged vs unmerged max |diff| "
            f"{res.merged_vs_unmerged_max_abs:.2e}, "
            f"standalone export vs merged {res.export_vs_merged_max_abs:.2e}",
            highlight=False,
        )
