"""3D flow from what a real robot records: RGB + depth + K (+ camera-to-world extrinsics).

Per frame pair (t, t + stride): OpenCV DIS optical flow gives 2D motion; depth is read at the
grid pixel at t and sampled bilinearly at the flow's end point at t + stride (rejected across
depth edges, where a bilinear mix of two surfaces is no surface); both ends are unprojected with
kornia and moved to the world frame; points are dropped where depth is invalid, the end point
leaves the image, or (optionally) forward and backward flow disagree (occlusion).
No simulator state is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dynaflip_adapt.data.logs import Episode, EpisodeReader, SourceSettings, open_logs
from dynaflip_adapt.data.writer import flow_nbytes, write_flow_group
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.flow.geometry import grid_pixels
from dynaflip_adapt.outputs import ensure_room

PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


@dataclass(frozen=True)
class ExtractConfig:
    """How flow is extracted.

    Attributes:
        stride: Frames between the two ends of a pair.
        grid: Pixel stride of the grid of points (same grid as the simulator's ground truth).
        preset: DIS preset: ultrafast, fast or medium.
        fb_check: Drop points whose forward-backward flow error exceeds `fb_threshold` px.
        fb_threshold: Pixels.
        edge_tolerance: Relative depth spread among the 4 bilinear neighbours above which the
            end point is taken to straddle a depth edge and is dropped.
        source: Name of the flow group written (``dis`` for stride 1, ``dis_s4`` otherwise).
    """

    stride: int = 1
    grid: int = 4
    preset: str = "medium"
    fb_check: bool = True
    # Defaults chosen on simulator logs (docs/design.md, the flow table): 1.5 px / 6% keep 86%
    # of moving points at a 2.9 mm median error; 1.0 px / 3% keep 80% at 2.9 mm.
    fb_threshold: float = 1.5
    edge_tolerance: float = 0.06
    source: str | None = None

    @property
    def group_name(self) -> str:
        if self.source:
            return self.source
        return "dis" if self.stride == 1 else f"dis_s{self.stride}"


def _dis(preset: str) -> Any:
    import cv2

    if preset not in PRESETS:
        raise InputError(None, "--preset", repr(preset), "one of " + ", ".join(PRESETS))
    return cv2.DISOpticalFlow.create(PRESETS[preset])


def _gray(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _bilinear(img: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear samples of `img` (H, W[, C]) at float pixels `xy` (N, 2), and the 4 neighbours
    (N, 4[, C]). Points must be inside [0, W-1] x [0, H-1]."""
    H, W = img.shape[:2]
    x0 = np.clip(np.floor(xy[:, 0]).astype(np.int64), 0, W - 2)
    y0 = np.clip(np.floor(xy[:, 1]).astype(np.int64), 0, H - 2)
    fx = (xy[:, 0] - x0).reshape(-1, *([1] * (img.ndim - 2)))
    fy = (xy[:, 1] - y0).reshape(-1, *([1] * (img.ndim - 2)))
    a, b = img[y0, x0], img[y0, x0 + 1]
    c, d = img[y0 + 1, x0], img[y0 + 1, x0 + 1]
    val = (1 - fy) * ((1 - fx) * a + fx * b) + fy * ((1 - fx) * c + fx * d)
    return val, np.stack([a, b, c, d], axis=1)


def _unproject_to_world(
    uv: np.ndarray, z: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray
) -> np.ndarray:
    """kornia unprojection of pixels with depth, then to the world frame. Shapes (B, N, .)."""
    import torch
    from kornia.geometry.camera import unproject_points
    from kornia.geometry.linalg import transform_points

    pts = unproject_points(
        torch.from_numpy(uv).double(),
        torch.from_numpy(z[..., None]).double(),
        torch.from_numpy(K).double()[:, None],
    )  # (B, N, 3) camera frame
    world = transform_points(torch.from_numpy(cam_to_world).double(), pts)
    return world.numpy()


def extract_episode(reader: EpisodeReader, ep: Episode, cfg: ExtractConfig) -> dict[str, Any]:
    """3D flow of every pair (t, t + stride) of an episode, on a pixel grid.

    Returns:
        A flow group dict: points, delta (T - stride, P, 3) float32, valid (T - stride, P),
        pixels (P, 2), stride, frame, attrs.

    Raises:
        InputError: The episode has no depth or no intrinsics.
    """
    for role in ("depth", "intrinsics"):
        if not ep.has(role):
            raise InputError(
                ep.file,
                ep.group,
                f"no {role}",
                "depth and intrinsics K to extract 3D flow (the flow anchors need them)",
            )
    s = cfg.stride
    if not 1 <= s < ep.length:
        raise InputError(ep.file, ep.group, f"{ep.length} frames", f"more than stride {s}")
    H, W = ep.image_hw
    uv = grid_pixels(H, W, cfg.grid)
    P = len(uv)
    n = ep.length - s
    dis = _dis(cfg.preset)
    rgb = reader.rgb(ep, slice(0, ep.length))
    depth = reader.depth(ep, slice(0, ep.length))
    gray = [_gray(f) for f in rgb]
    has_extr = ep.has("extrinsics")
    K0 = np.stack([reader.intrinsics(ep, t) for t in range(n)])
    K1 = np.stack([reader.intrinsics(ep, t + s) for t in range(n)])
    if has_extr:
        E0 = np.stack([reader.extrinsics(ep, t) for t in range(n)])
        E1 = np.stack([reader.extrinsics(ep, t + s) for t in range(n)])
    else:
        E0 = E1 = np.tile(np.eye(4), (n, 1, 1))
    uv0 = np.broadcast_to(uv.astype(np.float64), (n, P, 2)).copy()
    z0 = np.zeros((n, P))
    uv1 = np.zeros((n, P, 2))
    z1 = np.zeros((n, P))
    valid = np.zeros((n, P), bool)
    for t in range(n):
        fwd = dis.calc(gray[t], gray[t + s], None)  # (H, W, 2) in pixels
        d0 = depth[t][uv[:, 1], uv[:, 0]]
        end = uv + fwd[uv[:, 1], uv[:, 0]]
        inside = (end[:, 0] >= 0) & (end[:, 0] <= W - 1) & (end[:, 1] >= 0) & (end[:, 1] <= H - 1)
        endc = np.clip(end, 0, [W - 1, H - 1])
        d1, nb = _bilinear(depth[t + s], endc)
        spread = nb.max(axis=1) - nb.min(axis=1)
        ok = inside & (d0 > 0) & (nb.min(axis=1) > 0) & (spread <= cfg.edge_tolerance * d1)
        if cfg.fb_check:
            bwd = dis.calc(gray[t + s], gray[t], None)
            back, _ = _bilinear(bwd, endc)
            ok &= np.linalg.norm(fwd[uv[:, 1], uv[:, 0]] + back, axis=1) <= cfg.fb_threshold
        z0[t], uv1[t], z1[t], valid[t] = d0, endc, d1, ok
    p0 = _unproject_to_world(uv0, z0, K0, E0)
    p1 = _unproject_to_world(uv1, z1, K1, E1)
    has0 = z0 > 0
    points = np.where(has0[..., None], p0, 0.0).astype(np.float32)
    delta = np.where(valid[..., None], p1 - p0, 0.0).astype(np.float32)
    import cv2
    import kornia

    from dynaflip_adapt import __version__

    attrs = {
        "method": "opencv-dis",
        "camera": ep.camera,
        "pixel_stride": cfg.grid,
        "config": str(asdict(cfg)),
        "producer": (
            f"dynaflip-adapt {__version__}; opencv {cv2.__version__}; kornia {kornia.__version__}"
        ),
    }
    return {
        "points": points,
        "delta": delta,
        "valid": valid,
        "pixels": uv.astype(np.float32),
        "stride": s,
        "frame": "world" if has_extr else "camera",
        "attrs": attrs,
    }


@dataclass
class ExtractReport:
    """What extraction did per file."""

    file: str
    episodes: int = 0
    pairs: int = 0
    valid_fraction: float = 0.0
    skipped: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_logs(
    paths: Sequence[str | Path],
    cfg: ExtractConfig,
    *,
    settings: SourceSettings | None = None,
    overwrite: bool = False,
    on_episode: Callable[[Episode], None] | None = None,
) -> list[ExtractReport]:
    """Extracts flow for every episode of native logs and writes ``flow/<source>`` groups.

    Files whose episodes lack depth or K are skipped with the reason (the flow anchors will be
    unavailable for them); when no file can be processed, an `InputError` says why.

    Raises:
        InputError: No file has depth + K, a non-native layout, or an existing group without
            `overwrite`.
    """
    import time

    logs = open_logs(paths, settings)
    reports: list[ExtractReport] = []
    reader = EpisodeReader()
    try:
        for lf in logs.files:
            rep = ExtractReport(lf.path)
            missing = sorted(
                {r for e in lf.episodes for r in ("depth", "intrinsics") if not e.has(r)}
            )
            if missing:
                rep.skipped = (
                    f"no {' or '.join(missing)}: 3D flow cannot be extracted; the flow anchors "
                    "(simplex area, cosine, contrastive) are unavailable for this log"
                )
                reports.append(rep)
                continue
            if lf.layout != "native":
                raise InputError(
                    lf.path, None, f"layout {lf.layout}", "a native log to write flow into"
                )
            name = cfg.group_name
            if not overwrite:
                for e in lf.episodes:
                    if e.flow(name) is not None:
                        raise InputError(
                            lf.path,
                            f"{e.group}/flow/{name}",
                            "an existing flow group",
                            "none (pass --overwrite)",
                        )
            t0 = time.perf_counter()
            results = []
            for e in lf.episodes:
                results.append((e, extract_episode(reader, e, cfg)))
                if on_episode is not None:
                    on_episode(e)
            reader.close()  # release the read handle before writing
            # A failed HDF5 write would leave the user's log damaged: refuse before the first.
            need = sum(flow_nbytes(flow) for _, flow in results)
            ensure_room(lf.path, need, f"flow/{name} of {len(results)} episodes")
            with h5py.File(lf.path, "a") as f:
                for e, flow in results:
                    g = f[e.group]
                    # Write under a temporary name, then rename: an interrupted run leaves no
                    # half-written group under the real name.
                    tmp = f".{name}.partial"
                    write_flow_group(g, tmp, flow, "lzf")
                    root = g["flow"]
                    if name in root:
                        del root[name]
                    root.move(tmp, name)
            rep.seconds = time.perf_counter() - t0
            rep.episodes = len(results)
            rep.pairs = sum(int(fl["valid"].shape[0]) for _, fl in results)
            rep.valid_fraction = float(np.mean([fl["valid"].mean() for _, fl in results]))
            reports.append(rep)
    finally:
        reader.close()
    if reports and all(r.skipped for r in reports):
        raise InputError(reports[0].file, None, reports[0].skipped or "", "logs with depth and K")
    return reports
