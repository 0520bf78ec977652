"""Loss functions: pure tensor functions, computed in fp32 even under autocast.

Notation: ``a`` image-transition, ``b`` language, ``c`` 3D-flow embeddings, each (B, D) and
L2-normalized (on the unit hypersphere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AREA_EPS = 1e-12


def _f32(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def triangle_area(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Area of the triangle (a_i, b_i, c_i), edge form: (B,).

    ``area = 0.5 * sqrt(clamp(|u|^2 |v|^2 - (u.v)^2, min=eps))`` with ``u = b - a, v = c - a``.
    The clamp keeps the gradient finite when two or three vertices coincide (docs/design.md); it
    also sets a floor: areas below ``0.5 * sqrt(eps) = 5e-7`` read as 5e-7. Works for any vectors,
    unit or not.
    """
    a, b, c = _f32(a, b, c)
    u, v = b - a, c - a
    uu = (u * u).sum(-1)
    vv = (v * v).sum(-1)
    uv = (u * v).sum(-1)
    return 0.5 * torch.sqrt(torch.clamp(uu * vv - uv * uv, min=AREA_EPS))


def gram_area(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Area from the Gram determinant of the edges, ``0.5 * sqrt(det([u v]^T [u v]))``.

    Mathematically equal to `triangle_area`; kept as an independent reference for tests (use it
    in fp64: in fp32 its determinant loses precision near alignment).
    """
    u, v = b - a, c - a
    edges = torch.stack([u, v], dim=-1)  # (B, D, 2)
    gram = edges.transpose(-1, -2) @ edges
    return 0.5 * torch.sqrt(torch.clamp(torch.linalg.det(gram), min=0.0))


def pairwise_area(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``E[i, j] = area(a_i, b_j, c_j)`` for unit vectors: (B, B), from dot products only.

    With unit vectors, ``|b - a|^2 = 2 - 2 a.b``, ``|c - a|^2 = 2 - 2 a.c`` and
    ``(b - a).(c - a) = b.c - a.b - a.c + 1``, so the B x B energies cost two matmuls.
    """
    a, b, c = _f32(a, b, c)
    ab = a @ b.T
    ac = a @ c.T
    bc = (b * c).sum(-1)[None, :]
    uu = 2.0 - 2.0 * ab
    vv = 2.0 - 2.0 * ac
    uv = bc - ab - ac + 1.0
    return 0.5 * torch.sqrt(torch.clamp(uu * vv - uv * uv, min=AREA_EPS))


def cosine_regularizer(
    b: torch.Tensor, c: torch.Tensor, margin: float | None = None
) -> torch.Tensor:
    """The language-flow cosine term.

    With ``margin=None``: mean ``1 - cos(b_i, c_i)`` (pull together). With a margin ``m``: mean
    ``relu(cos(b_i, c_i) - m)``, which keeps the two anchors from coinciding. That is what stops
    degenerate simplices: when ``b = c`` every triangle ``(a, b, c)`` has zero area whatever the
    image ``a``, so minimising area would collapse language onto flow and leave the contrastive
    term without signal (measured: it then stays at chance).
    """
    b, c = _f32(b, c)
    cos = F.cosine_similarity(b, c, dim=-1)
    if margin is None:
        return (1.0 - cos).mean()
    return F.relu(cos - margin).mean()


def area_infonce(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """InfoNCE with the triangle area as energy, in-batch negatives, both directions.

    ``logits[i, j] = -area(a_i, b_j, c_j) * exp(logit_scale)``: image i against the (language,
    flow) pair of sample j (the non-anchor modalities swap jointly), and the transpose for
    (language, flow) pair i against image j. Targets are the diagonal.
    """
    energy = pairwise_area(a, b, c)
    logits = -energy * logit_scale.float().exp()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing)
    )


def cosine_infonce(
    x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Symmetric CLIP-style InfoNCE on cosine similarity (used for the temporal term: frames
    t and t + k of the same pair are positives)."""
    x, y = _f32(x, y)
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = (x @ y.T) * logit_scale.float().exp()
    target = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (
        F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, target, label_smoothing=label_smoothing)
    )


def vocabulary_infonce(
    x: torch.Tensor,
    vocab: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of each row of `x` against every entry of a small vocabulary (cosine
    logits), target index `target`: InfoNCE whose negatives are all the other instructions
    rather than the batch's (a batch repeats instructions, which in-batch InfoNCE would count
    as negatives)."""
    x, vocab = _f32(x, vocab)
    x, vocab = F.normalize(x, dim=-1), F.normalize(vocab, dim=-1)
    logits = (x @ vocab.T) * logit_scale.float().exp()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where `mask` (pred.shape[:-1]) is true."""
    pred, target = _f32(pred, target)
    m = mask.float().unsqueeze(-1)
    return ((pred - target) ** 2 * m).sum() / (m.sum() * pred.shape[-1]).clamp(min=1.0)


def variance_floor(x: torch.Tensor, target: float, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance term (Bardes et al. 2022): mean over dimensions of
    ``relu(target - sqrt(var_batch + eps))`` for features (B, D)."""
    std = torch.sqrt(x.var(dim=0) + eps)
    return F.relu(target - std).mean()


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s - t)^2) / mean(t^2)``: feature drift relative to the teacher's energy (what a
    fixed downstream head sees, scale included). The teacher gets no gradient."""
    s, t = student.float(), teacher.detach().float()
    return ((s - t) ** 2).mean() / (t**2).mean().clamp(min=1e-12)


def bct_influence(
    queries: torch.Tensor, gallery: torch.Tensor, targets: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Backward-compatible training's influence loss (Shen et al. 2020): the new encoder's
    features (`queries`, B x D) must retrieve their entries `targets` in a gallery of the old
    encoder's features (G x D): cross-entropy over cosine similarities / `temperature`."""
    q, g = _f32(queries, gallery)
    logits = F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T / temperature
    return F.cross_entropy(logits, targets)
