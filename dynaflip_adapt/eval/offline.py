"""Offline scores of an encoder against the policies that read it, on held-out frames.

- action error of each policy on held-out episodes of the shifted site (MSE in units of the
  policy's action std, per dimension too), and on held-out base-site episodes (retention);
- paired feature drift where paired logs exist (same motion rendered at both sites): mean
  distance between a frame's shifted-site features and the base encoder's features of the same
  frame at the base site, divided by the mean distance between two random base frames (1.0 = as
  far apart as unrelated frames, 0 = invariant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
    z = (policy.act(features, proprio, language) - actions) / policy.action_scale
    per_dim = (z**2).mean(0)
    return {"mse": float(per_dim.mean()), "per_dim": [float(v) for v in per_dim]}


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def errors(frames: Frames) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        out = {
            p: action_error(
                pol,
                policy_input(pol, frames, encoder, pre, cache),
                frames["proprio"],
                frames["actions"],
                frames.get("language"),
            )
            for p, pol in policies.items()
        }
        if "features" not in cache:  # paired drift is measured on the pooled features
            cache["features"] = encode_frames(encoder, pre, frames["rgb"])
        return out, cache["features"]

    shifted_err, fs = errors(shifted)
    out = EncoderEval(name, shifted_err)
    if base is not None:
        out.base = errors(base)[0]
    if paired is not None:
        ref = base_paired_features
        if ref is None:
            ref = encode_frames(bundle.model.image, pre, paired["rgb"])
        out.paired_drift = paired_drift(fs, ref)
    return out
