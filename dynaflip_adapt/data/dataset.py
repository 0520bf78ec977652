"""A streaming torch Dataset of frame pairs (t, t + gap) from site logs.

Only metadata is read at construction; each item reads exactly the frames it needs. HDF5 handles
are opened lazily in the process that reads (one set per DataLoader worker), so memory does not
grow with the size of the logs and several workers are safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dynaflip_adapt.data.logs import Episode, EpisodeReader, LogSet
from dynaflip_adapt.errors import InputError

OPTIONAL_FIELDS = ("depth", "intrinsics", "extrinsics", "flow", "proprio")


class FramePairDataset(Dataset[dict[str, Any]]):
    """Frame pairs with their language, actions and, when every episode has them, depth, K,
    extrinsics, proprio and 3D flow.

    Each item is a dict:
        ``rgb0``, ``rgb1``: (3, H, W) uint8; ``actions``: (A,) float32 at t; ``language``: str;
        ``episode``, ``t``: ints; optional ``proprio`` (D,), ``depth0``/``depth1`` (H, W) metres,
        ``K`` (3, 3), ``cam_to_world0``/``cam_to_world1`` (4, 4), and for flow of stride == gap
        ``flow_points``/``flow_delta`` (P, 3) and ``flow_valid`` (P,) bool.

    Args:
        logs: Opened logs.
        gap: Frames between the two ends of a pair (k).
        fields: Optional fields to load; ``None`` means every field all episodes share.
        require: Optional fields that must be present (InputError otherwise).
        flow_source: Which ``flow/<source>`` to read.
        episodes: Restrict to these episode indices (for splits).
    """

    def __init__(
        self,
        logs: LogSet,
        *,
        gap: int = 1,
        fields: Sequence[str] | None = None,
        require: Sequence[str] = (),
        flow_source: str | None = None,
        episodes: Sequence[int] | None = None,
    ) -> None:
        if gap < 1:
            raise InputError(None, "gap", str(gap), "an integer >= 1")
        all_eps = logs.episodes
        idx = list(range(len(all_eps))) if episodes is None else list(episodes)
        self.episodes: list[Episode] = [all_eps[i] for i in idx]
        self.gap = gap
        self.flow_source = flow_source
        available = [f for f in OPTIONAL_FIELDS if all(self._has(e, f) for e in self.episodes)]
        for f in require:
            missing = [e for e in self.episodes if not self._has(e, f)]
            if missing:
                e = missing[0]
                raise InputError(
                    e.file,
                    f"{e.group}",
                    f"no {f}"
                    + (f" of stride {gap}" if f == "flow" else "")
                    + f" in {len(missing)} of {len(self.episodes)} episodes",
                    f"{f} in every episode (run `flow extract --stride {gap}`)"
                    if f == "flow"
                    else f"{f} in every episode",
                )
        wanted = available if fields is None else [f for f in fields if f in available]
        self.fields = tuple(wanted)
        counts = np.array([max(0, e.length - gap) for e in self.episodes], dtype=np.int64)
        if counts.sum() == 0:
            raise InputError(
                self.episodes[0].file if self.episodes else None,
                "episodes",
                f"no frame pairs at gap {gap}",
                f"episodes longer than {gap} frames",
            )
        self._ep_of = np.repeat(np.arange(len(self.episodes)), counts)
        self._t_of = np.concatenate([np.arange(c) for c in counts])
        self.reader = EpisodeReader()

    def file_groups(self) -> np.ndarray:
        """For every pair, the index of its log file (one site's logs) among this set's files."""
        files = {f: i for i, f in enumerate(dict.fromkeys(str(e.file) for e in self.episodes))}
        per_episode = np.array([files[str(e.file)] for e in self.episodes], dtype=np.int64)
        return per_episode[self._ep_of]

    def _has(self, ep: Episode, f: str) -> bool:
        if f == "flow":
            return ep.flow(self.flow_source, self.gap) is not None
        return ep.has(f)

    def __len__(self) -> int:
        return int(self._ep_of.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        e_i = int(self._ep_of[i])
        t = int(self._t_of[i])
        ep = self.episodes[e_i]
        r = self.reader
        t1 = t + self.gap
        pair = r.rgb(ep, slice(t, t1 + 1, self.gap))  # (2, H, W, 3) in one read
        item: dict[str, Any] = {
            "rgb0": torch.from_numpy(np.ascontiguousarray(pair[0].transpose(2, 0, 1))),
            "rgb1": torch.from_numpy(np.ascontiguousarray(pair[1].transpose(2, 0, 1))),
            "actions": torch.from_numpy(r.actions(ep, t)),
            "language": ep.language or "",
            "episode": e_i,
            "t": t,
        }
        if "proprio" in self.fields:
            item["proprio"] = torch.from_numpy(r.proprio(ep, t))
        if "depth" in self.fields:
            d = r.depth(ep, slice(t, t1 + 1, self.gap))
            item["depth0"] = torch.from_numpy(np.ascontiguousarray(d[0]))
            item["depth1"] = torch.from_numpy(np.ascontiguousarray(d[1]))
        if "intrinsics" in self.fields:
            item["K"] = torch.from_numpy(r.intrinsics(ep, t))
        if "extrinsics" in self.fields:
            item["cam_to_world0"] = torch.from_numpy(r.extrinsics(ep, t))
            item["cam_to_world1"] = torch.from_numpy(r.extrinsics(ep, t1))
        if "flow" in self.fields:
            pts, delta, valid = r.flow(ep, t, self.flow_source, self.gap)
            item["flow_points"] = torch.from_numpy(pts)
            item["flow_delta"] = torch.from_numpy(delta)
            item["flow_valid"] = torch.from_numpy(valid)
            px = r.flow_pixels(ep, self.flow_source, self.gap)
            if px is not None and len(px) == len(pts):
                # Normalized image coordinates ([-1, 1], pixel centres: grid_sample's
                # align_corners=False convention), so any input size reads them alike.
                h, w = ep.image_hw
                uv = (px + 0.5) / np.array([w, h], np.float32) * 2.0 - 1.0
                item["flow_pixels"] = torch.from_numpy(uv.astype(np.float32))
        return item
