"""(image transition, language, 3D flow) triplets for training, built on FramePairDataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dynaflip_adapt.data.dataset import FramePairDataset
from dynaflip_adapt.data.frames import resize_uint8

MOVING = 0.002  # metres: displacement above which a point counts as moving


def sample_points(
    points: np.ndarray,
    delta: np.ndarray,
    valid: np.ndarray,
    n: int,
    rng: np.random.Generator,
    pixels: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Up to `n` valid points, half of them moving when there are enough (moving points are a
    few percent of a scene, and they carry the dynamics); padded with masked zeros. With
    `pixels` (P, 2), their image coordinates too (a fourth array)."""
    idx_valid = np.flatnonzero(valid)
    moving = idx_valid[np.linalg.norm(delta[idx_valid], axis=-1) > MOVING]
    static = np.setdiff1d(idx_valid, moving, assume_unique=True)
    take_m = rng.choice(moving, min(len(moving), n // 2), replace=False) if len(moving) else moving
    rest = n - len(take_m)
    take_s = rng.choice(static, min(len(static), rest), replace=False) if len(static) else static
    idx = np.concatenate([take_m, take_s]).astype(np.int64)
    if len(idx) < n and len(moving) > len(take_m):
        extra = np.setdiff1d(moving, take_m)[: n - len(idx)]
        idx = np.concatenate([idx, extra])
    P = np.zeros((n, 3), np.float32)
    D = np.zeros((n, 3), np.float32)
    M = np.zeros(n, bool)
    P[: len(idx)], D[: len(idx)], M[: len(idx)] = points[idx], delta[idx], True
    if pixels is None:
        return P, D, M
    U = np.zeros((n, 2), np.float32)
    U[: len(idx)] = pixels[idx]
    return P, D, M, U


class TripletDataset(Dataset[dict[str, Any]]):
    """Items: ``rgb0``/``rgb1`` uint8 at the model's input size, ``text`` (instruction index),
    ``flow_points``/``flow_delta`` (n, 3), ``flow_mask`` (n,).

    Point sampling is seeded by (seed, index), so an item is the same in every epoch, process
    and DataLoader worker.
    """

    def __init__(
        self,
        pairs: FramePairDataset,
        image_size: int,
        n_points: int,
        instructions: list[str],
        seed: int = 0,
    ) -> None:
        self.pairs = pairs
        self.image_size = image_size
        self.n_points = n_points
        self.index = {s: i for i, s in enumerate(instructions)}
        self.seed = seed
        self.has_flow = "flow" in pairs.fields

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.pairs[i]
        out: dict[str, Any] = {
            "rgb0": resize_uint8(it["rgb0"], self.image_size),
            "rgb1": resize_uint8(it["rgb1"], self.image_size),
            "text": self.index.get(it["language"], -1),
            "episode": it["episode"],
        }
        n = self.n_points
        # Image coordinates of the points, where the logs have them (zeros and no mask: the
        # per-point terms then skip the item; every item has the key so batches collate).
        u = np.zeros((n, 2), np.float32)
        has_pixels = False
        if self.has_flow:
            rng = np.random.default_rng([self.seed, i])
            px = it.get("flow_pixels")
            drawn = sample_points(
                it["flow_points"].numpy(),
                it["flow_delta"].numpy(),
                it["flow_valid"].numpy(),
                n,
                rng,
                None if px is None else px.numpy(),
            )
            p, d, m = drawn[:3]
            if px is not None:
                u, has_pixels = drawn[3], True
        else:
            p, d, m = np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32), np.zeros(n, bool)
        out["flow_points"] = torch.from_numpy(p)
        out["flow_delta"] = torch.from_numpy(d)
        out["flow_mask"] = torch.from_numpy(m)
        out["flow_pixels"] = torch.from_numpy(u)
        out["flow_has_pixels"] = torch.tensor(has_pixels)
        return out
