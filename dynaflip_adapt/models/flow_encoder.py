"""A PointNet-style encoder over 3D flow: points (x, y, z, dx, dy, dz) with a validity mask."""

from __future__ import annotations

import torch
from torch import nn

DELTA_SCALE = 20.0  # 5 cm of motion -> 1.0


def flow_features(points: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-point inputs (B, P, 6): positions centred on the mean valid point (translation
    invariance: world frames differ between robots) and scaled displacements."""
    m = mask.float().unsqueeze(-1)
    centre = (points * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1.0)
    return torch.cat([(points - centre) * m, delta * DELTA_SCALE * m], dim=-1)


class FlowEncoder(nn.Module):
    """Shared per-point MLP, then masked max- and mean-pooling, then an MLP to `embed_dim`."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.point = nn.Sequential(
            nn.Linear(6, width),
            nn.GELU(),
            nn.Linear(width, width),
            nn.LayerNorm(width),
            nn.GELU(),
            nn.Linear(width, width),
        )
        self.head = nn.Sequential(
            nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, embed_dim)
        )

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, P, 6) features and (B, P) mask -> (B, embed_dim); a set with no valid point
        pools to zeros."""
        h = self.point(feats)
        m = mask.unsqueeze(-1)
        any_valid = mask.any(dim=1, keepdim=True).float()
        hmax = torch.where(m, h, torch.finfo(h.dtype).min).amax(dim=1) * any_valid
        hmean = (h * m.float()).sum(1) / m.float().sum(1).clamp(min=1.0)
        return self.head(torch.cat([hmax, hmean], dim=-1))
