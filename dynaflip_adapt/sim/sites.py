"""Site appearance: everything a deployment site changes about the images, nothing about physics.

A site is colours, textures, lights, shadows and the camera pose / field of view. Rendering the
same episode seed under two sites gives paired logs: identical motion, different appearance.
Named presets cover the usual shifts; ``random`` draws a site from a seed, for pretraining
diversity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from dynaflip_adapt.errors import InputError

TEXTURES = ("flat", "checker", "gradient", "noise")


@dataclass(frozen=True)
class Surface:
    """A textured surface: builtin texture kind, two colours, repeat count."""

    kind: str = "flat"
    rgb1: tuple[float, float, float] = (0.6, 0.5, 0.4)
    rgb2: tuple[float, float, float] = (0.5, 0.4, 0.3)
    repeat: float = 4.0


@dataclass(frozen=True)
class Camera:
    """A look-at camera: target point, distance, azimuth/elevation in degrees, vertical FOV."""

    lookat: tuple[float, float, float] = (0.4, 0.0, 0.05)
    distance: float = 0.72
    azimuth: float = 180.0
    elevation: float = 48.0
    fovy: float = 52.0

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Position and MuJoCo ``xyaxes`` (camera x and y axes in world) of the camera."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        # Direction from the target to the camera.
        d = np.array([-math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), math.sin(el)])
        pos = np.asarray(self.lookat) + self.distance * d
        forward = -d
        x = np.cross(forward, [0.0, 0.0, 1.0])
        x /= np.linalg.norm(x)
        y = np.cross(x, forward)  # MuJoCo cameras look along -z with +y up
        return pos, np.concatenate([x, y])


@dataclass(frozen=True)
class Site:
    """The appearance of one deployment site."""

    name: str = "base"
    table: Surface = Surface("checker", (0.55, 0.45, 0.35), (0.5, 0.4, 0.3), 6.0)
    floor: Surface = Surface("flat", (0.3, 0.3, 0.32), (0.3, 0.3, 0.32), 1.0)
    sky: tuple[float, float, float] = (0.75, 0.8, 0.85)
    arm_rgb: tuple[float, float, float] = (0.85, 0.85, 0.88)
    light_dir: tuple[float, float, float] = (-0.3, 0.2, -1.0)
    light_rgb: tuple[float, float, float] = (0.8, 0.8, 0.8)
    ambient: float = 0.35
    shadows: bool = False
    object_tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    camera: Camera = Camera()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


BASE = Site()

PRESETS: dict[str, Site] = {
    "base": BASE,
    # Lighting only: dim, warm, directional from the side, with shadows.
    "warm_dim": replace(
        BASE,
        name="warm_dim",
        light_rgb=(0.75, 0.55, 0.35),
        light_dir=(0.8, -0.5, -0.6),
        ambient=0.18,
        shadows=True,
        sky=(0.35, 0.3, 0.25),
    ),
    # Textures and colours: another table, floor, arm paint.
    "textures": replace(
        BASE,
        name="textures",
        table=Surface("noise", (0.25, 0.3, 0.45), (0.6, 0.65, 0.75), 3.0),
        floor=Surface("checker", (0.7, 0.7, 0.6), (0.2, 0.2, 0.2), 8.0),
        arm_rgb=(0.25, 0.25, 0.28),
        sky=(0.9, 0.9, 0.8),
    ),
    # Camera pose and field of view.
    "camera": replace(
        BASE,
        name="camera",
        camera=Camera((0.38, 0.05, 0.05), 0.8, 155.0, 55.0, 46.0),
    ),
    # Everything at once: the hardest shift.
    "night_shift": replace(
        BASE,
        name="night_shift",
        table=Surface("gradient", (0.2, 0.35, 0.2), (0.05, 0.1, 0.05), 1.0),
        floor=Surface("noise", (0.15, 0.12, 0.1), (0.3, 0.25, 0.2), 4.0),
        arm_rgb=(0.9, 0.6, 0.2),
        light_rgb=(0.5, 0.6, 0.9),
        light_dir=(0.2, 0.7, -0.7),
        ambient=0.22,
        shadows=True,
        sky=(0.1, 0.12, 0.2),
        object_tint=(0.85, 0.9, 1.1),
        camera=Camera((0.42, -0.04, 0.05), 0.68, 200.0, 40.0, 58.0),
    ),
}


def _rgb(
    rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95
) -> tuple[float, float, float]:
    return tuple(float(x) for x in rng.uniform(lo, hi, 3))  # type: ignore[return-value]


def random_site(seed: int) -> Site:
    """A site drawn from a seed: colours, textures, light, shadows and camera all vary."""
    rng = np.random.default_rng(seed)

    def surface() -> Surface:
        return Surface(
            str(rng.choice(TEXTURES)), _rgb(rng), _rgb(rng), float(rng.uniform(1.0, 10.0))
        )

    warm = rng.uniform(0.6, 1.0, 3)
    return Site(
        name=f"random-{seed}",
        table=surface(),
        floor=surface(),
        sky=_rgb(rng),
        arm_rgb=_rgb(rng, 0.1, 0.95),
        light_dir=(
            float(rng.uniform(-1, 1)),
            float(rng.uniform(-1, 1)),
            -float(rng.uniform(0.4, 1.0)),
        ),
        light_rgb=tuple(float(x) for x in warm * rng.uniform(0.5, 1.0)),  # type: ignore[arg-type]
        ambient=float(rng.uniform(0.12, 0.45)),
        shadows=bool(rng.random() < 0.5),
        object_tint=tuple(float(x) for x in rng.uniform(0.85, 1.15, 3)),  # type: ignore[arg-type]
        camera=Camera(
            (float(rng.uniform(0.34, 0.46)), float(rng.uniform(-0.06, 0.06)), 0.05),
            float(rng.uniform(0.62, 0.85)),
            float(rng.uniform(145.0, 215.0)),
            float(rng.uniform(35.0, 62.0)),
            float(rng.uniform(44.0, 62.0)),
        ),
    )


def _seeded_name(name: str) -> int | None:
    """N for a ``random-N`` site name, else None."""
    return int(name[7:]) if name.startswith("random-") and name[7:].isdigit() else None


CAMERA_SEP = "-camera-"


BLEND_SEP = "@"


def _lerp(a: Any, b: Any, t: float) -> Any:
    if isinstance(a, float | int) and not isinstance(a, bool):
        return a * (1.0 - t) + b * t  # exact at both ends
    if isinstance(a, tuple):
        return tuple(_lerp(x, y, t) for x, y in zip(a, b, strict=True))
    if isinstance(a, Surface | Camera):
        return type(a)(**{k: _lerp(getattr(a, k), getattr(b, k), t) for k in asdict(a)})
    return b if t >= 0.5 else a  # texture kinds, shadows: switch half-way


def blend(a: Site, b: Site, t: float) -> Site:
    """The site `t` of the way from `a` to `b`: colours, light, ambient and camera pose
    interpolated, texture kinds and shadows switched half-way (``t`` in [0, 1])."""
    fields = {k: _lerp(getattr(a, k), getattr(b, k), t) for k in asdict(a) if k != "name"}
    return Site(name=f"{b.name}{BLEND_SEP}{t:g}", **fields)


def get_site(name: str, seed: int | None = None) -> Site:
    """A preset by name, ``random-N``, ``random`` drawn from `seed`, a camera variant as
    `with_camera` names it (``random-3-camera-base``: site 3 seen by the base camera), or a
    mild shift ``SITE@T``: `T` (0..1) of the way from the base site to SITE (``warm_dim@0.25``).

    Raises:
        InputError: Unknown name (lists the valid ones), ``random`` without a seed, or a
            blend fraction outside [0, 1].
    """
    if BLEND_SEP in name:
        target, _, frac = name.rpartition(BLEND_SEP)
        try:
            t = float(frac)
        except ValueError:
            t = float("nan")
        if not 0.0 <= t <= 1.0:
            raise InputError(None, "--site", repr(name), "SITE@T with T in [0, 1]")
        return blend(BASE, get_site(target, seed), t)
    if CAMERA_SEP in name:
        site, _, camera = name.rpartition(CAMERA_SEP)
        return with_camera(get_site(site, seed), camera)
    if name == "random":
        if seed is None:
            raise InputError(None, "--site random", "no --site-seed", "a seed for the random site")
        return random_site(seed)
    if (n := _seeded_name(name)) is not None:
        return random_site(n)
    if name not in PRESETS:
        raise InputError(
            None,
            "--site",
            repr(name),
            "one of " + ", ".join([*PRESETS, "random", "random-N", "SITE-camera-CAMERA", "SITE@T"]),
        )
    return PRESETS[name]


def with_camera(site: Site, camera: str) -> Site:
    """`site`'s appearance seen by the camera (pose and field of view) of site `camera`.

    One rig, new lighting and textures: e.g. ``with_camera(random_site(3), "base")``.

    Raises:
        InputError: `camera` is not a preset or ``random-N``.
    """
    if camera not in PRESETS and _seeded_name(camera) is None:
        # Not get_site's error: it offers 'random', which needs a seed --camera has no room for.
        raise InputError(
            None, "--camera", repr(camera), "one of " + ", ".join([*PRESETS, "random-N"])
        )
    rig = get_site(camera)
    return replace(site, name=f"{site.name}{CAMERA_SEP}{rig.name}", camera=rig.camera)
