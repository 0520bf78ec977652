"""Generating site logs: episodes in parallel worker processes, written in the native layout,
optionally exported to the robomimic and ALOHA layouts.

Episode ``i`` of a run with ``seed`` gets the same motion under every site, so two runs with the
same seed and different ``--site`` are paired logs.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynaflip_adapt.data.writer import EpisodeData, NativeWriter, write_aloha, write_robomimic
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.sim.sites import Site

EXPORTS = ("robomimic", "aloha", "aloha_jpeg")


@dataclass(frozen=True)
class GenerateSpec:
    """What to generate.

    Attributes:
        site: Appearance.
        episodes: Number of episodes.
        frames: The most frames per episode (an episode ends a few frames after its task
            succeeds, as demonstration datasets do).
        seed: Run seed; episode i's seed derives from (seed, i) only.
        size: Square image size.
        tasks: Tasks, assigned round-robin by episode index.
        flow_strides: Ground-truth flow strides (frames between the two ends).
        flow_grid: Pixel stride of the flow point grid.
        noise: DART noise on the executed motion while recording (action units; the logged
            action is the expert's clean one), so demonstrations show recoveries.
    """

    site: Site
    episodes: int = 20
    frames: int = 50
    seed: int = 0
    size: int = 128
    tasks: tuple[str, ...] = ("pick_place", "push", "reach")
    flow_strides: tuple[int, ...] = (1, 4)
    flow_grid: int = 4
    noise: float | None = None  # None: the experts' default (`expert.DART_STD`)

    def validate(self) -> None:
        from dynaflip_adapt.sim.expert import MIN_FRAMES, TASKS

        checks = [
            (self.episodes >= 1, "--episodes", self.episodes, ">= 1"),
            (self.frames >= MIN_FRAMES, "--frames", self.frames, f">= {MIN_FRAMES}"),
            (16 <= self.size <= 640, "--size", self.size, "16..640"),
            (self.flow_grid >= 1, "--flow-grid", self.flow_grid, ">= 1"),
            (
                self.noise is None or 0.0 <= self.noise <= 0.5,
                "--noise",
                self.noise,
                "0..0.5 (action units)",
            ),
            (bool(self.tasks), "--task", list(self.tasks), "at least one task"),
            (
                all(1 <= k < min(self.frames, MIN_FRAMES) for k in self.flow_strides),
                "--flow-stride",
                list(self.flow_strides),
                f"strides in [1, {min(self.frames, MIN_FRAMES) - 1}] (episodes can be that short)",
            ),
        ]
        for ok, key, found, expected in checks:
            if not ok:
                raise InputError(None, key, repr(found), expected)
        for t in self.tasks:
            if t not in TASKS:
                raise InputError(None, "--task", repr(t), "one of " + ", ".join(TASKS))


@dataclass
class GenerateResult:
    """What was written, with timing."""

    path: Path
    episodes: int
    frames: int
    seconds: float
    success_rate: float
    exports: dict[str, list[str]] = field(default_factory=dict)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "episodes": self.episodes,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(self.frames_per_second, 1),
            "success_rate": self.success_rate,
            "exports": self.exports,
        }


def episode_seed(seed: int, index: int) -> int:
    """Seed of episode `index` in a run with `seed` (independent of the site)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


_WORKER: dict[str, Any] = {}


def _init_worker(site: Site, size: int) -> None:
    from dynaflip_adapt.sim.env import TabletopEnv

    _WORKER["env"] = TabletopEnv(site, size)


Job = tuple[int, int, str, int, tuple[int, ...], int, float | None]


def _run(job: Job) -> tuple[int, EpisodeData]:
    from dynaflip_adapt.sim.expert import DART_STD, run_episode

    index, seed, task, frames, strides, grid, noise = job
    noise = DART_STD if noise is None else noise
    return index, run_episode(_WORKER["env"], seed, task, frames, strides, grid, noise)


def _jobs(spec: GenerateSpec) -> list[Job]:
    return [
        (
            i,
            episode_seed(spec.seed, i),
            spec.tasks[i % len(spec.tasks)],
            spec.frames,
            spec.flow_strides,
            spec.flow_grid,
            spec.noise,
        )
        for i in range(spec.episodes)
    ]


def iter_episodes(spec: GenerateSpec, workers: int = 1) -> Iterator[EpisodeData]:
    """Episodes in index order, generated by `workers` processes."""
    spec.validate()
    jobs = _jobs(spec)
    if workers <= 1:
        _init_worker(spec.site, spec.size)
        try:
            for job in jobs:
                yield _run(job)[1]
        finally:
            _WORKER.pop("env").close()
        return
    # spawn, not fork: an EGL context must not be inherited across a fork.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(spec.site, spec.size)) as pool:
        for _, ep in pool.imap(_run, jobs, chunksize=1):
            yield ep


def generate(
    out: str | Path,
    spec: GenerateSpec,
    *,
    workers: int = 1,
    compression: str = "none",
    exports: Sequence[str] = (),
    on_episode: Callable[[EpisodeData], None] | None = None,
) -> GenerateResult:
    """Generates a native-layout log file (written atomically), and optional exports.

    Raises:
        InputError: Bad spec or export name.
    """
    import time

    for e in exports:
        if e not in EXPORTS:
            raise InputError(None, "--export", repr(e), "one of " + ", ".join(EXPORTS))
    spec.validate()
    out = Path(out)
    t0 = time.perf_counter()
    successes = []
    frames = 0
    attrs = {"generator": "dynaflip-adapt sim", "site": spec.site.name, "seed": spec.seed}
    env_args = {
        "env_name": "dynaflip_tabletop",
        "site": spec.site.to_dict(),
        "size": spec.size,
        "max_frames": spec.frames,
        "dart_noise": spec.noise,
    }
    with NativeWriter(out, compression=compression, env_args=env_args, attrs=attrs) as w:
        for ep in iter_episodes(spec, workers):
            w.add(ep)
            frames += ep.length
            successes.append(bool(ep.attrs.get("success")))
            if on_episode is not None:
                on_episode(ep)
    seconds = time.perf_counter() - t0
    result = GenerateResult(out, spec.episodes, frames, seconds, float(np.mean(successes)))
    for e in exports:
        result.exports[e] = [str(p) for p in export_logs(out, e)]
    return result


def read_native_episodes(path: str | Path) -> Iterator[EpisodeData]:
    """Episodes of a native log, one at a time, as `EpisodeData` (for export)."""
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs

    r = EpisodeReader()
    try:
        for ep in open_logs(path).episodes:
            f = r.file(ep.file)
            g = f[ep.group]
            proprio = {p.rsplit("/", 1)[-1]: np.asarray(f[p][()]) for p in ep.proprio_paths}
            yield EpisodeData(
                rgb={ep.camera: r.rgb(ep, slice(0, ep.length))},
                actions=r.actions(ep, slice(0, ep.length)),
                language=ep.language or "",
                proprio=proprio,
                attrs={k: g.attrs[k] for k in g.attrs},
            )
    finally:
        r.close()


def export_logs(native: str | Path, layout: str, dest: str | Path | None = None) -> list[Path]:
    """Writes a native log's episodes in another layout (robomimic file or ALOHA folder).

    The default destination is beside the native file: ``NAME_robomimic.hdf5`` or ``NAME_aloha/``.
    """
    native = Path(native)
    if layout == "robomimic":
        target = Path(dest) if dest else native.with_name(f"{native.stem}_robomimic.hdf5")
        return [write_robomimic(target, list(read_native_episodes(native)))]
    if layout in ("aloha", "aloha_jpeg"):
        folder = Path(dest) if dest else native.with_name(f"{native.stem}_{layout}")
        quality = 90 if layout == "aloha_jpeg" else None
        return write_aloha(
            folder,
            list(read_native_episodes(native)),
            jpeg_quality=quality,
            qpos_key="robot0_joint_pos",
        )
    raise InputError(None, "--export", repr(layout), "one of " + ", ".join(EXPORTS))
