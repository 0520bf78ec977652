"""The tabletop scene as MJCF, written for this project.

A 4-joint arm (yaw, shoulder, elbow, wrist pitch) with a two-finger gripper on position servos,
three free objects (red cube, green cylinder, blue cube) and a yellow plate on a table. Dynamics
never depend on the `Site`: only materials, lights and the camera do.
"""

from __future__ import annotations

from dynaflip_adapt.data.schema import SIM_OBJECTS
from dynaflip_adapt.sim.sites import Site, Surface

# Geometry shared with the controller (metres).
SHOULDER_Z = 0.12
L1 = 0.35
L2 = 0.30
TIP = 0.085  # wrist pivot -> grasp point, along -z when the hand points down
FINGER_OPEN = 0.035
OBJECT_HALF = 0.02
OBJECTS = (
    # name (in the logs' object order), shape, colour word, rgba
    (SIM_OBJECTS[0], "cube", "red", (0.85, 0.12, 0.1)),
    (SIM_OBJECTS[1], "cylinder", "green", (0.15, 0.7, 0.2)),
    (SIM_OBJECTS[2], "cube", "blue", (0.15, 0.3, 0.85)),
)
PLATE = ("yellow_plate", "plate", "yellow", (0.95, 0.85, 0.15))


def _f(v: tuple[float, ...] | list[float]) -> str:
    return " ".join(f"{x:.4f}" for x in v)


def _texture(name: str, s: Surface) -> str:
    if s.kind == "noise":
        return (
            f'<texture name="{name}" type="2d" builtin="flat" rgb1="{_f(s.rgb1)}" '
            f'mark="random" random="0.35" markrgb="{_f(s.rgb2)}" width="128" height="128"/>'
        )
    builtin = "flat" if s.kind == "flat" else s.kind
    return (
        f'<texture name="{name}" type="2d" builtin="{builtin}" rgb1="{_f(s.rgb1)}" '
        f'rgb2="{_f(s.rgb2)}" width="128" height="128"/>'
    )


def build_mjcf(site: Site) -> str:
    """The scene for a site, as an MJCF string."""
    cam_pos, xyaxes = site.camera.pose()
    tint = site.object_tint
    objects = []
    for name, shape, _, rgb in OBJECTS:
        col = tuple(min(1.0, c * t) for c, t in zip(rgb, tint, strict=True))
        if shape == "cube":
            geom = f'type="box" size="{OBJECT_HALF} {OBJECT_HALF} {OBJECT_HALF}"'
        else:
            geom = f'type="cylinder" size="{OBJECT_HALF} {OBJECT_HALF}"'
        objects.append(
            f'<body name="{name}" pos="0.4 0 {OBJECT_HALF}"><freejoint name="{name}_joint"/>'
            f'<geom name="{name}_geom" {geom} rgba="{_f(col)} 1" mass="0.05" '
            f'friction="0.5 0.02 0.001" condim="4" material="objmat"/></body>'
        )
    plate_col = tuple(min(1.0, c * t) for c, t in zip(PLATE[3], tint, strict=True))
    shadow = "true" if site.shadows else "false"
    arm = _f(site.arm_rgb)
    return f"""<mujoco model="dynaflip_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.002" integrator="implicitfast" gravity="0 0 -9.81" cone="elliptic" impratio="10"/>
  <visual>
    <quality shadowsize="{1024 if site.shadows else 0}" offsamples="0"/>
    <headlight ambient="{site.ambient:.3f} {site.ambient:.3f} {site.ambient:.3f}" diffuse="0.25 0.25 0.25" specular="0 0 0"/>
    <map znear="0.02" zfar="8"/>
    <global offwidth="640" offheight="640"/>
  </visual>
  <asset>
    {_texture("table_tex", site.table)}
    {_texture("floor_tex", site.floor)}
    <texture name="sky" type="skybox" builtin="flat" rgb1="{_f(site.sky)}" rgb2="{_f(site.sky)}" width="32" height="32"/>
    <texture name="obj_tex" type="2d" builtin="checker" rgb1="1 1 1" rgb2="0.8 0.8 0.8" width="32" height="32"/>
    <material name="tablemat" texture="table_tex" texrepeat="{site.table.repeat:.2f} {site.table.repeat:.2f}"/>
    <material name="floormat" texture="floor_tex" texrepeat="{site.floor.repeat:.2f} {site.floor.repeat:.2f}"/>
    <material name="objmat" texture="obj_tex" texrepeat="2 2"/>
    <material name="armmat" rgba="{arm} 1" specular="0.3"/>
    <material name="jointmat" rgba="0.15 0.15 0.15 1"/>
  </asset>
  <default>
    <joint damping="2" armature="0.01"/>
    <geom contype="1" conaffinity="1" friction="1 0.01 0.001"/>
    <position kp="600" forcerange="-60 60"/>
  </default>
  <worldbody>
    <light name="sun" directional="true" dir="{_f(site.light_dir)}" diffuse="{_f(site.light_rgb)}" specular="0.1 0.1 0.1" castshadow="{shadow}"/>
    <geom name="floor" type="plane" size="3 3 0.1" pos="0 0 -0.75" material="floormat"/>
    <!-- Objects slide on the table (friction 0.5, MuJoCo takes the larger of the two) rather than
         tip over when pushed; the fingers (2) still hold them. -->
    <geom name="table" type="box" size="0.45 0.45 0.02" pos="0.35 0 -0.02" material="tablemat" friction="0.5 0.005 0.0001"/>
    <geom name="table_leg" type="box" size="0.3 0.3 0.36" pos="0.35 0 -0.39" rgba="0.2 0.2 0.2 1" contype="0" conaffinity="0"/>
    <geom name="{PLATE[0]}" type="cylinder" size="0.045 0.002" pos="0.45 -0.15 0.002" rgba="{_f(plate_col)} 1" contype="0" conaffinity="0"/>
    <camera name="site_cam" pos="{_f(tuple(cam_pos))}" xyaxes="{_f(tuple(xyaxes))}" fovy="{site.camera.fovy:.3f}"/>
    <body name="base" pos="0 0 0">
      <geom type="cylinder" size="0.07 0.03" pos="0 0 0.03" material="jointmat"/>
      <body name="turret" pos="0 0 0.06" gravcomp="1">
        <joint name="yaw" axis="0 0 1" range="-2.6 2.6"/>
        <geom type="cylinder" size="0.045 0.03" pos="0 0 0.03" material="armmat" contype="0" conaffinity="0"/>
        <body name="upper_arm" pos="0 0 {SHOULDER_Z - 0.06:.3f}" gravcomp="1">
          <joint name="shoulder" axis="0 -1 0" range="-0.5 2.2"/>
          <geom type="sphere" size="0.035" material="jointmat" contype="0" conaffinity="0"/>
          <geom type="capsule" fromto="0 0 0 {L1} 0 0" size="0.024" material="armmat" contype="0" conaffinity="0"/>
          <body name="forearm" pos="{L1} 0 0" gravcomp="1">
            <joint name="elbow" axis="0 -1 0" range="-2.8 0.3"/>
            <geom type="sphere" size="0.03" material="jointmat" contype="0" conaffinity="0"/>
            <geom type="capsule" fromto="0 0 0 {L2} 0 0" size="0.02" material="armmat" contype="0" conaffinity="0"/>
            <body name="hand" pos="{L2} 0 0" gravcomp="1">
              <joint name="wrist" axis="0 -1 0" range="-2.5 2.5"/>
              <geom type="sphere" size="0.022" material="jointmat" contype="0" conaffinity="0"/>
              <geom name="palm" type="box" size="0.018 0.05 0.012" pos="0 0 -0.035" material="armmat"/>
              <!-- Closed, the fingers' inner faces are 2 mm apart: no slot a pushed cube's
                   corner can wedge into. -->
              <body name="finger_left" pos="0 0.007 -0.067" gravcomp="1">
                <joint name="finger_left" type="slide" axis="0 1 0" range="0 {FINGER_OPEN}" damping="5"/>
                <geom name="finger_left" type="box" size="0.02 0.006 0.024" material="jointmat" friction="2 0.05 0.001" condim="4" mass="0.02"/>
              </body>
              <body name="finger_right" pos="0 -0.007 -0.067" gravcomp="1">
                <joint name="finger_right" type="slide" axis="0 -1 0" range="0 {FINGER_OPEN}" damping="5"/>
                <geom name="finger_right" type="box" size="0.02 0.006 0.024" material="jointmat" friction="2 0.05 0.001" condim="4" mass="0.02"/>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
    {chr(10).join("    " + o for o in objects)}
  </worldbody>
  <equality>
    <!-- A parallel gripper: both fingers move together (as real parallel grippers couple them),
         so a held object cannot push one finger back and slip along the closing axis. -->
    <joint joint1="finger_left" joint2="finger_right" polycoef="0 1 0 0 0" solref="0.005 1"/>
  </equality>
  <actuator>
    <position name="yaw" joint="yaw" kp="800"/>
    <position name="shoulder" joint="shoulder" kp="1200"/>
    <position name="elbow" joint="elbow" kp="1000"/>
    <position name="wrist" joint="wrist" kp="400"/>
    <position name="finger_left" joint="finger_left" kp="500" forcerange="-15 15"/>
    <position name="finger_right" joint="finger_right" kp="500" forcerange="-15 15"/>
  </actuator>
</mujoco>
"""
