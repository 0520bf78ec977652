"""The simulated robot: physics, inverse kinematics, rendering and ground-truth 3D flow.

``MUJOCO_GL`` must be set before the first ``import mujoco``; this module sets it to ``egl`` when
the user has not chosen (offscreen, no display needed).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco

from dynaflip_adapt.errors import RuntimeFailure
from dynaflip_adapt.flow.geometry import backproject, project
from dynaflip_adapt.sim.scene import (
    FINGER_OPEN,
    L1,
    L2,
    OBJECT_HALF,
    OBJECTS,
    PLATE,
    SHOULDER_Z,
    TIP,
    build_mjcf,
)
from dynaflip_adapt.sim.sites import Site

CONTROL_HZ = 10
ACTION_SCALE = 0.1  # metres of end-effector motion per unit action
HOME = np.array([0.3, 0.0, 0.2])
MIN_Z = 0.012  # the controller never aims the grasp point lower (the table is at z = 0)
# OpenCV camera axes (x right, y down, z forward) from MuJoCo's (x right, y up, looking along -z).
_CV_FROM_MJ = np.diag([1.0, -1.0, -1.0])


@dataclass
class Frame:
    """One rendered frame: rgb (H,W,3) uint8, depth (H,W) float32 metres (0 = no surface),
    body (H,W) int32 body id per pixel (-1 for background)."""

    rgb: np.ndarray
    depth: np.ndarray
    body: np.ndarray


def ik(target: np.ndarray) -> np.ndarray:
    """Joint angles (yaw, shoulder, elbow, wrist) putting the grasp point at `target` with the
    hand pointing straight down (elbow up). Unreachable targets are clamped to the workspace."""
    x, y, z = (float(v) for v in target)
    yaw = math.atan2(y, x)
    r = math.hypot(x, y)
    h = z + TIP - SHOULDER_Z
    d = math.hypot(r, h)
    d_max, d_min = L1 + L2 - 1e-4, abs(L1 - L2) + 1e-4
    if d > d_max or d < d_min:
        s = min(max(d, d_min), d_max) / max(d, 1e-9)
        r, h = r * s, h * s
    c = (r * r + h * h - L1 * L1 - L2 * L2) / (2 * L1 * L2)
    elbow = -math.acos(max(-1.0, min(1.0, c)))
    shoulder = math.atan2(h, r) - math.atan2(L2 * math.sin(elbow), L1 + L2 * math.cos(elbow))
    wrist = -(shoulder + elbow)
    return np.array([yaw, shoulder, elbow, wrist])


@dataclass
class SimState:
    """What the scene is, now: the inputs of the scripted experts and of the oracle policy.

    Attributes:
        eef: (3,) grasp point, world frame.
        fingers: (2,) finger slide positions (0 closed, `FINGER_OPEN` open).
        objects: (3, 3) object centres, in `OBJECTS` order.
        plate: (2,) plate centre on the table.
    """

    eef: np.ndarray
    fingers: np.ndarray
    objects: np.ndarray
    plate: np.ndarray

    def oracle(self, target: int) -> np.ndarray:
        """(11,) float32, as logged in ``obs/object_state``: the target object's centre, the
        plate's, then the other objects' (what only the simulator knows; policies must see it
        in the image, and tell the target from the instruction)."""
        others = np.delete(self.objects, target, axis=0).reshape(-1)
        return np.concatenate([self.objects[target], self.plate, others]).astype(np.float32)


class TabletopEnv:
    """A site's tabletop scene with an offscreen renderer.

    An action is (dx, dy, dz, grip): the grasp point's motion over one control period in units
    of `ACTION_SCALE` metres, relative to where it is measured now (as an operational-space
    delta controller does), and the gripper command (>= 0 open, < 0 close).

    Args:
        site: Appearance (does not change dynamics).
        size: Square image size in pixels.
        render: False for physics only (experts and state-based policies; much faster).
    """

    def __init__(self, site: Site, size: int = 128, render: bool = True) -> None:
        self.site = site
        self.size = size
        self.model = mujoco.MjModel.from_xml_string(build_mjcf(site))
        self.data = mujoco.MjData(self.model)
        self.renderer: mujoco.Renderer | None = None
        if render:
            try:
                self.renderer = mujoco.Renderer(self.model, size, size)
            except Exception as exc:  # mujoco.FatalError: no usable OpenGL context
                raise RuntimeFailure(
                    f"offscreen rendering unavailable ({exc}); MUJOCO_GL is "
                    f"{os.environ.get('MUJOCO_GL')!r}: set MUJOCO_GL=egl (or osmesa) before "
                    "mujoco is first imported; on Debian: apt-get install libegl1 "
                    "libgl1-mesa-dri"
                ) from None
        self.cam = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "site_cam")
        self.substeps = round(1.0 / (CONTROL_HZ * self.model.opt.timestep))
        self.obj_body = [
            mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, n) for n, *_ in OBJECTS
        ]
        self.obj_qadr = [
            self.model.jnt_qposadr[
                mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, n + "_joint")
            ]
            for n, *_ in OBJECTS
        ]
        self.plate_geom = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_GEOM, PLATE[0])
        self.hand = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_BODY, "hand")
        self.arm_joints = ["yaw", "shoulder", "elbow", "wrist"]
        self.arm_qadr = [
            self.model.jnt_qposadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, j)]
            for j in self.arm_joints
        ]
        self.finger_qadr = [
            self.model.jnt_qposadr[mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, j)]
            for j in ("finger_left", "finger_right")
        ]
        self.target = HOME.copy()
        self.grip = 1.0

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()

    # ---------------------------------------------------------------------------------- state

    def reset(self, objects_xy: np.ndarray, yaws: np.ndarray, plate_xy: np.ndarray) -> None:
        """Places objects (3, 2) with yaw angles and the plate, arm at home, gripper open."""
        mujoco.mj_resetData(self.model, self.data)
        for qa, (x, y), a in zip(self.obj_qadr, objects_xy, yaws, strict=True):
            self.data.qpos[qa : qa + 7] = [
                x,
                y,
                OBJECT_HALF + 1e-4,
                math.cos(a / 2),
                0,
                0,
                math.sin(a / 2),
            ]
        self.model.geom_pos[self.plate_geom][:2] = plate_xy
        self.target = HOME.copy()
        self.grip = 1.0
        self.data.qpos[self.arm_qadr] = ik(self.target)
        self._set_ctrl()
        mujoco.mj_forward(self.model, self.data)
        for _ in range(50):  # settle objects and servos
            mujoco.mj_step(self.model, self.data)

    def _set_ctrl(self) -> None:
        self.data.ctrl[:4] = ik(self.target)
        finger = FINGER_OPEN if self.grip > 0 else 0.0
        self.data.ctrl[4:6] = finger

    def step(self, action: np.ndarray) -> None:
        """Applies an action (dx, dy, dz, grip) for one control period (1 / CONTROL_HZ s): the
        controller's target moves to the measured grasp point plus the commanded motion."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        start = self.target
        end = self.eef() + ACTION_SCALE * a[:3]
        end[2] = max(end[2], MIN_Z)
        self.grip = 1.0 if a[3] >= 0 else -1.0
        # The low-level controller tracks a reference interpolated over the control period;
        # a step change of the servo targets would shake whatever the gripper holds.
        for i in range(self.substeps):
            self.target = start + (i + 1) / self.substeps * (end - start)
            self._set_ctrl()
            mujoco.mj_step(self.model, self.data)
        self.target = end

    def eef(self) -> np.ndarray:
        """World position of the grasp point."""
        xmat = self.data.xmat[self.hand].reshape(3, 3)
        return self.data.xpos[self.hand] + xmat @ np.array([0.0, 0.0, -TIP])

    def proprio(self) -> dict[str, np.ndarray]:
        """Robot-only observations (no object state: objects are seen, not told)."""
        return {
            "robot0_joint_pos": self.data.qpos[self.arm_qadr].astype(np.float32),
            "robot0_gripper_qpos": self.data.qpos[self.finger_qadr].astype(np.float32),
            "robot0_eef_pos": self.eef().astype(np.float32),
        }

    def object_positions(self) -> np.ndarray:
        """(3, 3) world positions of the objects."""
        return np.stack([self.data.xpos[b] for b in self.obj_body]).copy()

    def plate_xy(self) -> np.ndarray:
        """(2,) the plate's centre."""
        return self.model.geom_pos[self.plate_geom][:2].copy()

    def state(self) -> SimState:
        """The scene now (for experts and the oracle policy)."""
        return SimState(
            self.eef(),
            self.data.qpos[self.finger_qadr].copy(),
            self.object_positions(),
            self.plate_xy(),
        )

    def body_poses(self) -> np.ndarray:
        """(nbody, 4, 4) world poses of every body."""
        T = np.tile(np.eye(4), (self.model.nbody, 1, 1))
        T[:, :3, :3] = self.data.xmat.reshape(-1, 3, 3)
        T[:, :3, 3] = self.data.xpos
        return T

    # ---------------------------------------------------------------------------------- camera

    def intrinsics(self) -> np.ndarray:
        """OpenCV K with pixel centres at integers: cx = (W - 1) / 2.

        With W / 2, back-projection is biased by ~2 mm at 1 m.
        """
        fovy = math.radians(self.model.cam_fovy[self.cam])
        f = 0.5 * self.size / math.tan(fovy / 2)
        c = (self.size - 1) / 2
        return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])

    def extrinsics(self) -> np.ndarray:
        """Camera-to-world (4, 4) in OpenCV camera axes."""
        E = np.eye(4)
        E[:3, :3] = self.data.cam_xmat[self.cam].reshape(3, 3) @ _CV_FROM_MJ
        E[:3, 3] = self.data.cam_xpos[self.cam]
        return E

    def render_rgb(self) -> np.ndarray:
        """The RGB frame (H, W, 3) uint8 only (what a policy sees; one render pass)."""
        r = self._renderer()
        r.update_scene(self.data, camera=self.cam)
        return r.render().copy()

    def _renderer(self) -> mujoco.Renderer:
        if self.renderer is None:
            raise RuntimeFailure("this environment was made without a renderer (render=False)")
        return self.renderer

    def render(self) -> Frame:
        """RGB, depth (from the depth pass, not the RGB pass: the RGB pass's depth is biased by
        about -2.3e-3 z^2) and body ids."""
        r = self._renderer()
        r.update_scene(self.data, camera=self.cam)
        rgb = r.render().copy()
        r.enable_depth_rendering()
        depth = r.render().astype(np.float32)
        r.disable_depth_rendering()
        r.enable_segmentation_rendering()
        seg = r.render()
        r.disable_segmentation_rendering()
        geom = seg[..., 0]
        is_geom = (seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM)) & (geom >= 0)
        body = np.where(is_geom, self.model.geom_bodyid[np.clip(geom, 0, None)], -1).astype(
            np.int32
        )
        depth[~is_geom] = 0.0  # sky: no surface
        return Frame(rgb, depth, body)


def ground_truth_flow(
    f0: Frame,
    f1: Frame,
    poses0: np.ndarray,
    poses1: np.ndarray,
    K: np.ndarray,
    E0: np.ndarray,
    E1: np.ndarray,
    uv: np.ndarray,
    tol: float = 0.01,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground-truth 3D flow of grid pixels from frame 0 to frame 1.

    Each back-projected point moves rigidly with the body it lies on: X' = T_b(1) T_b(0)^-1 X.
    It is valid when it had depth at frame 0 and is visible at frame 1: it projects inside the
    image onto a surface at the same depth (within `tol` metres), i.e. not occluded.

    Returns:
        points (P, 3) at frame 0, delta (P, 3) = X' - X, valid (P,) bool.
    """
    has = f0.depth[uv[:, 1], uv[:, 0]] > 0
    X = backproject(f0.depth, K, E0, uv)
    bodies = f0.body[uv[:, 1], uv[:, 0]]
    X1 = X.copy()
    moved = has & (bodies >= 0)
    b = bodies[moved]
    Xh = np.concatenate([X[moved], np.ones((len(b), 1))], axis=1)
    rel = np.einsum("nij,njk->nik", poses1[b], np.linalg.inv(poses0[b]))
    X1[moved] = np.einsum("nij,nj->ni", rel, Xh)[:, :3]
    # Visibility at frame 1.
    uv1, z = project(X1, K, E1)
    H, W = f1.depth.shape
    with np.errstate(invalid="ignore"):
        ui, vi = np.round(uv1[:, 0]), np.round(uv1[:, 1])
        inside = (z > 0) & (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
    d1 = np.zeros(len(uv))
    d1[inside] = f1.depth[vi[inside].astype(int), ui[inside].astype(int)]
    visible = inside & (d1 > 0) & (np.abs(d1 - z) < tol)
    valid = has & visible
    points = np.where(has[:, None], X, 0.0).astype(np.float32)
    delta = np.where(valid[:, None], X1 - X, 0.0).astype(np.float32)
    return points, delta, valid
