"""Full validation of site logs: structure and small arrays (as `open_logs` checks them) plus a
scan of every large array.

`open_logs` checks structure on metadata and the values of small arrays (actions, proprio, K,
extrinsics); `validate_logs` also streams every frame, depth and flow in blocks (bounded memory:
a file cut short after its metadata is caught here, not by the first reader), finds NaN/inf and
negative depth, and decodes every JPEG frame. Every problem is listed; nothing stops at the
first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dynaflip_adapt.data.logs import (
    Episode,
    LogFile,
    Problem,
    SourceSettings,
    expand_paths,
    index_file,
    iter_blocks,
    open_h5,
)
from dynaflip_adapt.data.schema import load_schema

_BLOCK_BYTES = 64 << 20
LARGE_ROLES = ("rgb", "depth")


@dataclass
class FileReport:
    """Validation result of one file."""

    file: str
    layout: str | None
    episodes: int
    frames: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "layout": self.layout,
            "episodes": self.episodes,
            "frames": self.frames,
            "ok": self.ok,
            "problems": [
                {"file": p.file, "key": p.key, "found": p.found, "expected": p.expected}
                for p in self.problems
            ],
        }


def _scan(ds: h5py.Dataset, *, finite: bool, minimum: float | None, path: str) -> list[Problem]:
    out: list[Problem] = []
    if not (np.issubdtype(ds.dtype, np.floating) or np.issubdtype(ds.dtype, np.integer)):
        return out
    for start, block in iter_blocks(ds, _BLOCK_BYTES):
        if finite and np.issubdtype(block.dtype, np.floating):
            bad = ~np.isfinite(block)
            if bad.any():
                i = int(np.argwhere(bad)[0][0]) + start
                n = int(bad.sum())
                out.append(Problem(path, f"{ds.name}[{i}]", f"{n} NaN/inf values", "finite"))
                return out
        if minimum is not None:
            low = block < minimum
            if low.any():
                i = int(np.argwhere(low)[0][0]) + start
                out.append(
                    Problem(
                        path,
                        f"{ds.name}[{i}]",
                        f"values below {minimum:g} (min {float(block.min()):.4g})",
                        f">= {minimum:g}",
                    )
                )
                return out
    return out


def _check_jpeg(f: h5py.File, ep: Episode) -> list[Problem]:
    import cv2

    clen = f[ep.paths["compress_len"]]
    ds = f[ep.paths["rgb"]]
    for i in range(ep.length):
        n = int(clen[ep.jpeg_index, i])
        if n <= 0 or n > ds.shape[1]:
            return [
                Problem(ep.file, f"{clen.name}[{ep.jpeg_index}, {i}]", str(n), f"1..{ds.shape[1]}")
            ]
        img = cv2.imdecode(np.asarray(ds[i, :n], np.uint8), cv2.IMREAD_COLOR)
        if img is None or img.shape[:2] != ep.image_hw:
            found = "bytes that do not decode" if img is None else f"an image {img.shape[:2]}"
            return [Problem(ep.file, f"{ds.name}[{i}]", found, f"a JPEG of size {ep.image_hw}")]
    return []


def _scan_file(lf: LogFile) -> list[Problem]:
    schema = load_schema(lf.layout)
    out: list[Problem] = []
    with open_h5(lf.path) as f:
        for ep in lf.episodes:
            try:
                out += _scan_episode(f, ep, schema)
            except (OSError, RuntimeError, KeyError) as exc:
                out.append(
                    Problem(
                        ep.file,
                        ep.group,
                        f"unreadable data ({str(exc)[:120]})",
                        "readable datasets",
                    )
                )
    return out


def _scan_episode(f: h5py.File, ep: Episode, schema: Any) -> list[Problem]:
    out: list[Problem] = []
    # Small arrays (actions, proprio, K, extrinsics) were checked when indexing.
    for role in LARGE_ROLES:
        spec = schema.fields.get(role)
        if role not in ep.paths or spec is None or (role == "rgb" and ep.jpeg_index is not None):
            continue  # JPEG frames are decoded one by one below
        out += _scan(f[ep.paths[role]], finite=spec.finite, minimum=spec.minimum, path=ep.file)
    for ref in ep.flows:
        for key in ("points", "delta"):
            out += _scan(f[ref.group][key], finite=True, minimum=None, path=ep.file)
    if ep.jpeg_index is not None:
        out += _check_jpeg(f, ep)
    return out


def validate_logs(
    paths: Sequence[str | Path], settings: SourceSettings | None = None
) -> list[FileReport]:
    """Validates files and folders, listing every problem per file.

    A path that does not exist, or a folder with no HDF5 file, raises `InputError` (there is no
    file to report on).
    """
    settings = settings or SourceSettings()
    reports: list[FileReport] = []
    for p in expand_paths(paths):
        problems: list[Problem] = []
        lf = index_file(p, settings, problems)
        if lf is not None:  # its episodes are the structurally sound ones
            problems += _scan_file(lf)
        reports.append(
            FileReport(
                file=str(p),
                layout=lf.layout if lf else None,
                episodes=len(lf.episodes) if lf else 0,
                frames=sum(e.length for e in lf.episodes) if lf else 0,
                problems=problems,
            )
        )
    return reports
