"""Extracted 3D flow against the simulator's ground truth.

Both groups sit on the same pixel grid and use the same depth at frame t, so point i of pair t
is the same surface point in both; only its displacement differs. Metrics on *moving* points
(ground-truth displacement above a threshold, ground truth valid): end-point error (median, p90,
in mm) where the extractor returned a value, and the fraction of moving points it returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynaflip_adapt.data.logs import EpisodeReader, SourceSettings, open_logs
from dynaflip_adapt.errors import InputError


@dataclass
class FlowEval:
    """Aggregate metrics over every compared pair."""

    source: str
    reference: str
    stride: int
    pairs: int
    moving_points: int
    found_fraction: float
    epe_median_mm: float
    epe_p90_mm: float
    acc_5mm: float
    acc_10mm: float
    static_epe_median_mm: float
    point_mismatch_mm: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_flow(
    paths: Sequence[str | Path],
    *,
    source: str = "dis",
    reference: str = "ground_truth",
    moving_threshold: float = 0.002,
    settings: SourceSettings | None = None,
) -> FlowEval:
    """Compares flow group `source` with `reference` in every episode holding both.

    Args:
        paths: Log files or folders.
        source: Extracted group name.
        reference: Ground-truth group name.
        moving_threshold: Metres of ground-truth displacement above which a point is moving.

    Raises:
        InputError: No episode holds both groups, or they disagree in stride or grid.
    """
    logs = open_logs(paths, settings)
    reader = EpisodeReader()
    epe_moving: list[np.ndarray] = []
    epe_static: list[np.ndarray] = []
    mismatch = 0.0
    n_moving = n_found = pairs = 0
    stride = None
    try:
        for ep in logs.episodes:
            a, b = ep.flow(source), ep.flow(reference)
            if a is None or b is None:
                continue
            if a.stride != b.stride or a.num_points != b.num_points:
                raise InputError(
                    ep.file,
                    f"{ep.group}/flow/{source}",
                    f"stride {a.stride}, {a.num_points} points",
                    f"the reference's stride {b.stride} and {b.num_points} points",
                )
            stride = a.stride
            f = reader.file(ep.file)
            ga, gb = f[a.group], f[b.group]
            if (
                "pixels" in ga
                and "pixels" in gb
                and not np.allclose(ga["pixels"][()], gb["pixels"][()])
            ):
                raise InputError(
                    ep.file, f"{a.group}/pixels", "another pixel grid", "the reference's grid"
                )
            da, va = ga["delta"][()], ga["valid"][()].astype(bool)
            db, vb = gb["delta"][()], gb["valid"][()].astype(bool)
            pa, pb = ga["points"][()], gb["points"][()]
            both = va & vb
            if both.any():
                mismatch = max(mismatch, float(np.abs(pa[both] - pb[both]).max()))
            moving = vb & (np.linalg.norm(db, axis=-1) > moving_threshold)
            found = moving & va
            n_moving += int(moving.sum())
            n_found += int(found.sum())
            err = np.linalg.norm(da - db, axis=-1)
            epe_moving.append(err[found])
            epe_static.append(err[both & ~moving])
            pairs += int(da.shape[0])
    finally:
        reader.close()
    if stride is None:
        raise InputError(
            ", ".join(str(p) for p in paths),
            f"flow/{source}, flow/{reference}",
            "no episode holding both groups",
            "logs with ground truth and extracted flow (run `flow extract` first)",
        )
    em = np.concatenate(epe_moving) * 1000 if epe_moving else np.zeros(0)
    es = np.concatenate(epe_static) * 1000 if epe_static else np.zeros(0)

    def q(x: np.ndarray, p: float) -> float:
        return float(np.percentile(x, p)) if x.size else float("nan")

    return FlowEval(
        source=source,
        reference=reference,
        stride=stride,
        pairs=pairs,
        moving_points=n_moving,
        found_fraction=n_found / max(1, n_moving),
        epe_median_mm=q(em, 50),
        epe_p90_mm=q(em, 90),
        acc_5mm=float((em <= 5).mean()) if em.size else float("nan"),
        acc_10mm=float((em <= 10).mean()) if em.size else float("nan"),
        static_epe_median_mm=q(es, 50),
        point_mismatch_mm=mismatch * 1000,
    )
