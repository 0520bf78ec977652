"""Compatibility audit of an adapter against the policies that consume the backbone's features.

Static checks (same backbone weights by sha256, feature dim, preprocessing, adapter targets,
readable PEFT format) and dynamic checks on the adapter's probe set and each policy's probe
(linear CKA and mean cosine old vs new, the policy's own action deviation against its declared
tolerance, BCT-style retrieval compatibility, tri-modal alignment) -> one verdict per policy.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dynaflip_adapt.eval.retrieval import topk_accuracy
from dynaflip_adapt.losses import triangle_area
from dynaflip_adapt.metrics import linear_cka, mean_cosine
from dynaflip_adapt.models.adapter import Adapter
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.models.flow_encoder import flow_features
from dynaflip_adapt.policies import Policy, actions_on_frames

COMPATIBLE, WARNING, INCOMPATIBLE = "compatible", "warning", "incompatible"
# No policy is pinned to the site: nothing vouches for the adapter (a gate must not pass it).
UNAUDITED = "unaudited"
VERDICTS = (COMPATIBLE, WARNING, UNAUDITED, INCOMPATIBLE)

# What an audit holds an adapter to: (name, policy, the encoder the policy was trained on, or
# None for the base encoder).
AuditedPolicy = tuple[str, Policy, nn.Module | None]


@dataclass(frozen=True)
class Thresholds:
    """Audit limits (policy tolerances come from the policies themselves)."""

    area_margin: float = 0.05  # mean simplex area may grow by at most this
    bct_margin: float = 0.02  # new->old retrieval may trail old->old by at most this
    warn_fraction: float = 0.5  # deviation above this share of the tolerance warns
    warn_cka: float = 0.9


@dataclass
class Check:
    """One check: a value, what it was held to, and whether it passed."""

    name: str
    passed: bool
    value: Any = None
    limit: Any = None
    detail: str = ""
    severity: str = "error"  # error -> incompatible, warning -> warning
    # How the value is held to the limit: "<=" (must stay at or below), ">=" (at or above) or
    # "==" (must equal).
    op: str = "=="

    @property
    def blocks(self) -> bool:
        """Failed with severity error: makes the verdict incompatible."""
        return not self.passed and self.severity == "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PolicyVerdict:
    policy: str
    verdict: str
    checks: list[Check] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "verdict": self.verdict,
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass
class AuditReport:
    adapter: str
    site: str | None
    base_fingerprint: str
    static: list[Check]
    dynamic: dict[str, float]
    policies: list[PolicyVerdict]

    @property
    def verdict(self) -> str:
        if any(c.blocks for c in self.static):
            return INCOMPATIBLE
        if not self.policies:
            return UNAUDITED
        verdicts = [p.verdict for p in self.policies]
        if INCOMPATIBLE in verdicts:
            return INCOMPATIBLE
        if WARNING in verdicts or any(not c.passed for c in self.static):
            return WARNING
        return COMPATIBLE

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "site": self.site,
            "verdict": self.verdict,
            "base_fingerprint": self.base_fingerprint,
            "static": [c.to_dict() for c in self.static],
            "dynamic": self.dynamic,
            "policies": [p.to_dict() for p in self.policies],
        }


def _verdict(checks: list[Check]) -> str:
    if any(c.blocks for c in checks):
        return INCOMPATIBLE
    if any(not c.passed for c in checks):
        return WARNING
    return COMPATIBLE


def static_checks(bundle: Bundle, adapter: Adapter) -> list[Check]:
    """Checks that need no data."""
    m = adapter.manifest
    base = m.get("lineage", {}).get("base_fingerprint")
    checks = [
        Check(
            "base_backbone_sha256",
            base == bundle.fingerprint,
            str(base),
            bundle.fingerprint,
            "the adapter was trained on these exact backbone weights",
        ),
        Check(
            "feature_dim",
            m.get("feature_dim") == bundle.model.cfg.width,
            m.get("feature_dim"),
            bundle.model.cfg.width,
        ),
        Check(
            "preprocessing",
            m.get("preprocessing") == bundle.model.cfg.preprocessing(),
            m.get("preprocessing"),
            bundle.model.cfg.preprocessing(),
            "image size, normalization, channel order",
        ),
    ]
    cfg = adapter.peft_model.peft_config["default"]
    targets = cfg.target_modules
    names = [n for n, _ in bundle.model.image.named_modules()]
    if isinstance(targets, str):
        hit = [n for n in names if re.fullmatch(targets, n)]
    else:
        hit = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    checks.append(
        Check(
            "adapter_targets_present",
            bool(hit),
            len(hit),
            1,
            f"target_modules {targets}",
            op=">=",
        )
    )
    checks.append(
        Check("peft_format_readable", True, cfg.peft_type.value, "LORA", "loaded with PEFT")
    )
    return checks


@torch.no_grad()
def _features(bundle: Bundle, encoder: Any, rgb: torch.Tensor) -> torch.Tensor:
    return encoder(bundle.model.preprocess(rgb))


@torch.no_grad()
def _area(bundle: Bundle, encoder: Any, probe: dict[str, torch.Tensor], part: str) -> float | None:
    if f"{part}_flow_mask" not in probe:
        return None
    h = bundle.model
    a = h.embed_transition(
        _features(bundle, encoder, probe[f"{part}_rgb0"]),
        _features(bundle, encoder, probe[f"{part}_rgb1"]),
    )
    b = h.embed_text(probe[f"{part}_text"])
    m = probe[f"{part}_flow_mask"]
    c = h.embed_flow(flow_features(probe[f"{part}_flow_points"], probe[f"{part}_flow_delta"], m), m)
    return float(triangle_area(a, b, c).mean())


def _retrieval(query: torch.Tensor, gallery: torch.Tensor) -> float:
    """Top-1 accuracy of finding gallery[i] for query[i] (cosine)."""
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    g = torch.nn.functional.normalize(gallery.float(), dim=-1)
    return topk_accuracy(q @ g.T, torch.arange(len(q)), 1)


@torch.no_grad()
def dynamic_metrics(
    bundle: Bundle, old: Any, new: Any, probe: dict[str, torch.Tensor]
) -> dict[str, float]:
    """CKA, cosine, BCT retrieval and simplex area of `new` vs `old` encoders on the probe."""
    out: dict[str, float] = {}
    for part in ("replay", "site"):
        if f"{part}_rgb0" not in probe:
            continue
        f_old0 = _features(bundle, old, probe[f"{part}_rgb0"])
        f_new0 = _features(bundle, new, probe[f"{part}_rgb0"])
        f_old1 = _features(bundle, old, probe[f"{part}_rgb1"])
        out[f"{part}_cka"] = linear_cka(f_old0, f_new0)
        out[f"{part}_cosine"] = mean_cosine(f_old0, f_new0)
        # BCT (Shen et al. 2020): new queries against the old gallery must retrieve at least as
        # well as old against old. Task: find frame t + k's gallery entry from frame t.
        out[f"{part}_bct_old_old"] = _retrieval(f_old0, f_old1)
        out[f"{part}_bct_new_old"] = _retrieval(f_new0, f_old1)
        for name, enc in (("old", old), ("new", new)):
            area = _area(bundle, enc, probe, part)
            if area is not None:
                out[f"{part}_area_{name}"] = area
    return out


@torch.no_grad()
def policy_deviation(
    policy: Policy, bundle: Bundle, old: Any, new: Any, probe: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The policy's actions on old vs new features, relative to its action scale.

    On the policy's own probe (its frames, proprio and instructions) and on the adapter's site
    frames (with the policy's mean proprio and instruction embedding).
    """
    out: dict[str, float] = {}
    st = policy.stats
    sets: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    if "probe_rgb" in st:
        lang = st.get("probe_language")
        sets.append(("policy_probe", st["probe_rgb"], st["probe_proprio"], lang))
    if "site_rgb0" in probe:  # proprio and instruction at the policy's mean (the default)
        sets.append(("adapter_probe", probe["site_rgb0"], None, None))
    for name, rgb, prop, lang in sets:
        a_old = actions_on_frames(policy, old, bundle.model.preprocess, rgb, prop, lang)
        a_new = actions_on_frames(policy, new, bundle.model.preprocess, rgb, prop, lang)
        rel = ((a_new - a_old).abs() / policy.action_scale).mean(dim=1)
        out[f"{name}_mean"] = float(rel.mean())
        out[f"{name}_p95"] = float(rel.quantile(0.95))
    return out


def audit(
    bundle: Bundle,
    adapter: Adapter,
    policies: list[AuditedPolicy],
    *,
    name: str,
    site: str | None,
    thresholds: Thresholds | None = None,
) -> AuditReport:
    """Audits `adapter` on `bundle` against `policies` (name, policy, the encoder it was trained
    on: None = the base encoder)."""
    static = static_checks(bundle, adapter)
    new = adapter.merged().eval()
    dyn = dynamic_metrics(bundle, bundle.model.image, new, adapter.probe)
    verdicts = policy_verdicts(bundle, new, adapter.probe, policies, thresholds, dyn)
    return AuditReport(name, site, bundle.fingerprint, static, dyn, verdicts)


def policy_verdicts(
    bundle: Bundle,
    new: nn.Module,
    probe: dict[str, torch.Tensor],
    policies: list[AuditedPolicy],
    thresholds: Thresholds | None = None,
    dyn: dict[str, float] | None = None,
) -> list[PolicyVerdict]:
    """The dynamic audit of an adapted encoder `new` (any image encoder: merged adapter or a
    fully fine-tuned copy) against `policies` (name, policy, pinned encoder or None = base)."""
    th = thresholds or Thresholds()
    base = bundle.model.image
    if dyn is None:
        dyn = dynamic_metrics(bundle, base, new, probe)
    verdicts = []
    for pname, policy, pinned in policies:
        old = pinned if pinned is not None else base
        checks: list[Check] = []
        fp = policy.spec["pin"].get("backbone_fingerprint")
        checks.append(
            Check(
                "policy_backbone_sha256",
                fp == bundle.fingerprint,
                str(fp),
                bundle.fingerprint,
                "the policy was trained on this backbone",
            )
        )
        checks.append(
            Check(
                "policy_feature_dim",
                policy.spec["feature_dim"] == bundle.model.cfg.width,
                policy.spec["feature_dim"],
                bundle.model.cfg.width,
            )
        )
        if checks[0].passed and checks[1].passed:
            pdyn = dynamic_metrics(bundle, old, new, probe) if pinned is not None else dyn
            dev = policy_deviation(policy, bundle, old, new, probe)
            tol = float(policy.spec["tolerance"])
            for k, v in dev.items():
                if k.endswith("_mean"):
                    # On the policy's own frames the policy must behave as before (a hard
                    # check). On the new site's frames the old features are the degraded ones the
                    # adapter exists to fix, so a change there is reported, not failed.
                    own = k.startswith("policy_probe")
                    checks.append(
                        Check(
                            f"action_deviation.{k[:-5]}",
                            v <= tol,
                            v,
                            tol,
                            "mean |a_new - a_old| / action std"
                            + ("" if own else " (at the new site: expected to change)"),
                            "error" if own else "warning",
                            "<=",
                        )
                    )
                    checks.append(
                        Check(
                            f"action_deviation_margin.{k[:-5]}",
                            v <= th.warn_fraction * tol,
                            v,
                            th.warn_fraction * tol,
                            "close to the tolerance",
                            "warning",
                            "<=",
                        )
                    )
            for part in ("replay", "site"):
                if f"{part}_bct_new_old" in pdyn:
                    oo, no = pdyn[f"{part}_bct_old_old"], pdyn[f"{part}_bct_new_old"]
                    # BCT holds against the source gallery (replay); at the new site the old
                    # gallery is the degraded encoding, so falling behind it only warns.
                    checks.append(
                        Check(
                            f"bct_retrieval.{part}",
                            no >= oo - th.bct_margin,
                            no,
                            oo - th.bct_margin,
                            "new queries vs old gallery >= old vs old",
                            "error" if part == "replay" else "warning",
                            ">=",
                        )
                    )
                if f"{part}_area_new" in pdyn:
                    an, ao = pdyn[f"{part}_area_new"], pdyn[f"{part}_area_old"]
                    checks.append(
                        Check(
                            f"trimodal_area.{part}",
                            an <= ao + th.area_margin,
                            an,
                            ao + th.area_margin,
                            "mean simplex area not worse than before",
                            op="<=",
                        )
                    )
                if f"{part}_cka" in pdyn:
                    checks.append(
                        Check(
                            f"cka.{part}",
                            pdyn[f"{part}_cka"] >= th.warn_cka,
                            pdyn[f"{part}_cka"],
                            th.warn_cka,
                            "low CKA: representation moved a lot",
                            "warning",
                            ">=",
                        )
                    )
        verdicts.append(PolicyVerdict(pname, _verdict(checks), checks))
    return verdicts
