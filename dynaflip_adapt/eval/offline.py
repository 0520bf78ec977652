"""Offline scores of an encoder against the policies that read it, on held-out frames.

- action error of each policy on held-out episodes of the shifted site (MSE in units of the
  policy's action std, per dimension too), and on held-out base-site episodes (retention);
- the relative change of each error between two encoders on the same frames, with a 95%
  interval from resampling whole episodes (both encoders' errors resampled together);
- paired feature drift where paired logs exist (same motion rendered at both sites): mean
  distance between a frame's shifted-site features and the base encoder's features of the same
  frame at the base site, divided by the mean distance between two random base frames (1.0 = as
  far apart as unrelated frames, 0 = invariant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.policies import Policy, encode_frames, policy_input

Frames = dict[str, torch.Tensor]  # rgb (N,3,S,S) uint8, proprio, actions, episode


@torch.no_grad()
def action_error(
    policy: Policy,
    features: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    language: torch.Tensor | None = None,
) -> dict[str, Any]:
    """MSE of the policy's actions in units of its action std: overall and per dimension."""
    return summarize(frame_errors(policy, features, proprio, actions, language))


def summarize(squared: torch.Tensor) -> dict[str, Any]:
    """Per-frame squared errors (N, D) -> their mean and per-dimension means."""
    per_dim = squared.mean(0)
    return {"mse": float(per_dim.mean()), "per_dim": [float(v) for v in per_dim]}


@torch.no_grad()
def frame_errors(
    policy: Policy,
    features: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    language: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared action error of every frame and dimension in units of the action std (N, D)."""
    z = (policy.act(features, proprio, language) - actions) / policy.action_scale
    return z**2


def relative_change(
    before: np.ndarray | torch.Tensor,
    after: np.ndarray | torch.Tensor,
    episodes: np.ndarray | torch.Tensor,
    *,
    reps: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """sum(after) / sum(before) - 1 over the same frames, with its percentile-bootstrap interval.

    Each resample draws as many episodes as there are, with replacement, and takes both
    encoders' errors on the drawn episodes, so what the episodes share (their difficulty)
    cancels. One episode gives a zero-width interval.
    """
    b = np.asarray(before, dtype=np.float64).reshape(-1)
    a = np.asarray(after, dtype=np.float64).reshape(-1)
    ids = np.unique(np.asarray(episodes).reshape(-1), return_inverse=True)[1]
    if not (b.shape == a.shape == ids.shape) or b.size == 0:
        raise ValueError(f"before ({b.size}), after ({a.size}), episodes ({ids.size}) must match")
    n = int(ids.max()) + 1
    sb, sa = np.bincount(ids, weights=b, minlength=n), np.bincount(ids, weights=a, minlength=n)
    if sb.sum() <= 0:
        raise ValueError("the errors before are all zero: no relative change")
    draws = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=reps)
    boot = (draws @ sa) / np.maximum(draws @ sb, 1e-300) - 1
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(sa.sum() / sb.sum() - 1), float(lo), float(hi)


def paired_drift(new_shifted: torch.Tensor, base_reference: torch.Tensor) -> float:
    """Mean ||f_new(x_shifted_i) - f_base(x_base_i)|| over paired frames, divided by the mean
    distance between base features of frames i and i + N/2 (unrelated frames)."""
    n = len(base_reference)
    if n < 2:
        raise ValueError("paired drift needs at least two paired frames")
    d = (new_shifted - base_reference).norm(dim=1).mean()
    other = base_reference.roll(n // 2, dims=0)
    return float(d / (base_reference - other).norm(dim=1).mean().clamp_min(1e-12))


@dataclass
class EncoderEval:
    """One encoder's numbers on one shifted site (and the base site)."""

    encoder: str
    shifted: dict[str, dict[str, Any]]
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    paired_drift: float | None = None
    audit: str | None = None
    audit_detail: dict[str, Any] = field(default_factory=dict)
    # Per-frame errors (mean over action dimensions) by part ("shifted", "base") and policy,
    # with the frames' episodes: for intervals on changes; not part of the report.
    frames: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    episodes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["frames"], out["episodes"]
        return out

    def change(self, other: EncoderEval, part: str, policy: str) -> tuple[float, float, float]:
        """This encoder's error on `part` relative to `other`'s on the same frames - 1, with
        its 95% episode-bootstrap interval (`relative_change`)."""
        return relative_change(
            other.frames[part][policy], self.frames[part][policy], self.episodes[part]
        )


def evaluate_encoder(
    bundle: Bundle,
    name: str,
    encoder: nn.Module,
    policies: dict[str, Policy],
    shifted: Frames,
    base: Frames | None = None,
    paired: Frames | None = None,
    base_paired_features: torch.Tensor | None = None,
) -> EncoderEval:
    """Action errors of every policy with `encoder` on the shifted (and base) held-out frames;
    `paired` are the base-site renders of the shifted frames, in the same order."""
    pre = bundle.model.preprocess

    out = EncoderEval(name, {})

    def errors(part: str, frames: Frames) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        res, per_frame = {}, {}
        for p, pol in policies.items():
            se = frame_errors(
                pol,
                policy_input(pol, frames, encoder, pre, cache),
                frames["proprio"],
                frames["actions"],
                frames.get("language"),
            )
            res[p] = summarize(se)
            per_frame[p] = se.mean(1)
        out.frames[part] = per_frame
        out.episodes[part] = frames["episode"]
        if "features" not in cache:  # paired drift is measured on the pooled features
            cache["features"] = encode_frames(encoder, pre, frames["rgb"])
        return res, cache["features"]

    out.shifted, fs = errors("shifted", shifted)
    if base is not None:
        out.base = errors("base", base)[0]
    if paired is not None:
        ref = base_paired_features
        if ref is None:
            ref = encode_frames(bundle.model.image, pre, paired["rgb"])
        out.paired_drift = paired_drift(fs, ref)
    return out
