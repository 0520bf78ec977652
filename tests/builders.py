"""Small site logs built in tmp_path for tests: every layout, with known content."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from dynaflip_adapt.data.writer import EpisodeData, NativeWriter, write_aloha, write_robomimic


def make_episode(
    T: int = 6,
    H: int = 16,
    W: int = 20,
    *,
    seed: int = 0,
    cameras: tuple[str, ...] = ("agentview",),
    language: str = "pick up the red cube",
    flow: bool = True,
    points: int = 8,
) -> EpisodeData:
    """An episode with random frames, a depth ramp, a centred pinhole K and a moving camera."""
    rng = np.random.default_rng(seed)

    # Blocky frames (4x4 cells): random, yet smooth enough for JPEG to keep them recognisable.
    def frames() -> np.ndarray:
        cells = rng.integers(0, 256, (T, H // 4 + 1, W // 4 + 1, 3), dtype=np.uint8)
        return np.repeat(np.repeat(cells, 4, axis=1), 4, axis=2)[:, :H, :W]

    rgb = {c: frames() for c in cameras}
    depth = {c: (0.5 + rng.random((T, H, W))).astype(np.float32) for c in cameras}
    K = np.array([[20.0, 0, (W - 1) / 2], [0, 20.0, (H - 1) / 2], [0, 0, 1]])
    extr = np.tile(np.eye(4), (T, 1, 1))
    extr[:, 0, 3] = np.linspace(0, 0.1, T)
    out = EpisodeData(
        rgb=rgb,
        actions=rng.normal(size=(T, 7)).astype(np.float32),
        language=language,
        depth=depth,
        intrinsics={c: K for c in cameras},
        extrinsics={c: extr for c in cameras},
        proprio={
            "robot0_eef_pos": rng.normal(size=(T, 3)).astype(np.float32),
            "robot0_gripper_qpos": rng.normal(size=(T, 2)).astype(np.float32),
        },
        attrs={"seed": seed},
    )
    if flow:
        pts = rng.normal(size=(T - 1, points, 3)).astype(np.float32)
        out.flows["ground_truth"] = {
            "points": pts,
            "delta": (0.01 * rng.normal(size=pts.shape)).astype(np.float32),
            "valid": rng.random((T - 1, points)) > 0.2,
            "stride": 1,
        }
    return out


INSTRUCTIONS = (
    "pick up the red cube",
    "push the blue cube to the left",
    "reach the green cylinder",
    "put the green cylinder on the yellow plate",
)


def write_native(
    path: Path, n: int = 2, *, varied_language: bool = False, **kw: object
) -> tuple[Path, list[EpisodeData]]:
    """`n` episodes in the native layout; `varied_language` gives episode i the instruction
    ``INSTRUCTIONS[i % 4]`` (contrastive terms then have negatives that differ)."""
    if varied_language:
        eps = [
            make_episode(seed=i, language=INSTRUCTIONS[i % len(INSTRUCTIONS)], **kw)  # type: ignore[arg-type]
            for i in range(n)
        ]
    else:
        eps = [make_episode(seed=i, **kw) for i in range(n)]  # type: ignore[arg-type]
    with NativeWriter(path) as w:
        for ep in eps:
            w.add(ep)
    return path, eps


def write_robomimic_file(path: Path, n: int = 2) -> tuple[Path, list[EpisodeData]]:
    eps = [make_episode(seed=i, flow=False) for i in range(n)]
    write_robomimic(path, eps)
    return path, eps


def write_libero_file(path: Path, n: int = 2) -> tuple[Path, list[EpisodeData]]:
    """LIBERO layout written by hand (images stored upside down, as LIBERO does)."""
    eps = [make_episode(seed=10 + i, flow=False) for i in range(n)]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "libero_tabletop", "language_instruction": "open the drawer"}
        )
        data.attrs["bddl_file_name"] = "x.bddl"
        for i, ep in enumerate(eps):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = ep.length
            g.create_dataset("actions", data=ep.actions.astype(np.float64))
            obs = g.create_group("obs")
            upright = ep.rgb["agentview"]
            obs.create_dataset("agentview_rgb", data=upright[:, ::-1, ::-1])
            obs.create_dataset("eye_in_hand_rgb", data=upright[:, ::-1, ::-1])
            obs.create_dataset("ee_states", data=np.zeros((ep.length, 6)))
            obs.create_dataset("joint_states", data=np.zeros((ep.length, 7)))
            obs.create_dataset("gripper_states", data=np.zeros((ep.length, 2)))
    return path, eps


def write_aloha_folder(
    folder: Path, n: int = 2, jpeg: int | None = None
) -> tuple[list[Path], list[EpisodeData]]:
    eps = [make_episode(seed=20 + i, flow=False, cameras=("cam_high", "cam_low")) for i in range(n)]
    return write_aloha(folder, eps, jpeg_quality=jpeg), eps


def _holds(check: dict) -> bool:
    """Whether a check's value meets its limit, recomputed from value, op and limit (falls back
    to the reported `passed` only where the value is not a number or a string)."""
    value, limit, op = check.get("value"), check.get("limit"), check.get("op", "==")
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, limit))
    if numbers and op in ("<=", ">="):
        return value <= limit if op == "<=" else value >= limit
    if op == "==" and isinstance(value, (str, int, float, bool)) and value is not None:
        return value == limit
    return bool(check["passed"])


def expected_verdict(report: dict) -> str:
    """An audit's verdict recomputed from its checks (not read from the report): a failed error
    check anywhere is incompatible, no pinned policy is unaudited, any other failure a warning.
    Also asserts that every check's `passed` agrees with its value and limit."""
    checks = list(report["static"]) + [c for p in report["policies"] for c in p["checks"]]
    for c in checks:
        assert _holds(c) == bool(c["passed"]), c

    def blocks(c: dict) -> bool:
        return not _holds(c) and c.get("severity", "error") == "error"

    if any(blocks(c) for c in report["static"]):
        return "incompatible"
    if not report["policies"]:
        return "unaudited"
    if any(blocks(c) for p in report["policies"] for c in p["checks"]):
        return "incompatible"
    if any(not _holds(c) for c in checks):
        return "warning"
    return "compatible"
