"""Adapter strength: how much of a LoRA adapter's weight update to apply.

A LoRA adapter adds ``delta W = scaling * B @ A`` to each target layer; at strength ``s`` the
encoder uses ``W0 + s * delta W`` (``s = 0`` is the base encoder, ``s = 1`` the adapter as
trained; the weight-space interpolation of WiSE-FT, Wortsman et al. 2022). Scaling ``B`` by ``s``
gives exactly that, so a scaled adapter is again a plain PEFT LoRA adapter.

A link of a continual chain (`finetune --from PARENT`) is scaled between its parent and itself
instead: ``W0 + (1 - s) delta W_parent + s delta W_link`` (`relative_peft`, a LoRA adapter of the
two ranks together), so ``s = 0`` keeps what the earlier links bought rather than undoing it.

Measured on the OOD benchmark, a policy's action deviation on its own frames and the gain at
the shifted site both grow roughly linearly with ``s``. `fit_strength` therefore picks the
largest ``s`` at which the audit against the pinned policies still passes: the most adaptation
the fleet's policies tolerate.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynaflip_adapt import activity
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.eval.audit import (
    INCOMPATIBLE,
    AuditedPolicy,
    PolicyVerdict,
    Thresholds,
    policy_verdicts,
)
from dynaflip_adapt.models.adapter import MANIFEST, PROBE_FILE, Adapter, write_manifest
from dynaflip_adapt.models.backbone import Bundle

OWN_DEVIATION = "action_deviation.policy_probe"


def _check_scalable(peft_model: Any, where: Any = None) -> None:
    cfg = peft_model.peft_config["default"]
    if getattr(cfg, "use_dora", False):
        # DoRA renormalizes W0 + delta W by a trained magnitude: scaling B does not interpolate
        # between the base and the adapted weights (s = 0 is not the base encoder).
        raise InputError(
            where, "adapter_config.use_dora", "a DoRA adapter", "a LoRA adapter (use_dora: false)"
        )


def parse_strength(text: str) -> float | None:
    """``auto`` -> None (fit it), else a number in [0, 1].

    Raises:
        InputError: Anything else.
    """
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise InputError(None, "--strength", repr(text), "'auto' or a number in [0, 1]")
    return value


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise InputError(None, "--strength", repr(strength), "a number in [0, 1] or 'auto'")


def scaled_peft(peft_model: Any, strength: float) -> Any:
    """A copy of a PEFT LoRA model whose update is scaled by `strength` (``lora_B *= s``).

    Raises:
        InputError: A DoRA adapter, or a strength outside [0, 1].
    """
    _check_strength(strength)
    _check_scalable(peft_model)
    out = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if ".lora_B." in name:
                p.mul_(strength)
    return out.eval()


def _lora_layers(peft_model: Any) -> dict[str, Any]:
    return {
        n: m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    }


def relative_peft(peft_model: Any, parent: Any, strength: float) -> Any:
    """A PEFT LoRA model whose update is ``(1 - s) delta W_parent + s delta W``: `peft_model`
    (trained on from `parent`) scaled between its parent (``s = 0``) and itself (``s = 1``).

    Each target layer gets rank ``r_parent + r``: ``A = [A_parent; A]``, ``B = [(1 - s)
    c_parent B_parent, s c B]`` with each adapter's own scaling ``c`` folded into B (the new
    adapter's alpha equals its rank: scaling 1).

    Raises:
        InputError: A DoRA adapter, a strength outside [0, 1], or two adapters on different
            layers.
    """
    from peft import get_peft_model

    _check_strength(strength)
    _check_scalable(peft_model)
    _check_scalable(parent)
    mine, theirs = _lora_layers(peft_model), _lora_layers(parent)
    if mine.keys() != theirs.keys():
        raise InputError(
            None,
            "adapter target layers",
            f"{len(mine)} layers, {len(theirs)} in the parent",
            "a link trained on from its parent (the same layers)",
        )
    cfg = copy.deepcopy(peft_model.peft_config["default"])
    rank = int(cfg.r) + int(parent.peft_config["default"].r)
    cfg.r, cfg.lora_alpha, cfg.lora_dropout = rank, rank, 0.0
    cfg.use_rslora, cfg.rank_pattern, cfg.alpha_pattern = False, {}, {}
    cfg.inference_mode = False
    base = copy.deepcopy(peft_model).unload()
    out = get_peft_model(base, cfg)
    new = _lora_layers(out)
    with torch.no_grad():
        for name, m in mine.items():
            p = theirs[name]
            a = torch.cat([p.lora_A["default"].weight, m.lora_A["default"].weight], 0)
            b = torch.cat(
                [
                    (1 - strength) * p.scaling["default"] * p.lora_B["default"].weight,
                    strength * m.scaling["default"] * m.lora_B["default"].weight,
                ],
                1,
            )
            new[name].lora_A["default"].weight.copy_(a)
            new[name].lora_B["default"].weight.copy_(b)
    return out.eval()


def scaled_encoder(peft_model: Any, strength: float, parent: Any = None) -> nn.Module:
    """A plain image encoder ``W0 + s * delta W``, or with `parent` (a PEFT model the adapter
    was trained on from) ``W0 + (1 - s) delta W_parent + s delta W`` (merged, eval mode)."""
    model = (
        scaled_peft(peft_model, strength)
        if parent is None
        else relative_peft(peft_model, parent, strength)
    )
    return model.merge_and_unload().requires_grad_(False).eval()


@dataclass
class Trial:
    strength: float
    passed: bool
    verdict: str
    own_deviation: dict[str, float]  # policy -> mean action deviation on its own frames
    failed: list[str] = field(default_factory=list)  # "policy: check" that decided it


@dataclass
class StrengthFit:
    """The chosen strength and every strength tried (in the order tried)."""

    strength: float
    budget: float
    trials: list[Trial]

    @property
    def chosen(self) -> Trial | None:
        """The audit at the chosen strength (None when nothing was audited: no policies)."""
        return next((t for t in self.trials if t.strength == self.strength), None)

    @property
    def hint(self) -> str | None:
        """What to try when full strength failed on nothing but the replay triplets' area (the
        OOD benchmark's textures case: the replay-area anchor passes it at full strength)."""
        first = self.trials[0] if self.trials else None
        if first is None or first.passed or first.strength != 1.0 or not first.failed:
            return None
        if all(f.endswith(": trimodal_area.replay") for f in first.failed):
            return (
                "at full strength only the replay triplets' simplex area failed: the recipe "
                "finetune/replay_area anchors it (finetune ... --fallback finetune/replay_area)"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "strength": self.strength,
            "budget": self.budget,
            "hint": self.hint,
            "trials": [asdict(t) for t in self.trials],
        }


def judge(verdicts: list[PolicyVerdict], budget: float) -> tuple[bool, dict[str, float], list[str]]:
    """Whether an encoder passes: no policy incompatible, and each policy's deviation on its own
    frames within `budget` x its tolerance. Returns (passed, own deviations, what failed)."""
    own: dict[str, float] = {}
    failed: list[str] = []
    for v in verdicts:
        for c in v.checks:
            if c.name == OWN_DEVIATION:
                own[v.policy] = float(c.value)
                if float(c.value) > budget * float(c.limit):
                    failed.append(f"{v.policy}: {c.name} {c.value:.3f} > {budget:g} x {c.limit:g}")
            elif c.blocks:
                failed.append(f"{v.policy}: {c.name}")
    return not failed, own, failed


def audit_at(
    bundle: Bundle,
    adapter: Adapter,
    policies: list[AuditedPolicy],
    strength: float = 1.0,
    *,
    budget: float = 1.0,
    thresholds: Thresholds | None = None,
    parent: Adapter | None = None,
) -> Trial:
    """The audit of `adapter` scaled to `strength` (between `parent` and itself when given)
    against `policies`, judged as `fit_strength` judges each strength it tries (at full
    strength also for DoRA adapters)."""
    if strength == 1.0:
        enc = adapter.merged().requires_grad_(False).eval()
    else:
        enc = scaled_encoder(
            adapter.peft_model, strength, None if parent is None else parent.peft_model
        )
    verdicts = policy_verdicts(bundle, enc, adapter.probe, policies, thresholds)
    ok, own, failed = judge(verdicts, budget)
    worst = max((v.verdict for v in verdicts), key=_rank, default="compatible")
    return Trial(strength, ok, worst, own, failed)


def fit_strength(
    bundle: Bundle,
    adapter: Adapter,
    policies: list[AuditedPolicy],
    *,
    budget: float = 1.0,
    iterations: int = 6,
    thresholds: Thresholds | None = None,
    first: Trial | None = None,
    parent: Adapter | None = None,
) -> StrengthFit:
    """The largest strength in [0, 1] at which the audit of `adapter` against `policies` (name,
    policy, pinned encoder or None) passes with each policy's own-frame action deviation within
    `budget` x its tolerance.

    Tries ``s = 1`` first; otherwise bisects on [0, 1] for `iterations` steps (resolution
    ``2**-iterations``), assuming that deviation grows with ``s`` (it does on every adapter
    measured; the returned strength was itself audited either way). With no policies, 1.
    `first`: the audit at ``s = 1`` when the caller already has it (`audit_at`, same budget and
    thresholds), so it is not run twice. `parent`: the adapter this one was trained on from;
    strengths then run from the parent (0) to this adapter (1).

    Raises:
        InputError: A DoRA adapter, or a budget that is not positive.
    """
    if not budget > 0:
        raise InputError(None, "--budget", repr(budget), "a positive fraction of the tolerance")
    _check_scalable(adapter.peft_model, adapter.path)
    trials: list[Trial] = []

    def trial(s: float) -> Trial:
        n = len(trials) + 1
        with activity.step(
            f"strength fit: auditing s = {s:.4f} (trial {n} of <= {iterations + 1})"
        ):
            t = audit_at(
                bundle, adapter, policies, s, budget=budget, thresholds=thresholds, parent=parent
            )
        trials.append(t)
        return t

    if first is not None:
        trials.append(first)
    if not policies or (first or trial(1.0)).passed:
        return StrengthFit(1.0, budget, trials)
    # lo: the largest strength seen to pass (0 = the base encoder, which passes for policies
    # pinned to the base; one pinned to an older adapter may not, and the trial at 0 says so).
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if trial(mid).passed:
            lo = mid
        else:
            hi = mid
    if lo == 0.0:
        trial(0.0)  # recorded like every other strength (the base encoder's, or the parent's)
    return StrengthFit(lo, budget, trials)


def _rank(verdict: str) -> int:
    return {"compatible": 0, "warning": 1, INCOMPATIBLE: 2}.get(verdict, 2)


def save_scaled(
    bundle: Bundle,
    adapter: Adapter,
    strength: float,
    out: Path,
    *,
    fit: StrengthFit | None = None,
    lineage: dict[str, Any] | None = None,
    parent: Adapter | None = None,
) -> Path:
    """Writes `adapter` at `strength` as adapter folder `out` (PEFT files, the same probe set,
    a manifest whose lineage records the strength and `lineage`, geometry recomputed); `out`
    may be the adapter's own folder. With `parent`, the strength runs from the parent to the
    adapter (`relative_peft`) and the lineage says so (``strength_from: parent``).

    The folder is written beside `out` and renamed into place, so a failure leaves `out` as it
    was.
    """
    from dynaflip_adapt.train.finetune import geometry_fingerprint

    model = (
        scaled_peft(adapter.peft_model, strength)
        if parent is None
        else relative_peft(adapter.peft_model, parent.peft_model, strength)
    )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
    if (adapter.path / PROBE_FILE).exists():
        shutil.copyfile(adapter.path / PROBE_FILE, tmp / PROBE_FILE)
    with torch.no_grad():
        geometry = geometry_fingerprint(bundle, model, adapter.probe) if adapter.probe else {}
    m = {k: v for k, v in adapter.manifest.items() if k not in ("files", MANIFEST)}
    m.pop("kind", None)
    m.pop("adapter_version", None)
    prior = float(m.get("lineage", {}).get("strength", 1.0))
    m["lineage"] = {
        **m.get("lineage", {}),
        **(lineage or {}),
        # Relative to the update as trained: composes over repeated scaling.
        "strength": prior * strength,
    }
    if parent is not None:
        m["lineage"]["strength"] = strength
        m["lineage"]["strength_from"] = "parent"
    if fit is not None:
        m["strength_fit"] = fit.to_dict()
    m["geometry"] = geometry
    write_manifest(tmp, m)
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
