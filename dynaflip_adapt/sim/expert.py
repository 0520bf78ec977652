"""Scripted experts for the tabletop tasks, and one episode end to end.

Everything random about an episode (task, placements, target, instruction wording) comes from the
episode seed alone, never from the site, so the same seed under two sites gives the same motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynaflip_adapt.data.writer import EpisodeData
from dynaflip_adapt.flow.geometry import grid_pixels
from dynaflip_adapt.sim.env import ACTION_SCALE, HOME, Frame, TabletopEnv, ground_truth_flow
from dynaflip_adapt.sim.scene import OBJECTS, PLATE

TASKS = ("pick_place", "push", "reach")
DIRECTIONS = {
    "left": np.array([0.0, 1.0]),
    "right": np.array([0.0, -1.0]),
    "forward": np.array([1.0, 0.0]),
    "back": np.array([-1.0, 0.0]),
}
DIRECTION_WORDS = {
    "left": "to the left",
    "right": "to the right",
    "forward": "away from the robot",
    "back": "toward the robot",
}
TEMPLATES = {
    "pick_place": (
        "put the {obj} on the {plate}",
        "pick up the {obj} and place it on the {plate}",
        "move the {obj} onto the {plate}",
    ),
    "push": ("push the {obj} {dir}", "slide the {obj} {dir}"),
    "reach": ("reach the {obj}", "move the gripper above the {obj}"),
}


@dataclass
class Plan:
    """Waypoints (N, 3), gripper command per waypoint (N,), relative durations (N,)."""

    points: np.ndarray
    grip: np.ndarray
    durations: np.ndarray

    def trajectory(self, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Targets (T+1, 3) and grip commands (T,), smoothstep between waypoints."""
        frames = np.maximum(1, np.round(self.durations / self.durations.sum() * T).astype(int))
        frames[-1] += T - frames.sum()
        targets = [HOME.copy()]
        grips: list[float] = []
        prev = HOME.copy()
        for p, g, n in zip(self.points, self.grip, frames, strict=True):
            for i in range(1, int(n) + 1):
                s = i / n
                s = s * s * (3 - 2 * s)
                targets.append(prev + s * (p - prev))
                grips.append(float(g))
            prev = p
        tg = np.stack(targets)[: T + 1]
        while len(tg) < T + 1:
            tg = np.concatenate([tg, tg[-1:]])
        gr = np.array((grips + [grips[-1]] * T)[:T])
        return tg, gr


def _placements(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Object positions (3, 2) and plate position (2,), kept apart."""
    while True:
        pts = np.stack([rng.uniform([0.32, -0.2], [0.55, 0.2]) for _ in range(len(OBJECTS) + 1)])
        d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts))
        if d.min() > 0.1:
            return pts[:-1], pts[-1]


def _name(i: int) -> str:
    _, shape, colour, _ = OBJECTS[i]
    return f"{colour} {shape}"


def make_plan(task: str, rng: np.random.Generator) -> tuple[Plan, dict[str, object]]:
    """A plan and its episode spec (placements, target, instruction)."""
    objects, plate = _placements(rng)
    # Objects face the robot (the gripper has no roll joint), up to a few degrees off.
    yaws = np.arctan2(objects[:, 1], objects[:, 0]) + rng.uniform(-0.12, 0.12, len(OBJECTS))
    target = int(rng.integers(len(OBJECTS)))
    o = objects[target]
    spec: dict[str, object] = {"objects": objects, "yaws": yaws, "plate": plate, "target": target}
    wording = TEMPLATES[task][int(rng.integers(len(TEMPLATES[task])))]
    jitter = rng.normal(0, 0.004, 3)
    if task == "pick_place":
        pts = [
            [o[0], o[1], 0.14],
            [o[0], o[1], 0.022],
            [o[0], o[1], 0.022],
            [o[0], o[1], 0.16],
            [plate[0], plate[1], 0.16],
            [plate[0], plate[1], 0.06],
            [plate[0], plate[1], 0.06],
            [plate[0], plate[1], 0.16],
        ]
        grip = [1, 1, -1, -1, -1, -1, 1, 1]
        dur = [0.17, 0.12, 0.07, 0.12, 0.16, 0.1, 0.06, 0.2]
        text = wording.format(obj=_name(target), plate=f"{PLATE[2]} plate")
    elif task == "push":
        names = list(DIRECTIONS)
        # Only directions that keep the object on the table.
        ok = [
            n
            for n in names
            if 0.28 < o[0] + 0.12 * DIRECTIONS[n][0] < 0.6
            and abs(o[1] + 0.12 * DIRECTIONS[n][1]) < 0.3
        ]
        dname = ok[int(rng.integers(len(ok)))]
        d = DIRECTIONS[dname]
        pre, post = o - 0.07 * d, o + 0.1 * d
        pts = [
            [pre[0], pre[1], 0.12],
            [pre[0], pre[1], 0.02],
            [post[0], post[1], 0.02],
            [post[0], post[1], 0.12],
        ]
        grip = [-1, -1, -1, -1]
        dur = [0.3, 0.15, 0.35, 0.2]
        text = wording.format(obj=_name(target), dir=DIRECTION_WORDS[dname])
        spec["direction"] = dname
    elif task == "reach":
        pts = [[o[0], o[1], 0.14], [o[0], o[1], 0.07], [o[0], o[1], 0.07]]
        grip = [1, 1, 1]
        dur = [0.4, 0.3, 0.3]
        text = wording.format(obj=_name(target))
    else:  # pragma: no cover - guarded by the caller
        raise ValueError(task)
    points = np.asarray(pts, dtype=np.float64)
    points[:, :2] += jitter[:2]
    spec["language"] = text
    spec["task"] = task
    return Plan(points, np.asarray(grip, float), np.asarray(dur, float)), spec


def _success(task: str, spec: dict[str, object], start: np.ndarray, end: np.ndarray) -> bool:
    t = int(spec["target"])  # type: ignore[call-overload]
    if task == "pick_place":
        plate = np.asarray(spec["plate"])
        return bool(np.linalg.norm(end[t, :2] - plate) < 0.045 and end[t, 2] < 0.06)
    if task == "push":
        d = DIRECTIONS[str(spec["direction"])]
        return bool(float((end[t, :2] - start[t, :2]) @ d) > 0.04)
    return True


def run_episode(
    env: TabletopEnv,
    seed: int,
    task: str,
    frames: int,
    flow_strides: tuple[int, ...] = (1,),
    flow_grid: int = 4,
) -> EpisodeData:
    """Runs the scripted expert for one episode and records everything a site log holds.

    Args:
        env: The site's environment.
        seed: Episode seed (placements, target, wording).
        task: One of `TASKS`.
        frames: T, frames recorded (one action each).
        flow_strides: Ground-truth 3D flow between frames t and t + k for each k.
        flow_grid: Pixel stride of the grid of flow points.
    """
    rng = np.random.default_rng(seed)
    plan, spec = make_plan(task, rng)
    env.reset(np.asarray(spec["objects"]), np.asarray(spec["yaws"]), np.asarray(spec["plate"]))
    targets, grips = plan.trajectory(frames)
    K = env.intrinsics()
    size = env.size
    rgb = np.zeros((frames, size, size, 3), np.uint8)
    depth = np.zeros((frames, size, size), np.float32)
    extr = np.zeros((frames, 4, 4))
    bodies, poses = [], []
    proprio: dict[str, list[np.ndarray]] = {}
    actions = np.zeros((frames, 4), np.float32)
    start = env.object_positions()
    for t in range(frames):
        fr = env.render()
        rgb[t], depth[t] = fr.rgb, fr.depth
        bodies.append(fr.body)
        poses.append(env.body_poses())
        extr[t] = env.extrinsics()
        for key, value in env.proprio().items():
            proprio.setdefault(key, []).append(value)
        # The commanded target motion, relative to the controller's current target.
        a = np.zeros(4)
        a[:3] = (targets[t + 1] - env.target) / ACTION_SCALE
        a[3] = grips[t]
        actions[t] = np.clip(a, -1, 1)
        env.step(actions[t])
    end = env.object_positions()
    uv = grid_pixels(size, size, flow_grid)
    flows = {}
    frs = [Frame(rgb[t], depth[t], bodies[t]) for t in range(frames)]
    for k in flow_strides:
        n = frames - k
        pts = np.zeros((n, len(uv), 3), np.float32)
        dl = np.zeros_like(pts)
        vd = np.zeros((n, len(uv)), bool)
        for t in range(n):
            pts[t], dl[t], vd[t] = ground_truth_flow(
                frs[t], frs[t + k], poses[t], poses[t + k], K, extr[t], extr[t + k], uv
            )
        name = "ground_truth" if k == flow_strides[0] else f"ground_truth_s{k}"
        flows[name] = {
            "points": pts,
            "delta": dl,
            "valid": vd,
            "stride": k,
            "attrs": {"camera": "agentview", "pixel_stride": flow_grid, "method": "rigid-body"},
            "pixels": uv.astype(np.float32),
        }
    return EpisodeData(
        rgb={"agentview": rgb},
        actions=actions,
        language=str(spec["language"]),
        depth={"agentview": depth},
        intrinsics={"agentview": K},
        extrinsics={"agentview": extr},
        proprio={key: np.stack(values) for key, values in proprio.items()},
        flows=flows,
        attrs={
            "seed": seed,
            "task": task,
            "site": env.site.name,
            "success": _success(task, spec, start, end),
            "target_object": OBJECTS[int(spec["target"])][0],  # type: ignore[call-overload]
        },
    )
