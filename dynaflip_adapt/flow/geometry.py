"""Pixel grids and back-projection shared by the simulator's ground truth and the extractor.

Conventions: OpenCV pinhole K with pixel centres at integer coordinates (cx = (W - 1) / 2 for a
centred camera), camera axes x right / y down / z forward, camera-to-world extrinsics.
"""

from __future__ import annotations

import numpy as np


def grid_pixels(height: int, width: int, stride: int) -> np.ndarray:
    """(P, 2) integer pixel grid (u, v) at cell centres, row-major."""
    us = np.arange(stride // 2, width, stride)
    vs = np.arange(stride // 2, height, stride)
    u, v = np.meshgrid(us, vs)
    return np.stack([u.ravel(), v.ravel()], axis=1).astype(np.int64)


def backproject(
    depth: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray, uv: np.ndarray
) -> np.ndarray:
    """World points (N, 3) of integer pixels `uv` (N, 2 as u, v) with their z-depth."""
    z = depth[uv[:, 1], uv[:, 0]].astype(np.float64)
    x = (uv[:, 0] - K[0, 2]) / K[0, 0] * z
    y = (uv[:, 1] - K[1, 2]) / K[1, 1] * z
    pc = np.stack([x, y, z], axis=1)
    return pc @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]


def project(
    points: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) and z-depth (N,) of world points."""
    W = np.linalg.inv(cam_to_world)
    pc = points @ W[:3, :3].T + W[:3, 3]
    z = pc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * pc[:, 0] / z + K[0, 2]
        v = K[1, 1] * pc[:, 1] / z + K[1, 2]
    return np.stack([u, v], axis=1), z
