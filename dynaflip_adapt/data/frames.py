"""Frames from logs at a model's input size: resizing, and an even sample over many episodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from dynaflip_adapt.data.logs import LogSet


def resize_uint8(rgb: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) uint8 -> same at size x size (bilinear, antialiased)."""
    x = rgb if rgb.ndim == 4 else rgb[None]
    if x.shape[-2:] != (size, size):
        y = F.interpolate(
            x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = y.round().clamp(0, 255).to(torch.uint8)
    return x if rgb.ndim == 4 else x[0]


@dataclass
class FrameSample:
    """Frames (N, 3, S, S) uint8 and the episode each came from (N,)."""

    frames: torch.Tensor
    episodes: torch.Tensor


def sample_frames(logs: LogSet, image_size: int, count: int) -> FrameSample:
    """`count` frames spread evenly over every frame of every episode of `logs`."""
    from dynaflip_adapt.data.logs import EpisodeReader

    lengths = [ep.length for ep in logs.episodes]
    total = sum(lengths)
    if total == 0 or count <= 0:
        empty = torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)
        return FrameSample(empty, torch.zeros(0, dtype=torch.long))
    picks = torch.linspace(0, total - 1, min(count, total)).round().long().tolist()
    starts = np.cumsum([0, *lengths])
    reader = EpisodeReader()
    frames, episodes = [], []
    try:
        for g in picks:
            i = int(np.searchsorted(starts, g, side="right")) - 1
            t = g - int(starts[i])
            rgb = reader.rgb(logs.episodes[i], slice(t, t + 1)).transpose(0, 3, 1, 2)
            frames.append(resize_uint8(torch.from_numpy(np.ascontiguousarray(rgb)), image_size))
            episodes.append(i)
    finally:
        reader.close()
    return FrameSample(torch.cat(frames), torch.tensor(episodes, dtype=torch.long))
