"""Has a site drifted from what its production encoder fits? A label-free score on new logs.

The signal is the distribution of the encoder's patch-token map, the spatial features policies
that read tokens consume and the ones a camera move changes (the CLS feature barely moved for a
moved camera in the simulator; see docs/design.md, "Drift"). Per frame, the token map is pooled
to a coarse grid (layout kept, size bounded for any ViT), standardised with the reference
frames' per-dimension mean and spread, and randomly projected (a fixed seed) to
`SIGNATURE_DIMS` dimensions. The score is the unbiased squared maximum mean discrepancy (MMD^2)
between the new frames' and the reference frames' signatures with a Gaussian kernel whose
bandwidth is the median distance between reference signatures. Its null spread is measured on
the reference itself: MMD^2 between random halves of the reference *episodes* (frames of one
episode are correlated, so frame-level permutations would understate it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dynaflip_adapt.models.vit import VisionTransformer

SIGNATURE_DIMS = 256
GRID = 4  # token maps are pooled to GRID x GRID before projection


def token_maps(
    encoder: VisionTransformer,
    preprocess: Callable[[torch.Tensor], torch.Tensor],
    frames: torch.Tensor,
    batch: int = 128,
) -> torch.Tensor:
    """Patch-token maps pooled to GRID x GRID and flattened: (N, GRID * GRID * width)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            grid = encoder.patch_tokens(preprocess(frames[i : i + batch])).float()
            out.append(F.adaptive_avg_pool2d(grid, GRID).flatten(1))
    return torch.cat(out)


@dataclass
class Signature:
    """The standardisation and projection fitted on the reference (applied to every sample)."""

    mean: torch.Tensor
    scale: torch.Tensor
    projection: torch.Tensor

    @classmethod
    def fit(cls, reference: torch.Tensor, dims: int = SIGNATURE_DIMS, seed: int = 0) -> Signature:
        sd = reference.std(0)
        scale = torch.maximum(sd, 0.1 * sd.median()) + 1e-6
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(reference.shape[1], dims, generator=g) / reference.shape[1] ** 0.5
        return cls(reference.mean(0), scale, proj)

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        return ((maps - self.mean) / self.scale) @ self.projection


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased MMD^2 between samples `x` (n, d) and `y` (m, d), Gaussian kernel
    ``exp(-|a - b|^2 / (2 bandwidth^2))``; n, m >= 2."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError("MMD^2 needs at least two samples on each side")
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).pow(2))
    kyy = torch.exp(-gamma * torch.cdist(y, y).pow(2))
    kxy = torch.exp(-gamma * torch.cdist(x, y).pow(2))
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def median_distance(x: torch.Tensor) -> float:
    """The median distance between distinct rows of `x` (the kernel's bandwidth)."""
    d = torch.cdist(x, x)
    iu = torch.triu_indices(len(x), len(x), offset=1)
    return float(d[iu[0], iu[1]].median().clamp_min(1e-6))


@dataclass
class DriftScore:
    """The score, its null spread on the reference, and the sizes it was measured on."""

    score: float
    null_median: float
    null_q95: float
    p_value: float
    bandwidth: float
    reference_frames: int
    reference_episodes: int
    new_frames: int

    def to_dict(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def drift_score(
    reference: torch.Tensor,
    reference_episodes: torch.Tensor,
    new: torch.Tensor,
    *,
    splits: int = 100,
    seed: int = 0,
) -> DriftScore:
    """MMD^2 between the signatures of `new` and `reference` token maps (see the module
    docstring), with the null from `splits` random halvings of the reference episodes (or of
    its frames, when it has fewer than 4 episodes)."""
    sig = Signature.fit(reference, seed=seed)
    ref, cur = sig(reference), sig(new)
    bw = median_distance(ref)
    score = mmd2(ref, cur, bw)
    g = torch.Generator().manual_seed(seed + 1)
    units = torch.unique(reference_episodes)
    by_episode = len(units) >= 4
    null = []
    for _ in range(splits):
        if by_episode:
            half = units[torch.randperm(len(units), generator=g)[: len(units) // 2]]
            mask = torch.isin(reference_episodes, half)
        else:
            mask = torch.zeros(len(ref), dtype=torch.bool)
            mask[torch.randperm(len(ref), generator=g)[: len(ref) // 2]] = True
        if mask.sum() >= 2 and (~mask).sum() >= 2:
            null.append(mmd2(ref[mask], ref[~mask], bw))
    spread = np.asarray(null or [0.0])
    return DriftScore(
        score=score,
        null_median=float(np.median(spread)),
        null_q95=float(np.quantile(spread, 0.95)),
        p_value=float((1 + (spread >= score).sum()) / (1 + len(spread))),
        bandwidth=bw,
        reference_frames=len(reference),
        reference_episodes=len(units),
        new_frames=len(new),
    )


def action_drift(reference: torch.Tensor, new: torch.Tensor, scale: torch.Tensor) -> float:
    """MMD^2 between a policy's actions on the reference frames and on the new frames (N, A),
    each dimension in units of the policy's action std `scale` (A,); Gaussian kernel with the
    median reference distance as bandwidth."""
    ref, cur = reference / scale, new / scale
    return mmd2(ref, cur, median_distance(ref))
