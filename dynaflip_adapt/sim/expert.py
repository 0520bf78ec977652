"""Scripted experts for the tabletop tasks, their success predicates, and one recorded episode.

The experts are state feedback, as imitation-learning benchmarks need: each control step they
look at the scene as it is now (grasp point, finger opening, object and plate positions) and
move toward the next waypoint of their task from where the arm is, so the demonstrated action
is a function of what a policy can observe (the phase shows in the gripper and the scene; the
push's distance so far is the one exception, see `Expert`). While recording, noise is added to
the executed motion and the clean expert action is logged (DART, Laskey et al. 2017), so the
demonstrations show how to recover from small errors. Everything random about an episode
(task, placements, target, wording, noise) comes from the episode seed alone, never from the
site, so the same seed under two sites gives the same motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynaflip_adapt.data.writer import EpisodeData
from dynaflip_adapt.flow.geometry import grid_pixels
from dynaflip_adapt.sim.env import (
    ACTION_SCALE,
    HOME,
    MIN_Z,
    Frame,
    SimState,
    TabletopEnv,
    ground_truth_flow,
)
from dynaflip_adapt.sim.scene import FINGER_OPEN, OBJECT_HALF, OBJECTS, PLATE

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

# Heights of the grasp point (metres above the table).
APPROACH_Z = 0.12  # above an object, before descending
GRASP_Z = 0.022  # fingers around a cube's middle
CARRY_Z = 0.15  # carrying over the other objects
PLACE_Z = 0.045  # releasing just above the plate (a cylinder dropped from higher may roll off)
REACH_Z = 0.07  # "reach": hover here above the object
PUSH_Z = 0.02
# The approach funnel: height above the bottom = slope x (horizontal distance - slack).
FUNNEL_SLOPE = 3.0
FUNNEL_SLACK = 0.006
# "push it to the left" means: past this line on the left side of the workspace (a goal the
# scene shows, so a policy can see when it is done). Directions whose line is 6-25 cm away.
PUSH_LINES = {"left": 0.17, "right": -0.17, "forward": 0.57, "back": 0.34}
PUSH_RANGE = (0.06, 0.25)
# Speeds: metres per control step (0.1 s).
FREE_SPEED = 0.045
NEAR_SPEED = 0.035  # descending, pushing, carrying low
# An episode ends this many frames after its success (robomimic-style demonstrations: no long
# tail of "done, waiting" frames, which a policy would confuse with the start), and lasts at
# least `MIN_FRAMES` frames.
HOLD_FRAMES = 2
MIN_FRAMES = 10
# Recording noise (DART): per-axis std of the executed motion's perturbation, in action units
# (x ACTION_SCALE metres), AR(1) over steps so it drifts like a real tracking error.
DART_STD = 0.06
DART_CORRELATION = 0.5

# Success predicates.
PLACE_RADIUS = 0.045  # object centre within this of the plate centre
PUSH_MIN = 0.04  # object moved at least this far in the instructed direction (and past its line)
REACH_RADIUS = 0.03  # grasp point within this of the object, horizontally
REACH_HEIGHT = (0.035, 0.11)  # and between these heights


@dataclass
class EpisodeSpec:
    """What an episode asks: task, scene, target object, instruction.

    Attributes:
        task: One of `TASKS`.
        objects: (3, 2) object positions on the table.
        yaws: (3,) object yaw angles.
        plate: (2,) plate position.
        target: Index of the object the instruction names.
        language: The instruction.
        direction: The push direction's name (push only).
    """

    task: str
    objects: np.ndarray
    yaws: np.ndarray
    plate: np.ndarray
    target: int
    language: str
    direction: str | None = None


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


def make_spec(task: str, rng: np.random.Generator) -> EpisodeSpec:
    """An episode of `task` drawn from `rng`: placements, target, instruction.

    Raises:
        ValueError: An unknown task (callers validate names first).
    """
    if task not in TASKS:
        raise ValueError(task)
    objects, plate = _placements(rng)
    # Objects face the robot (the gripper has no roll joint), up to a few degrees off.
    yaws = np.arctan2(objects[:, 1], objects[:, 0]) + rng.uniform(-0.12, 0.12, len(OBJECTS))
    target = int(rng.integers(len(OBJECTS)))
    wording = TEMPLATES[task][int(rng.integers(len(TEMPLATES[task])))]
    direction = None
    if task == "pick_place":
        text = wording.format(obj=_name(target), plate=f"{PLATE[2]} plate")
    elif task == "push":
        # Only directions whose line is a real push away and within reach (the placement is
        # drawn again, rarely, when the target has none).
        lo, hi = PUSH_RANGE
        ok = [n for n in DIRECTIONS if lo <= _to_line(objects[target], n) <= hi]
        while not ok:
            objects, plate = _placements(rng)
            yaws = np.arctan2(objects[:, 1], objects[:, 0]) + rng.uniform(-0.12, 0.12, 3)
            ok = [n for n in DIRECTIONS if lo <= _to_line(objects[target], n) <= hi]
        direction = ok[int(rng.integers(len(ok)))]
        text = wording.format(obj=_name(target), dir=DIRECTION_WORDS[direction])
    else:
        text = wording.format(obj=_name(target))
    return EpisodeSpec(task, objects, yaws, plate, target, text, direction)


def _to_line(o: np.ndarray, direction: str) -> float:
    """How far object position `o` must move along `direction` to reach its push line."""
    d = DIRECTIONS[direction]
    return PUSH_LINES[direction] * float(abs(d).sum()) - float(o[:2] @ d)


def _toward(eef: np.ndarray, goal: np.ndarray, speed: float) -> np.ndarray:
    """The motion (in action units) that takes the grasp point toward `goal`, at most `speed`
    metres this step (all of the way when it is closer)."""
    d = goal - eef
    n = float(np.linalg.norm(d))
    if n > speed:
        d = d * (speed / n)
    return d / ACTION_SCALE


@dataclass
class Expert:
    """A state-feedback expert for one episode.

    `act(state)` is a function of the scene as it is now (and the instruction): every phase
    shows in the gripper and the scene, and when its task is done the expert goes home and
    waits there, far from the states where it would still be working.
    """

    spec: EpisodeSpec

    def act(self, s: SimState) -> np.ndarray:
        """The action (dx, dy, dz, grip) for state `s`."""
        task = self.spec.task
        if task == "pick_place":
            move, grip = self._pick_place(s)
        elif task == "push":
            move, grip = self._push(s)
        else:
            o = s.objects[self.spec.target]
            move, grip = self._funnel(s.eef, o[:2], REACH_Z, APPROACH_Z, FREE_SPEED), 1.0
        return np.clip(np.concatenate([move, [grip]]), -1.0, 1.0)

    def _go(self, eef: np.ndarray, goal: np.ndarray, *, low: bool = False) -> np.ndarray:
        """Straight toward `goal`, slower for the last few centimetres when `low`."""
        far = float(np.linalg.norm(goal - eef))
        return _toward(eef, goal, NEAR_SPEED if low and far < 0.03 else FREE_SPEED)

    def _funnel(
        self, eef: np.ndarray, xy: np.ndarray, bottom: float, top: float, speed: float
    ) -> np.ndarray:
        """Toward a point above `xy` whose height falls with the horizontal distance still to
        go: `top` when far, `bottom` once within a few millimetres. A smooth function of the
        state (no phase switches), so it still holds after a perturbation: a grasp point off to
        the side rises a little and re-centres instead of starting over."""
        off = float(np.linalg.norm(eef[:2] - xy))
        z = float(np.clip(bottom + FUNNEL_SLOPE * (off - FUNNEL_SLACK), bottom, top))
        return _toward(eef, np.array([xy[0], xy[1], z]), speed if off > 0.03 else NEAR_SPEED)

    def _pick_place(self, s: SimState) -> tuple[np.ndarray, float]:
        o = s.objects[self.spec.target]
        plate = np.asarray(s.plate)
        opening = float(s.fingers.mean())
        near = float(np.linalg.norm(o - s.eef)) < 0.03
        closed = opening < 0.7 * FINGER_OPEN  # on an object the fingers stop at about 0.55
        holding = near and closed and o[2] > OBJECT_HALF - 0.005
        placed = float(np.linalg.norm(o[:2] - plate)) < 0.03 and o[2] < 0.04 and not holding
        if placed:
            return self._go(s.eef, HOME), 1.0
        if holding:
            # Aimed below the release height, as the grasp is (no standstill before the switch).
            move = self._funnel(s.eef, plate, PLACE_Z - 0.03, CARRY_Z, FREE_SPEED)
            # Lift before carrying: horizontal motion grows with height (no dragging the object
            # through the others).
            move[:2] *= float(np.clip((s.eef[2] - 0.05) / 0.06, 0.0, 1.0))
            over = float(np.linalg.norm(s.eef[:2] - plate))
            release = over < 0.02 and s.eef[2] < PLACE_Z + 0.02
            return move, 1.0 if release else -1.0
        off = float(np.linalg.norm(s.eef[:2] - o[:2]))
        at_grasp = off < 0.012 and s.eef[2] < GRASP_Z + 0.006
        if closed and not at_grasp:
            # Closed on nothing (a missed grasp) or still closed from a drop: open, back off up.
            return _toward(s.eef, np.array([s.eef[0], s.eef[1], APPROACH_Z]), NEAR_SPEED), 1.0
        # The funnel aims below the grasp height (the controller stops at MIN_Z): the motion is
        # still "down" when the fingers close, never a standstill just above the grasp (a
        # standstill there is a fixed point an imitating policy gets stuck in).
        move = self._funnel(s.eef, o[:2], MIN_Z, APPROACH_Z, FREE_SPEED)
        return move, -1.0 if at_grasp else 1.0

    def _push(self, s: SimState) -> tuple[np.ndarray, float]:
        assert self.spec.direction is not None
        d2 = DIRECTIONS[self.spec.direction]
        d = np.array([d2[0], d2[1], 0.0])
        o = s.objects[self.spec.target]
        if _to_line(o, self.spec.direction) < -0.01:  # past its line: done
            return self._go(s.eef, HOME), -1.0
        rel = s.eef - o
        along = float(rel[:2] @ d2)  # < 0: behind the object
        lateral = float(abs(rel[0] * d2[1] - rel[1] * d2[0]))
        pre = o - 0.065 * d
        if s.eef[2] < 0.045 and lateral < 0.02 and -0.09 < along < -0.02:
            # In contact position behind the object: push through it along the direction.
            goal = o + 0.02 * d
            goal[2] = PUSH_Z
            return _toward(s.eef, goal, NEAR_SPEED), -1.0
        return self._funnel(s.eef, pre[:2], PUSH_Z, APPROACH_Z, FREE_SPEED), -1.0


def success(spec: EpisodeSpec, start: np.ndarray, end: SimState) -> bool:
    """Whether the episode did what its instruction asked (judged on the final state)."""
    o = end.objects[spec.target]
    if spec.task == "pick_place":
        # On the plate and let go of (resting on the table, not held above it).
        on_plate = np.linalg.norm(o[:2] - np.asarray(spec.plate)) < PLACE_RADIUS
        return bool(on_plate and o[2] < OBJECT_HALF + 0.008)
    if spec.task == "push":
        assert spec.direction is not None
        d = DIRECTIONS[spec.direction]
        moved = float((o[:2] - start[spec.target, :2]) @ d)
        return bool(moved > PUSH_MIN and _to_line(o, spec.direction) < 0.0)
    horizontal = float(np.linalg.norm(end.eef[:2] - o[:2]))
    lo, hi = REACH_HEIGHT
    return bool(horizontal < REACH_RADIUS and lo < end.eef[2] < hi)


def reset(env: TabletopEnv, spec: EpisodeSpec) -> None:
    """Puts the scene in the episode's initial state."""
    env.reset(spec.objects, spec.yaws, spec.plate)


class DartNoise:
    """AR(1) Gaussian perturbation of the executed motion (x, y, z), seeded per episode."""

    def __init__(self, rng: np.random.Generator, std: float = DART_STD) -> None:
        self.rng, self.std = rng, std
        self.e = np.zeros(3)

    def __call__(self) -> np.ndarray:
        if self.std <= 0:
            return self.e
        rho = DART_CORRELATION
        self.e = rho * self.e + np.sqrt(1 - rho**2) * self.rng.normal(0.0, self.std, 3)
        return self.e


def episode_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(scene rng, noise rng) of an episode: independent streams of one seed, so the same seed
    gives the same scene whatever the noise setting."""
    scene, noise = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(scene), np.random.default_rng(noise)


def begin_episode(
    env: TabletopEnv, seed: int, task: str, noise: float
) -> tuple[EpisodeSpec, Expert, DartNoise]:
    """Episode `seed` of `task` set up in `env`: its spec (scene, target, instruction), the
    expert that acts on it and the DART noise on the executed motion, drawn from the seed's
    scene and noise streams (recording and the expert-only rollout see the same episode)."""
    scene_rng, noise_rng = episode_rngs(seed)
    spec = make_spec(task, scene_rng)
    reset(env, spec)
    return spec, Expert(spec), DartNoise(noise_rng, noise)


def run_episode(
    env: TabletopEnv,
    seed: int,
    task: str,
    frames: int,
    flow_strides: tuple[int, ...] = (1,),
    flow_grid: int = 4,
    noise: float = DART_STD,
) -> EpisodeData:
    """Runs the scripted expert for one episode and records everything a site log holds.

    The episode ends `HOLD_FRAMES` after the task succeeds (at least `MIN_FRAMES` frames), or
    after `frames` frames.

    Args:
        env: The site's environment.
        seed: Episode seed (placements, target, wording, noise).
        task: One of `TASKS`.
        frames: The most frames recorded (one action each).
        flow_strides: Ground-truth 3D flow between frames t and t + k for each k.
        flow_grid: Pixel stride of the grid of flow points.
        noise: DART noise std on the executed motion (action units; 0: none). The logged
            action is always the expert's clean action at the state reached.
    """
    spec, expert, perturb = begin_episode(env, seed, task, noise)
    K = env.intrinsics()
    size = env.size
    rgb = np.zeros((frames, size, size, 3), np.uint8)
    depth = np.zeros((frames, size, size), np.float32)
    extr = np.zeros((frames, 4, 4))
    oracle = np.zeros((frames, 11), np.float32)
    bodies, poses = [], []
    proprio: dict[str, list[np.ndarray]] = {}
    actions = np.zeros((frames, 4), np.float32)
    start = env.object_positions()
    done_at: int | None = None
    T = frames
    for t in range(frames):
        if done_at is None and success(spec, start, env.state()):
            done_at = t
        if done_at is not None and t >= max(MIN_FRAMES, done_at + HOLD_FRAMES):
            T = t
            break
        fr = env.render()
        rgb[t], depth[t] = fr.rgb, fr.depth
        bodies.append(fr.body)
        poses.append(env.body_poses())
        extr[t] = env.extrinsics()
        for key, value in env.proprio().items():
            proprio.setdefault(key, []).append(value)
        state = env.state()
        oracle[t] = state.oracle(spec.target)
        actions[t] = expert.act(state)
        executed = actions[t].astype(np.float64)
        executed[:3] += perturb()
        env.step(executed)
    end = env.state()
    rgb, depth, extr, oracle, actions = rgb[:T], depth[:T], extr[:T], oracle[:T], actions[:T]
    uv = grid_pixels(size, size, flow_grid)
    flows = {}
    frs = [Frame(rgb[t], depth[t], bodies[t]) for t in range(T)]
    for k in flow_strides:
        n = T - k
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
    proprio_arrays = {key: np.stack(values) for key, values in proprio.items()}
    return EpisodeData(
        rgb={"agentview": rgb},
        actions=actions,
        language=spec.language,
        depth={"agentview": depth},
        intrinsics={"agentview": K},
        extrinsics={"agentview": extr},
        proprio={**proprio_arrays, "object_state": oracle},
        flows=flows,
        attrs={
            "seed": seed,
            "task": task,
            "site": env.site.name,
            "success": success(spec, start, end),
            "success_frame": -1 if done_at is None else done_at,
            "target_object": OBJECTS[spec.target][0],
            "dart_std": noise,
        },
    )


def run_expert(env: TabletopEnv, seed: int, task: str, frames: int, noise: float = 0.0) -> bool:
    """The expert alone, in closed loop without rendering (the ceiling of a success table):
    whether it succeeds within `frames` control steps."""
    spec, expert, perturb = begin_episode(env, seed, task, noise)
    start = env.object_positions()
    for _ in range(frames):
        if success(spec, start, env.state()):
            return True
        a = expert.act(env.state()).astype(np.float64)
        a[:3] += perturb()
        env.step(a)
    return success(spec, start, env.state())
