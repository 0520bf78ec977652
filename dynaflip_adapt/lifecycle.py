"""Policies in the registry, audits, and per-site promotion / rollback with a durable history.

MLflow keeps no history of where an alias pointed, so every promotion and rollback is also an
append-only event: a run in the ``dynaflip-lifecycle`` experiment tagged with site, action,
version, previous version, user, reason, audit verdict and a per-site sequence number. Reads
and writes happen under the registry's file lock, so concurrent promotes/rollbacks from several
processes leave a consistent alias and a complete history.
"""

from __future__ import annotations

import getpass
import json
import re
import time
from pathlib import Path
from typing import Any

from dynaflip_adapt.adapters import ADAPTER_MODEL, load_registered_adapter
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.policies import Policy, load_policy, read_policy_spec
from dynaflip_adapt.registry import Registry, VersionInfo

POLICY_MODEL = "dynaflip-policy"
POLICY_EXPERIMENT = "dynaflip-policies"
AUDIT_EXPERIMENT = "dynaflip-audit"
LIFECYCLE_EXPERIMENT = "dynaflip-lifecycle"


def site_alias(site: str) -> str:
    """The production alias of a site (MLflow aliases allow letters, digits, ``_`` and ``-``).

    Raises:
        InputError: A site name with nothing usable in it.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "_", site.strip())
    if not clean.strip("_"):
        raise InputError(None, "--site", repr(site), "a site name with letters or digits")
    return f"prod-{clean}"


# ------------------------------------------------------------------------------------ policies


def register_policy(registry: Registry, folder: Path, *, site: str, name: str) -> VersionInfo:
    """Registers a policy folder (checked first) pinned to its backbone/adapter."""
    spec = read_policy_spec(folder)
    pin = spec["pin"]
    tags = {
        "name": name,
        "site": site,
        "head": spec["head"],
        "tolerance": str(spec["tolerance"]),
        "backbone_fingerprint": str(pin.get("backbone_fingerprint", "")),
        "backbone_version": str(pin.get("backbone_version", "")),
        "adapter_version": str(pin.get("adapter_version", "") or ""),
    }
    with registry.run(POLICY_EXPERIMENT, f"policy-{name}", {"site": site}) as run:
        run.log_dict(spec, "policy_spec.json")
        return registry.register(POLICY_MODEL, run, folder, "policy", tags)


def policies_for_site(registry: Registry, site: str) -> list[VersionInfo]:
    """Active policy versions pinned to a site (newest version per policy name)."""
    seen: dict[str, VersionInfo] = {}
    for v in registry.versions(POLICY_MODEL):
        if v.tags.get("site") == site and v.tags.get("retired") != "true":
            seen.setdefault(v.tags.get("name", v.version), v)
    return list(seen.values())


def load_policy_version(registry: Registry, info: VersionInfo) -> Policy:
    return load_policy(registry.download(info, "policies"))


def audited_policies(
    registry: Registry, bundle: Bundle, site: str | None, policy: str | None = None
) -> list[tuple[str, Policy, Any]]:
    """What an audit holds an adapter to: (name, policy, the encoder it was trained on or None
    for the base) for one policy version/alias, or every active policy pinned to `site`."""
    if policy is not None:
        pinfos = [registry.resolve(POLICY_MODEL, policy)]
    else:
        pinfos = policies_for_site(registry, site) if site else []
    out = []
    for p in pinfos:
        pol = load_policy_version(registry, p)
        pinned = None
        pinned_ref = pol.spec["pin"].get("adapter_version")
        if pinned_ref:
            pinned = load_registered_adapter(registry, str(pinned_ref), bundle)[0].merged().eval()
        out.append((f"{p.tags.get('name', 'policy')} (v{p.version})", pol, pinned))
    return out


# -------------------------------------------------------------------------------------- events


def _events(registry: Registry, site: str) -> list[dict[str, Any]]:
    exp = registry.client.get_experiment_by_name(LIFECYCLE_EXPERIMENT)
    if exp is None:
        return []
    runs = registry.client.search_runs(
        [exp.experiment_id], filter_string=f"tags.site = '{site}'", max_results=10000
    )
    events = []
    for r in runs:
        t = r.data.tags
        events.append(
            {
                "seq": int(t.get("seq", 0)),
                "time": float(t.get("time", r.info.start_time / 1000)),
                "action": t.get("action"),
                "version": t.get("version"),
                "previous": t.get("previous") or None,
                "user": t.get("user"),
                "reason": t.get("reason", ""),
                "forced": t.get("forced") == "true",
                "audit": t.get("audit_verdict", ""),
                "audit_run": t.get("audit_run", ""),
                "run_id": r.info.run_id,
            }
        )
    return sorted(events, key=lambda e: (e["seq"], e["time"]))


def history(registry: Registry, site: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of a site, oldest first."""
    return _events(registry, site)


def _stack(events: list[dict[str, Any]]) -> list[str]:
    """The promotion stack implied by the events (top = what production should point at)."""
    stack: list[str] = []
    for e in events:
        if e["action"] == "promote":
            stack.append(e["version"])
        elif e["action"] == "rollback":
            while stack and stack[-1] != e["version"]:
                stack.pop()
            if not stack:
                stack.append(e["version"])
    return stack


def current(registry: Registry, site: str) -> str | None:
    """The version the site's production alias points at."""
    alias = site_alias(site)
    for v in registry.versions(ADAPTER_MODEL):
        if alias in v.aliases:
            return v.version
    return None


def _record(
    registry: Registry, site: str, action: str, version: str, previous: str | None, **extra: Any
) -> dict[str, Any]:
    seq = len(_events(registry, site)) + 1
    tags = {
        "site": site,
        "action": action,
        "version": version,
        "previous": previous or "",
        "user": extra.get("user") or getpass.getuser(),
        "reason": extra.get("reason") or "",
        "forced": "true" if extra.get("forced") else "false",
        "audit_verdict": extra.get("audit") or "",
        "audit_run": extra.get("audit_run") or "",
        "seq": str(seq),
        "time": f"{time.time():.3f}",
    }
    with registry.run(LIFECYCLE_EXPERIMENT, f"{action}-{site}-v{version}", tags) as run:
        run.log_dict(tags, "event.json")
    return {**tags, "seq": seq}


def promote(
    registry: Registry,
    version: str,
    site: str,
    *,
    audit_verdict: str,
    audit_run: str = "",
    forced: bool = False,
    reason: str = "",
    user: str | None = None,
) -> dict[str, Any]:
    """Points the site's production alias at `version` and records the event (under the lock)."""
    info = registry.resolve(ADAPTER_MODEL, version)
    with registry.lock:
        previous = current(registry, site)
        registry.set_alias(ADAPTER_MODEL, site_alias(site), info.version)
        return _record(
            registry,
            site,
            "promote",
            info.version,
            previous,
            audit=audit_verdict,
            audit_run=audit_run,
            forced=forced,
            reason=reason,
            user=user,
        )


def rollback(
    registry: Registry,
    site: str,
    *,
    to: str | None = None,
    reason: str = "",
    user: str | None = None,
) -> dict[str, Any]:
    """Moves the site's alias back to the previously promoted version (or `to`).

    Raises:
        InputError: Unknown site, unknown version, or nothing to roll back to.
    """
    with registry.lock:
        events = _events(registry, site)
        if not events:
            raise InputError(None, "--site", repr(site), "a site with promotions (see `history`)")
        stack = _stack(events)
        previous = current(registry, site)
        if to is not None:
            target = registry.resolve(ADAPTER_MODEL, to).version
        elif len(stack) >= 2:
            target = stack[-2]
        else:
            raise InputError(
                None,
                "--site",
                f"{site!r} with one promoted version ({previous})",
                "an earlier promotion to roll back to (or --to V)",
            )
        registry.set_alias(ADAPTER_MODEL, site_alias(site), target)
        return _record(registry, site, "rollback", target, previous, reason=reason, user=user)


def log_audit(
    registry: Registry, report: dict[str, Any], site: str | None, adapter_version: str | None
) -> str:
    """Logs an audit report to MLflow; returns the run id."""
    tags = {
        "site": site or "",
        "adapter_version": adapter_version or "",
        "verdict": report["verdict"],
    }
    with registry.run(AUDIT_EXPERIMENT, f"audit-v{adapter_version or 'local'}", tags) as run:
        run.log_dict(report, "audit_report.json")
        flat = {
            k: float(v) for k, v in report.get("dynamic", {}).items() if isinstance(v, (int, float))
        }
        run.log_metrics(0, flat)
        return run.run_id


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
