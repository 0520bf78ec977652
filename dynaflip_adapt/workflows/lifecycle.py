"""The gate: auditing an adapter against a site's pinned policies and moving the site's
production alias, the jobs behind ``audit``, ``promote`` and ``rollback``.

`promote_adapter` is the only way the Python API moves a production alias forward, and it fails
closed as the CLI does: an adapter trained for another site is refused before the (slow) audit;
otherwise the audit against every policy pinned to the site must pass (``compatible`` or
``warning``); a site with no pinned policies needs ``allow_unaudited``; the rest needs ``force``
with a ``reason``. A refusal changes nothing::

    from dynaflip_adapt import PromoteRequest, promote_adapter

    result = promote_adapter(PromoteRequest(adapter="3", site="night_shift"))
    if not result.promoted:
        print(result.refused)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynaflip_adapt.eval.audit import AuditReport
    from dynaflip_adapt.registry.client import Registry, VersionInfo

# Verdicts a promotion accepts.
PASSING = ("compatible", "warning")


@dataclass(frozen=True)
class AuditRequest:
    """Which adapter to audit, against what.

    Attributes:
        adapter: Adapter version, alias or folder.
        site: Audit against this site's pinned policies (default: the adapter's site).
        policy: Only this policy version or alias.
    """

    adapter: str
    site: str | None = None
    policy: str | None = None


@dataclass
class AuditResult:
    """An audit's report, the adapter version it audited and the MLflow run that logged it."""

    report: AuditReport
    adapter: VersionInfo | None
    mlflow_run: str

    @property
    def passed(self) -> bool:
        """Whether a promotion would accept this verdict (``unaudited`` does not pass)."""
        return self.report.verdict in PASSING

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict() | {"mlflow_run": self.mlflow_run}


@dataclass(frozen=True)
class PromoteRequest:
    """Point `site`'s production alias at `adapter`, if the gate lets it through.

    Attributes:
        adapter: Adapter version or alias (registered: a folder cannot be promoted).
        site: The site whose production alias moves.
        force: Promote although the gate refuses; needs `reason`; recorded in history.
        allow_unaudited: Promote when no policy is pinned to the site (nothing to audit).
        reason: Why (recorded in the site's history).
    """

    adapter: str
    site: str
    force: bool = False
    allow_unaudited: bool = False
    reason: str = ""

    def __post_init__(self) -> None:
        """Bad input fails here, before a registry is opened."""
        from dynaflip_adapt.errors import InputError
        from dynaflip_adapt.registry.lifecycle import site_alias

        site_alias(self.site)  # a name with nothing usable in it
        if self.force and not self.reason.strip():
            raise InputError(
                None, "--force", "no --reason", "a reason, recorded in the site's history"
            )


@dataclass
class PromoteResult:
    """Whether the alias moved: the event recorded, or why it was refused (nothing changed)."""

    promoted: bool
    adapter: VersionInfo
    refused: str | None = None
    event: dict[str, Any] | None = None
    audit: AuditReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"promoted": self.promoted}
        if self.promoted:
            out["event"] = self.event
        else:
            out["refused"] = self.refused
        out["audit"] = self.audit.to_dict() if self.audit else None
        return out


def _registry(tracking_uri: str | None, registry: Registry | None) -> Registry:
    if registry is not None:
        return registry
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    return Registry(resolve_store(tracking_uri))


def audit_adapter(
    request: AuditRequest, *, tracking_uri: str | None = None, registry: Registry | None = None
) -> AuditResult:
    """Audits an adapter against the policies pinned to a site and logs it to MLflow.

    Args:
        request: Which adapter, against which site or policy.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else the embedded one).
        registry: An open registry instead of `tracking_uri`.

    Raises:
        InputError: Unknown adapter, site or policy; damaged artifacts.
    """
    from dynaflip_adapt.registry.lifecycle import run_audit

    reg = _registry(tracking_uri, registry)
    report, info, run_id = run_audit(reg, request.adapter, request.site, request.policy)
    return AuditResult(report, info, run_id)


def promote_adapter(
    request: PromoteRequest, *, tracking_uri: str | None = None, registry: Registry | None = None
) -> PromoteResult:
    """Moves a site's production alias to an adapter behind the gate (see the module docstring).

    Returns:
        The result: ``promoted`` with the recorded event, or the refusal (nothing changed).

    Raises:
        InputError: Unknown adapter, a folder instead of a version, a site name with nothing
            usable in it, ``force`` without a reason.
        RuntimeFailure: The promotion lost a race with another machine's request.
    """
    from dynaflip_adapt import activity
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.lifecycle import (
        promote,
        promotion_refusal,
        run_audit,
        site_alias,
    )

    req = request
    reg = _registry(tracking_uri, registry)
    with activity.step(f"loading adapter {req.adapter}"):
        opened = open_adapter(reg, req.adapter)
    _, ad, info = opened
    if info is None:
        raise InputError(
            None, "ADAPTER", repr(req.adapter), "a registered adapter version or alias"
        )
    adapter_site = ad.manifest.get("site")
    # Another site's adapter is refused before the (slow) audit runs.
    refusal = promotion_refusal(
        info.version, adapter_site, req.site, "compatible", forced=req.force, allow_unaudited=False
    )
    if refusal is not None:
        return PromoteResult(False, info, refused=refusal)
    report, _, run_id = run_audit(reg, req.adapter, req.site, None, opened)
    refusal = promotion_refusal(
        info.version,
        adapter_site,
        req.site,
        report.verdict,
        forced=req.force,
        allow_unaudited=req.allow_unaudited,
    )
    if refusal is not None:
        return PromoteResult(False, info, refused=refusal, audit=report)
    with activity.step(f"moving {site_alias(req.site)} to v{info.version}"):
        event = promote(
            reg,
            info.version,
            req.site,
            audit_verdict=report.verdict,
            audit_run=run_id,
            forced=req.force,
            allow_unaudited=req.allow_unaudited and not req.force,
            adapter_site=adapter_site,
            reason=req.reason,
        )
    return PromoteResult(True, info, event=event, audit=report)


def rollback_site(
    site: str,
    *,
    to: str | None = None,
    reason: str = "",
    tracking_uri: str | None = None,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """Moves a site's production alias back to the previously promoted adapter (or `to`, a
    version promoted at that site before); returns the recorded event."""
    from dynaflip_adapt import activity
    from dynaflip_adapt.registry.lifecycle import rollback

    reg = _registry(tracking_uri, registry)
    with activity.step(f"rolling back site {site}"):
        return rollback(reg, site, to=to, reason=reason)
