"""Policies in the registry, audits, and per-site promotion / rollback with a durable history.

MLflow keeps no history of where an alias pointed, so every promotion and rollback is a request
appended to the site's log: a version of the registered model ``dynaflip-events-<site>``
(numbered by the tracking store, unique and gap-free under concurrency, on any machine) whose
tags say what was asked and what production was expected to point at, plus a run in the
``dynaflip-lifecycle`` experiment for the UI. Replaying the log in order decides each request
(applied, or lost to a request that came first) and derives the sequence numbers, so several
machines sharing one tracking server keep a consistent alias and a complete history without a
shared lock. Events recorded before this scheme (runs with a ``seq`` tag) are replayed first.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import re
import time
from pathlib import Path
from typing import Any

from dynaflip_adapt.errors import CheckFailed, InputError, RuntimeFailure
from dynaflip_adapt.eval.audit import AuditedPolicy
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.policies import (
    HEAD_KINDS,
    IMAGE_HEADS,
    Policy,
    load_policy,
    read_policy_spec,
)
from dynaflip_adapt.registry.adapters import ADAPTER_MODEL, load_registered_adapter
from dynaflip_adapt.registry.client import (
    EVENTS_PREFIX,
    Registry,
    RunHandle,
    VersionInfo,
    metric_key,
)

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


def register_policy(
    registry: Registry, folder: Path, *, site: str, name: str, run: RunHandle | None = None
) -> VersionInfo:
    """Registers a policy folder (checked first) pinned to its backbone/adapter, in `run` (the
    training run, when it was trained here) or a run of its own."""
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
    description = f"{spec['head']} head for site {site!r} (tolerance {spec['tolerance']:g})"
    if run is not None:
        run.log_dict(spec, "policy_spec.json")
        return registry.register(POLICY_MODEL, run, folder, "policy", tags, description)
    with registry.run(POLICY_EXPERIMENT, f"policy-{name}", {"site": site}) as own:
        own.log_dict(spec, "policy_spec.json")
        return registry.register(POLICY_MODEL, own, folder, "policy", tags, description)


def policies_for_site(registry: Registry, site: str) -> list[VersionInfo]:
    """Active policy versions pinned to a site (newest version per policy name)."""
    seen: dict[str, VersionInfo] = {}
    for v in registry.versions(POLICY_MODEL):
        if v.tags.get("site") == site and v.tags.get("retired") != "true":
            seen.setdefault(v.tags.get("name", v.version), v)
    return list(seen.values())


def load_policy_version(registry: Registry, info: VersionInfo) -> Policy:
    return load_policy(registry.download(info, "policies", read_policy_spec))


def audited_policies(
    registry: Registry, bundle: Bundle, site: str | None, policy: str | None = None
) -> list[AuditedPolicy]:
    """What an audit holds an adapter to: (name, policy, the encoder it was trained on or None
    for the base) for one policy version/alias, or every active policy pinned to `site`."""
    if policy is not None:
        pinfos = [registry.resolve(POLICY_MODEL, policy)]
    else:
        pinfos = policies_for_site(registry, site) if site else []
    out = []
    for p in pinfos:
        head = p.tags.get("head")
        if head in HEAD_KINDS and head not in IMAGE_HEADS:
            continue  # reads no backbone features: an adapter cannot change what it does
        pol = load_policy_version(registry, p)
        if not pol.uses_image:
            continue  # the same for a policy of your own whose spec reads none
        pinned = None
        pinned_ref = pol.spec["pin"].get("adapter_version")
        if pinned_ref:
            pinned = load_registered_adapter(registry, str(pinned_ref), bundle)[0].merged().eval()
        out.append((f"{p.tags.get('name', 'policy')} (v{p.version})", pol, pinned))
    return out


# -------------------------------------------------------------------------------------- events


def event_view(tags: dict[str, str], run_id: str, start_ms: int = 0) -> dict[str, Any]:
    """One promotion/rollback event as `promote --json` and `history --json` both print it."""
    import datetime

    when = float(tags.get("time") or start_ms / 1000)
    return {
        "seq": int(tags.get("seq") or 0),
        "time": when,
        "time_utc": datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        ),
        "site": tags.get("site", ""),
        "action": tags.get("action", ""),
        "version": tags.get("version") or None,
        "previous": tags.get("previous") or None,
        "user": tags.get("user", ""),
        "reason": tags.get("reason", ""),
        "forced": tags.get("forced") == "true",
        "allow_unaudited": tags.get("allow_unaudited") == "true",
        "adapter_site": tags.get("adapter_site") or None,
        "audit": tags.get("audit_verdict") or None,
        "audit_run": tags.get("audit_run") or None,
        "run_id": run_id,
    }


LOST, APPLIED, NOTHING = "lost", "applied", "nothing to roll back to"


def events_model(site: str) -> str:
    """The registered model whose versions are the site's promotion/rollback requests."""
    return EVENTS_PREFIX + site_alias(site)[len("prod-") :]


def _check_site(site: str) -> None:
    if "'" in site:
        raise InputError(None, "--site", repr(site), "a site name without quotes")


def _legacy_events(registry: Registry, site: str) -> list[dict[str, Any]]:
    """Events recorded before requests were sequenced by the registry (runs with a seq tag)."""
    runs = registry.search_runs(LIFECYCLE_EXPERIMENT, f"tags.site = '{site}'")
    events = [
        event_view(dict(r.data.tags), r.info.run_id, r.info.start_time)
        for r in runs
        if r.data.tags.get("request") != "true"
    ]
    return sorted(events, key=lambda e: (e["seq"], e["time"]))


def _apply(stack: list[str], action: str, version: str) -> None:
    """One event's effect on the promotion stack (top = where production points)."""
    if action == "promote":
        stack.append(version)
    elif action == "rollback":
        while stack and stack[-1] != version:
            stack.pop()
        if not stack:
            stack.append(version)


def _stack(events: list[dict[str, Any]]) -> list[str]:
    """The promotion stack implied by the events (top = what production should point at)."""
    stack: list[str] = []
    for e in events:
        _apply(stack, e["action"], e["version"])
    return stack


def _replay(
    legacy: list[dict[str, Any]], requests: list[Any]
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str | None]]]:
    """The site's events from its legacy events and its requests in registry order.

    A request applies only if it expected what production pointed at just before it (its
    ``expects``); otherwise it lost a race and changes nothing. Sequence numbers, ``previous``
    and a plain rollback's target are derived here, so every process reading the same requests
    derives the same history. Returns the events and, per request version, (outcome, the
    version production pointed at before it).
    """
    events = list(legacy)
    stack = _stack(events)
    promoted = {str(e["version"]) for e in events if e["action"] == "promote"}
    outcome: dict[str, tuple[str, str | None]] = {}
    for mv in requests:
        t = dict(mv.tags or {})
        cur = stack[-1] if stack else None
        if (t.get("expects") or None) != cur:
            outcome[str(mv.version)] = (LOST, cur)
            continue
        target = t.get("version") or None
        if t.get("action") == "rollback":
            if target is None:
                target = stack[-2] if len(stack) >= 2 else None
            if target is None or target not in promoted:
                outcome[str(mv.version)] = (NOTHING, cur)
                continue
        assert target is not None
        if t.get("action") == "promote":
            promoted.add(target)
        _apply(stack, str(t.get("action")), target)
        tags = {**t, "version": target, "previous": cur or "", "seq": str(len(events) + 1)}
        events.append(event_view(tags, str(mv.run_id or "")) | {"request": str(mv.version)})
        outcome[str(mv.version)] = (APPLIED, cur)
    return events, outcome


def _read(registry: Registry, site: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    _check_site(site)
    # Sites whose names clean to the same alias share a model: keep this site's requests.
    requests = sorted(
        (v for v in registry.versions(events_model(site)) if v.tags.get("site") == site),
        key=lambda m: int(m.version),
    )
    return _replay(_legacy_events(registry, site), requests)


def history(registry: Registry, site: str) -> list[dict[str, Any]]:
    """Every promotion and rollback of a site, oldest first (all of them: read page by page)."""
    return _read(registry, site)[0]


def rollback_target(events: list[dict[str, Any]]) -> str | None:
    """The version a plain `rollback` would move the site to (None: nothing to roll back to)."""
    stack = _stack(events)
    return stack[-2] if len(stack) >= 2 else None


def current(registry: Registry, site: str) -> str | None:
    """The version the site's production alias points at."""
    alias = site_alias(site)
    for v in registry.versions(ADAPTER_MODEL):
        if alias in v.aliases:
            return v.version
    return None


def _queue(registry: Registry) -> Any:
    """Where processes of one machine queue before a request: the file lock for a local
    database (sqlite answers "database is locked" to concurrent writers, and queued processes
    never lose a race to each other); nothing for a tracking server, which orders requests
    itself (`_request`): a file lock held for whole requests starved processes past its timeout
    there."""
    if registry.store.tracking_uri.startswith(("http://", "https://")):
        return contextlib.nullcontext()
    return registry.lock


class RaceLost(CheckFailed):
    """Another machine changed the site between reading it and requesting the change."""


def _request(
    registry: Registry, site: str, action: str, version: str | None, expects: str | None,
    **extra: Any,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    """Appends a request to the site's log and applies it; returns (event, outcome).

    Why this is safe across machines: the request is a new version of the site's events model,
    and the tracking store numbers versions max + 1 inside one transaction under the
    (name, version) primary key, so two requests never share a number and every number below
    a request's is committed when it gets its own. The outcome of each request is a pure
    function of the requests before it (`_replay`), so every reader agrees on it; a request
    whose ``expects`` no longer holds loses and changes nothing. The alias is then moved to the
    replayed state and re-checked until it no longer changes: the last writer to move it has
    seen every request before its move.
    """
    import tempfile

    tags = {
        "site": site,
        "action": action,
        "version": version or "",
        "expects": expects or "",
        "user": extra.get("user") or getpass.getuser(),
        "reason": extra.get("reason") or "",
        "forced": "true" if extra.get("forced") else "false",
        "allow_unaudited": "true" if extra.get("allow_unaudited") else "false",
        "adapter_site": extra.get("adapter_site") or "",
        "audit_verdict": extra.get("audit") or "",
        "audit_run": extra.get("audit_run") or "",
        "time": f"{time.time():.3f}",
    }
    name = f"{action}-{site}-v{version}" if version else f"{action}-{site}"
    with registry.run(LIFECYCLE_EXPERIMENT, name, tags | {"request": "true"}) as run:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "request.json").write_text(json.dumps(tags, indent=2))
            info = registry.register(events_model(site), run, tmp, "request", tags)
        events, outcomes = _read(registry, site)
        outcome, before = outcomes[info.version]
        mine = next((e for e in events if e.get("request") == info.version), None)
        run.set_tags(
            {"outcome": outcome, "request_version": info.version}
            | ({"seq": str(mine["seq"]), "previous": mine["previous"] or ""} if mine else {})
        )
        if mine is not None:
            run.log_dict(mine, "event.json")
    _settle(registry, site, events)
    if mine is None:
        return {"action": action, "version": version, "site": site, "previous": before}, outcome
    return mine, outcome


def _settle(registry: Registry, site: str, events: list[dict[str, Any]], rounds: int = 20) -> None:
    """Points the alias at what the replayed log says (`events`: a read made after this
    process's request), re-reading after each move until a fresh read agrees."""
    for _ in range(rounds):
        stack = _stack(events)
        want = stack[-1] if stack else None
        if want is None or current(registry, site) == want:
            return
        registry.set_alias(ADAPTER_MODEL, site_alias(site), want)
        events = history(registry, site)
    raise RuntimeFailure(f"site {site}: the production alias kept changing for {rounds} rounds")


def promotion_refusal(
    version: str,
    adapter_site: str | None,
    site: str,
    verdict: str,
    *,
    forced: bool = False,
    allow_unaudited: bool = False,
) -> str | None:
    """Why promoting adapter `version` (trained for `adapter_site`) to `site` with this audit
    verdict is refused, or None when the gate lets it through. The gate fails closed: another
    site's adapter, an incompatible audit and an audit with nothing to check (no pinned
    policies: ``unaudited``) all need an explicit override, which the site's history records."""
    from dynaflip_adapt.eval.audit import COMPATIBLE, UNAUDITED, WARNING

    if adapter_site != site and not forced:
        trained = repr(adapter_site) if adapter_site else "no site (its lineage names none)"
        return (
            f"adapter v{version} was trained for site {trained}, not {site!r}: check --site "
            f"(or --force --reason R to promote it there anyway)"
        )
    if verdict == UNAUDITED and not (forced or allow_unaudited):
        return (
            f"no policies are pinned to site {site!r}, so the audit had nothing to check "
            f"(unaudited): register them (`policies register ... --site {site}`), or "
            "--allow-unaudited (or --force --reason R) to promote without an audit"
        )
    if verdict not in (COMPATIBLE, WARNING, UNAUDITED) and not forced:
        return (
            f"the audit is {verdict} for site {site}; `adapters rescale {version} --site "
            f"{site}` registers the largest strength of it that passes (or --force --reason R)"
        )
    return None


def promote(
    registry: Registry,
    version: str,
    site: str,
    *,
    audit_verdict: str,
    audit_run: str = "",
    forced: bool = False,
    allow_unaudited: bool = False,
    adapter_site: str | None = None,
    reason: str = "",
    user: str | None = None,
) -> dict[str, Any]:
    """Points the site's production alias at `version` and records the event (under the lock).

    The caller has passed `promotion_refusal`; this only moves the alias and writes history.
    """
    info = registry.resolve(ADAPTER_MODEL, version)
    with _queue(registry):
        stack = _stack(history(registry, site))
        event, outcome = _request(
            registry,
            site,
            "promote",
            info.version,
            stack[-1] if stack else None,
            audit=audit_verdict,
            audit_run=audit_run,
            forced=forced,
            allow_unaudited=allow_unaudited,
            adapter_site=adapter_site,
            reason=reason,
            user=user,
        )
    if outcome == LOST:
        raise RaceLost(
            f"site {site} changed while promoting v{info.version} (production is now "
            f"v{current(registry, site)}; see `history --site {site}`): nothing changed, "
            "re-run promote to promote over it"
        )
    return event


def rollback(
    registry: Registry,
    site: str,
    *,
    to: str | None = None,
    reason: str = "",
    user: str | None = None,
    attempts: int = 5,
) -> dict[str, Any]:
    """Moves the site's alias back to the previously promoted version (or `to`). A rollback
    that loses a race with another machine re-reads the site and tries again.

    Raises:
        InputError: Unknown site, unknown version, or nothing to roll back to.
        RaceLost: Still losing after `attempts` tries.
    """
    target = registry.resolve(ADAPTER_MODEL, to).version if to is not None else None
    for _ in range(attempts):
        with _queue(registry):
            events = history(registry, site)
            if not events:
                raise InputError(
                    None, "--site", repr(site), "a site with promotions (see `history`)"
                )
            stack = _stack(events)
            if target is not None:
                # Rollback skips the audit gate: it only restores what the gate once let in here.
                promoted = {str(e["version"]) for e in events if e["action"] == "promote"}
                if target not in promoted:
                    raise InputError(
                        None,
                        "--to",
                        f"v{target}, never promoted at site {site!r}",
                        "a version promoted here before (see `history`); new versions go "
                        "through `promote`",
                    )
            elif len(stack) < 2:
                raise InputError(
                    None,
                    "--site",
                    f"{site!r} with one promoted version ({stack[-1] if stack else None})",
                    "an earlier promotion to roll back to (or --to V)",
                )
            event, outcome = _request(
                registry, site, "rollback", target, stack[-1], reason=reason, user=user
            )
        if outcome == APPLIED:
            return event
        if outcome == NOTHING:
            raise InputError(
                None, "--site", f"{site!r}: nothing left to roll back to", "an earlier promotion"
            )
    raise RaceLost(f"site {site} kept changing: rollback lost {attempts} races; run it again")


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
            metric_key(k): float(v)
            for k, v in report.get("dynamic", {}).items()
            if isinstance(v, (int, float))
        }
        # Each policy's numbers (action deviations, retrieval, area), so audits compare in the UI.
        for p in report.get("policies", []):
            for c in p["checks"]:
                if isinstance(c["value"], (int, float)) and not isinstance(c["value"], bool):
                    flat[metric_key("policy", p["policy"], c["name"])] = float(c["value"])
        run.log_metrics(0, flat)
        return run.run_id


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def run_audit(
    registry: Any,
    adapter_ref: str,
    site: str | None,
    policy: str | None,
    opened: tuple[Any, Any, Any] | None = None,
) -> tuple[Any, Any, str]:
    """(report, adapter version info, audit run id) for an adapter against a site's policies;
    `opened` is ``open_adapter(registry, adapter_ref)`` when the caller already has it."""
    from dynaflip_adapt import activity
    from dynaflip_adapt.eval.audit import audit
    from dynaflip_adapt.registry.adapters import open_adapter

    with activity.step(f"loading adapter {adapter_ref}"):
        bundle, adapter, ainfo = opened or open_adapter(registry, adapter_ref)
    site = site or adapter.manifest.get("site")
    with activity.step(f"loading the policies pinned to site {site}"):
        policies = audited_policies(registry, bundle, site, policy)
    name = f"{ADAPTER_MODEL} v{ainfo.version}" if ainfo else str(adapter.path)
    with activity.step(f"auditing {name} against {len(policies)} policies"):
        report = audit(bundle, adapter, policies, name=name, site=site)
    with activity.step("logging the audit to MLflow"):
        run_id = log_audit(registry, report.to_dict(), site, ainfo.version if ainfo else None)
    return report, ainfo, run_id
