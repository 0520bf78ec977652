"""Linear CKA and drift metrics against independent computations."""

from __future__ import annotations

import torch

from dynaflip_adapt.losses import relative_mse
from dynaflip_adapt.metrics import linear_cka, mean_cosine


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Independent form: CKA via centred Gram matrices, HSIC(K, L) = tr(K H L H)."""
    n = x.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ H @ b @ H)  # noqa: E731
    return float(hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L)))


def test_cka_matches_the_hsic_form():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    y = x @ torch.randn(8, 6, generator=g) + 0.5 * torch.randn(50, 6, generator=g)
    assert abs(linear_cka(x, y) - _hsic_cka(x, y)) < 1e-10


def test_cka_invariances_and_independence():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert abs(linear_cka(x, x @ q) - 1.0) < 1e-9  # a rotation keeps CKA at 1...
    assert abs(linear_cka(x, 3 * x + 2) - 1.0) < 1e-9
    assert linear_cka(x, torch.randn(200, 16, generator=g)) < 0.2
    # ...while a fixed linear head sees something else entirely: why the audit runs policies too.
    w = torch.randn(16, 1, generator=g)
    assert (x @ w - (x @ q) @ w).abs().mean() > 0.5


def test_relative_mse_and_cosine():
    t = torch.ones(4, 3)
    assert float(relative_mse(t, t)) == 0.0
    assert abs(float(relative_mse(2 * t, t)) - 1.0) < 1e-6
    assert abs(mean_cosine(t, -t) + 1.0) < 1e-6
