"""Representation-comparison metrics (pure tensor functions)."""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between feature matrices (n, p) and (n, q).

    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred features. Invariant to
    rotations and isotropic scaling, so a high CKA does not by itself mean a fixed linear head
    still works.
    """
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den.clamp(min=1e-30))


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows."""
    return float(torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).mean())
