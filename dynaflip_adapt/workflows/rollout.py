"""Closed-loop evaluation: success rates of policies, with each encoder, at each site.

The product's question before a promotion is not "is the offline action error lower" but
"does the robot still do its job at this site". `closed_loop` answers it in the simulator:
every (site, encoder, policy) cell runs the same episode seeds (same scenes, same
instructions), so the cells are paired comparisons; the scripted expert on the same seeds is the
ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynaflip_adapt.errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from dynaflip_adapt.models.backbone import Bundle
    from dynaflip_adapt.policies import Policy

SIM_ACTION_DIM = 4  # (dx, dy, dz, grip)
SIM_PROPRIO_DIM = 9  # eef (3), finger slides (2), arm joints (4)


@dataclass(frozen=True)
class RolloutRequest:
    """What to run.

    Attributes:
        sites: Site names (presets, ``random-N``, ``SITE-camera-CAMERA``).
        episodes: Episodes per cell.
        seed: Episode seed (episode i = `sim generate --seed SEED` episode i): use one the
            policies were not trained on.
        horizon: Control steps before an episode counts as failed.
        render_size: Frame size rendered (that of the policies' training logs).
        envs: Environments stepped at once.
        workers: Processes stepping them.
        expert: Also run the scripted expert (the ceiling).
        videos: Episodes per cell kept as videos.
        execute: Actions of each diffusion chunk executed before re-planning.
    """

    sites: tuple[str, ...]
    episodes: int = 20
    seed: int = 1000
    horizon: int = 50
    render_size: int = 128
    envs: int = 16
    workers: int = 2
    expert: bool = True
    videos: int = 0
    execute: int = 1

    def validate(self) -> None:
        from dynaflip_adapt.sim.sites import get_site

        if not self.sites:
            raise InputError(None, "--site", "no site", "at least one site")
        for s in self.sites:
            get_site(s)
        checks = [
            (self.episodes >= 1, "--episodes", self.episodes, ">= 1"),
            (self.horizon >= 1, "--horizon", self.horizon, ">= 1"),
            (16 <= self.render_size <= 640, "--render-size", self.render_size, "16..640"),
            (self.envs >= 1, "--envs", self.envs, ">= 1"),
            (self.workers >= 1, "--workers", self.workers, ">= 1"),
            (self.execute >= 1, "--execute", self.execute, ">= 1"),
        ]
        for ok, key, found, expected in checks:
            if not ok:
                raise InputError(None, key, repr(found), expected)


@dataclass
class Cell:
    """Success of one policy with one encoder at one site."""

    site: str
    encoder: str
    policy: str
    head: str
    table: dict[str, dict[str, Any]]
    episodes: list[dict[str, Any]]
    seconds: float
    videos: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "encoder": self.encoder,
            "policy": self.policy,
            "head": self.head,
            "success": self.table,
            "episodes": self.episodes,
            "seconds": round(self.seconds, 2),
            "videos": self.videos,
        }


@dataclass
class RolloutReport:
    """Every cell, the expert's ceiling per site, and throughput."""

    request: RolloutRequest
    cells: list[Cell]
    expert: dict[str, dict[str, dict[str, Any]]]
    seconds: float

    @property
    def episodes_per_minute(self) -> float:
        n = sum(len(c.episodes) for c in self.cells)
        return 60.0 * n / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "request": asdict(self.request),
            "cells": [c.to_dict() for c in self.cells],
            "expert": self.expert,
            "seconds": round(self.seconds, 2),
            "episodes_per_minute": round(self.episodes_per_minute, 1),
        }


def check_policy_fits_sim(name: str, policy: Policy) -> None:
    """A policy must speak the simulator's action and proprio spaces.

    Raises:
        InputError: Another action or proprio width.
    """
    spec = policy.spec
    where = str(policy.path) if policy.path else name
    if spec["action_dim"] != SIM_ACTION_DIM:
        raise InputError(
            where, "action_dim", str(spec["action_dim"]), f"{SIM_ACTION_DIM} (the simulator's)"
        )
    if policy.uses_proprio and spec["proprio_dim"] != SIM_PROPRIO_DIM:
        raise InputError(
            where, "proprio_dim", str(spec["proprio_dim"]), f"{SIM_PROPRIO_DIM} (the simulator's)"
        )


def closed_loop(
    request: RolloutRequest,
    bundle: Bundle,
    policies: dict[str, Policy],
    encoders: dict[str, nn.Module],
    *,
    video_dir: Path | None = None,
    on_episode: Callable[[str, Any], None] | None = None,
) -> RolloutReport:
    """Runs every (site, encoder, policy) cell on the same episode seeds.

    Args:
        request: Sites, episodes, sizes.
        bundle: The backbone (preprocessing, input size, language embedding).
        policies: Name -> loaded policy. Heads that read no backbone run once per site (the
            encoder does not change them).
        encoders: Name -> image encoder module (e.g. ``{"base": ..., "adapter v3": ...}``).
        video_dir: Where labelled videos of the first `request.videos` episodes of each cell
            go (GIF).
        on_episode: Called with (cell label, episode result) as episodes end.

    Raises:
        InputError: A bad request or a policy that does not fit the simulator.
    """
    from dynaflip_adapt.policies import instruction_embedder
    from dynaflip_adapt.sim.rollout import (
        ExpertController,
        PolicyController,
        RolloutConfig,
        run_rollouts,
        success_table,
    )
    from dynaflip_adapt.sim.sites import get_site

    request.validate()
    for name, pol in policies.items():
        check_policy_fits_sim(name, pol)
    embed = (
        instruction_embedder(bundle) if any(p.uses_language for p in policies.values()) else None
    )
    t0 = time.perf_counter()
    cells: list[Cell] = []
    expert: dict[str, dict[str, dict[str, Any]]] = {}
    for site_name in request.sites:
        site = get_site(site_name)

        def config(record: int, site: Any = site) -> RolloutConfig:
            return RolloutConfig(
                site=site,
                seed=request.seed,
                episodes=request.episodes,
                horizon=request.horizon,
                render_size=request.render_size,
                envs=request.envs,
                workers=request.workers,
                record=record,
            )

        if request.expert:
            res = run_rollouts(config(0), ExpertController(), render=False)
            expert[site_name] = success_table(res)
        for pname, pol in policies.items():
            encoder_names = list(encoders) if pol.uses_image else ["-"]
            for ename in encoder_names:
                label = f"{site_name} / {ename} / {pname}"
                ctrl = PolicyController(
                    pol,
                    encoders.get(ename),
                    bundle.model.preprocess,
                    bundle.model.cfg.image_size,
                    embed,
                    execute=request.execute,
                )
                c0 = time.perf_counter()
                res = run_rollouts(
                    config(request.videos),
                    ctrl,
                    # A state policy needs no frames, except for its videos.
                    render=pol.reads != "state" or request.videos > 0,
                    on_episode=_labelled(on_episode, label),
                )
                cell = Cell(
                    site_name,
                    ename,
                    pname,
                    pol.spec["head"],
                    success_table(res),
                    [r.to_dict() for r in res],
                    time.perf_counter() - c0,
                )
                if video_dir is not None:
                    cell.videos = [
                        str(p) for p in save_videos(res, video_dir, f"{site_name}_{ename}_{pname}")
                    ]
                cells.append(cell)
    return RolloutReport(request, cells, expert, time.perf_counter() - t0)


def _labelled(hook: Callable[[str, Any], None] | None, label: str) -> Callable[[Any], None] | None:
    if hook is None:
        return None
    return lambda result: hook(label, result)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def save_videos(results: Sequence[Any], folder: Path, stem: str) -> list[Path]:
    """Writes the recorded episodes of `results` as GIFs, each frame captioned with the task,
    the step and (at the end) SUCCESS or FAILURE."""
    import cv2
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in results:
        if not r.frames:
            continue
        verdict = "SUCCESS" if r.success else "FAILURE"
        frames = []
        for t, f in enumerate(r.frames):
            big = cv2.resize(f, (256, 256), interpolation=cv2.INTER_NEAREST)
            strip = np.full((36, 256, 3), 255, np.uint8)
            last = t == len(r.frames) - 1
            cv2.putText(strip, r.language[:40], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.38,
                        (0, 0, 0), 1, cv2.LINE_AA)  # fmt: skip
            tag = f"step {t}" + (f"  {verdict}" if last else "")
            colour = (0, 140, 0) if (last and r.success) else (200, 0, 0) if last else (0, 0, 0)
            cv2.putText(strip, tag, (4, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                        cv2.LINE_AA)  # fmt: skip
            frames.append(Image.fromarray(np.concatenate([strip, big], axis=0)))
        frames += [frames[-1]] * 5  # hold the verdict
        path = folder / f"{_slug(stem)}_ep{r.index}_{verdict.lower()}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
        out.append(path)
    return out
