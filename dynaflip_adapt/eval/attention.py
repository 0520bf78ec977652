"""Where the encoder attends: attention rollout (Abnar & Zuidema, 2020) as heat-map PNGs.

For each block the head-averaged attention is mixed with the identity (the residual path),
row-normalised, and the blocks are multiplied; the CLS row over the patches is the map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dynaflip_adapt.models.vit import VisionTransformer


@torch.no_grad()
def attention_rollout(vit: VisionTransformer | torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rollout maps (B, grid, grid) in [0, 1] for normalized images x (B, 3, S, S).

    `vit` is a `VisionTransformer`, or one with a LoRA adapter merged in (same class).
    """
    assert isinstance(vit, VisionTransformer)
    maps = vit.attention_maps(x)  # per block: (B, heads, 1 + N, 1 + N)
    n = maps[0].shape[-1]
    eye = torch.eye(n)
    roll = eye.expand(x.shape[0], n, n).clone()
    for a in maps:
        a = 0.5 * a.mean(dim=1) + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        roll = a @ roll
    cls = roll[:, 0, 1:]
    g = vit.patch_embed.grid
    cls = cls.reshape(-1, g, g)
    lo = cls.amin(dim=(1, 2), keepdim=True)
    hi = cls.amax(dim=(1, 2), keepdim=True)
    return (cls - lo) / (hi - lo).clamp(min=1e-12)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A jet heat map (h, w in [0, 1]) blended over an RGB uint8 frame (H, W, 3)."""
    import cv2

    h = cv2.resize(
        heat.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC
    )
    colored = cv2.applyColorMap(np.clip(h * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    colored = cv2.cvtColor(colored, cv2.COLOR_BGR2RGB)
    return (alpha * colored + (1 - alpha) * rgb).round().astype(np.uint8)


HEADER = 22  # pixels of the label strip above the columns


def save_grid(
    rows: list[list[np.ndarray]],
    path: str | Path,
    scale: int = 3,
    labels: list[str] | None = None,
) -> Path:
    """Writes rows of equally sized RGB tiles as one PNG (nearest-neighbour upscaled), with
    `labels` (one per column) written in a white strip above the columns."""
    import cv2

    grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
    grid = cv2.resize(
        grid, (grid.shape[1] * scale, grid.shape[0] * scale), interpolation=cv2.INTER_NEAREST
    )
    if labels:
        tile_w = rows[0][0].shape[1] * scale
        strip = np.full((HEADER, grid.shape[1], 3), 255, np.uint8)
        for i, text in enumerate(labels):
            cv2.putText(
                strip, text, (i * tile_w + 4, HEADER - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                (0, 0, 0), 1, cv2.LINE_AA,
            )  # fmt: skip
        grid = np.concatenate([strip, grid], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        from dynaflip_adapt.errors import RuntimeFailure

        raise RuntimeFailure(f"{path}: could not write the PNG")
    return path
