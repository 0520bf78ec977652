"""Closed-loop episodes in the simulator: does a policy still succeed at a site?

Environments step in worker processes (physics, rendering, the success predicate); the
controller acts for all of them at once in the calling process (one batched encoder + policy
pass per control step). Episode i of a run with seed S is the scene `sim generate --seed S`
records as its episode i (same placements, target, instruction), at whatever site: so success
rates at two sites, or with two encoders, are paired by episode. An episode ends when its task
succeeds (as robomimic evaluates) or after `horizon` steps.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from dynaflip_adapt.models.backbone import Preprocess
    from dynaflip_adapt.policies import Policy

from dynaflip_adapt.sim.sites import Site

# What a worker reports per environment after each reset and step.
Obs = dict[str, Any]


@dataclass(frozen=True)
class RolloutConfig:
    """Which episodes to run, where.

    Attributes:
        site: Appearance.
        seed: Run seed: episode i is `sim generate --seed` episode i (same scene and task).
        episodes: Number of episodes.
        tasks: Tasks, assigned round-robin by episode index (as `sim generate` does).
        horizon: Control steps before an episode that has not succeeded counts as failed.
        render_size: Rendered frame size (that of the logs the policy learned from; frames are
            then resized to the policy's input size as training did).
        envs: Environments stepped at once (one batched policy pass for all of them).
        workers: Processes stepping them.
        record: Episodes (the first ones) whose frames are kept for videos.
    """

    site: Site
    seed: int = 0
    episodes: int = 30
    tasks: tuple[str, ...] = ("pick_place", "push", "reach")
    horizon: int = 50
    render_size: int = 128
    envs: int = 16
    workers: int = 2
    record: int = 0


class Controller(Protocol):
    """Acts for a batch of environments from their observations."""

    def reset(self, slots: Sequence[int], obs: Sequence[Obs]) -> None:
        """New episodes start in `slots` (language etc. in `obs`)."""

    def act(self, slots: Sequence[int], obs: Sequence[Obs]) -> np.ndarray:
        """(len(slots), A) actions for the environments in `slots`."""


@dataclass
class EpisodeResult:
    """One closed-loop episode."""

    index: int
    seed: int
    task: str
    language: str
    success: bool
    steps: int
    frames: list[np.ndarray] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "task": self.task,
            "language": self.language,
            "success": self.success,
            "steps": self.steps,
        }


# ------------------------------------------------------------------------------------ workers

_ENVS: list[Any] = []


def _worker(conn: Any, site: Site, size: int, count: int, render: bool) -> None:
    """Owns `count` environments; answers reset/step messages until closed."""
    from dynaflip_adapt.sim.env import TabletopEnv
    from dynaflip_adapt.sim.expert import Expert, episode_rngs, make_spec, reset, success

    envs = [TabletopEnv(site, size, render=render) for _ in range(count)]
    episodes: list[dict[str, Any] | None] = [None] * count

    def observe(i: int) -> Obs:
        env, ep = envs[i], episodes[i]
        assert ep is not None
        st = env.state()
        prop = env.proprio()
        return {
            "rgb": env.render_rgb() if render else None,
            "proprio": prop,
            "object_state": st.oracle(ep["spec"].target),
            "eef": st.eef.astype(np.float32),
            "success": success(ep["spec"], ep["start"], st),
            "expert": ep["expert"].act(st).astype(np.float32),
            "language": ep["spec"].language,
        }

    try:
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                break
            if msg[0] == "reset":
                out = []
                for i, seed, task in msg[1]:
                    spec = make_spec(task, episode_rngs(seed)[0])
                    reset(envs[i], spec)
                    episodes[i] = {
                        "spec": spec,
                        "start": envs[i].object_positions(),
                        "expert": Expert(spec),
                    }
                    out.append(observe(i))
                conn.send(out)
            elif msg[0] == "step":
                out = []
                for i, action in msg[1]:
                    envs[i].step(action)
                    out.append(observe(i))
                conn.send(out)
    finally:
        for env in envs:
            env.close()


class _Pool:
    """Environments spread over worker processes, addressed by slot."""

    def __init__(self, site: Site, size: int, envs: int, workers: int, render: bool) -> None:
        workers = max(1, min(workers, envs))
        ctx = mp.get_context("spawn")  # an EGL context must not be inherited across a fork
        per = [envs // workers + (1 if w < envs % workers else 0) for w in range(workers)]
        self.where: list[tuple[int, int]] = []  # slot -> (worker, local index)
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for w, n in enumerate(per):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, site, size, n, render), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
            self.where += [(w, i) for i in range(n)]

    def _call(self, kind: str, items: list[tuple[int, Any]]) -> list[Obs]:
        by_worker: dict[int, list[tuple[int, Any]]] = {}
        for slot, payload in items:
            w, i = self.where[slot]
            entry = (i, *payload) if isinstance(payload, tuple) else (i, payload)
            by_worker.setdefault(w, []).append(entry)
        for w, batch in by_worker.items():
            self.conns[w].send((kind, batch))
        replies = {w: self.conns[w].recv() for w in by_worker}
        order = {w: iter(r) for w, r in replies.items()}
        return [next(order[self.where[slot][0]]) for slot, _ in items]

    def reset(self, items: list[tuple[int, int, str]]) -> list[Obs]:
        return self._call("reset", [(slot, (seed, task)) for slot, seed, task in items])

    def step(self, items: list[tuple[int, np.ndarray]]) -> list[Obs]:
        return self._call("step", list(items))

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(("close",))
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def episode_plan(cfg: RolloutConfig) -> list[tuple[int, int, str]]:
    """(index, episode seed, task) of every episode: `sim generate`'s, for the same seed."""
    from dynaflip_adapt.sim.generate import episode_seed

    return [
        (i, episode_seed(cfg.seed, i), cfg.tasks[i % len(cfg.tasks)]) for i in range(cfg.episodes)
    ]


def run_rollouts(
    cfg: RolloutConfig,
    controller: Controller,
    *,
    render: bool = True,
    on_episode: Callable[[EpisodeResult], None] | None = None,
) -> list[EpisodeResult]:
    """Runs `cfg.episodes` closed-loop episodes with `controller`; results in episode order.

    Args:
        cfg: Site, seeds, sizes.
        controller: Acts for a batch of environments.
        render: False when the controller reads no image (the expert, the oracle): physics
            only, much faster.
        on_episode: Called as each episode ends.
    """
    plan = episode_plan(cfg)
    n_envs = max(1, min(cfg.envs, len(plan)))
    pool = _Pool(cfg.site, cfg.render_size, n_envs, cfg.workers, render)
    results: dict[int, EpisodeResult] = {}
    queue = list(plan)
    running: dict[int, dict[str, Any]] = {}  # slot -> episode state
    try:

        def start(slots: list[int]) -> None:
            items = []
            for slot in slots:
                if not queue:
                    continue
                index, seed, task = queue.pop(0)
                running[slot] = {"index": index, "seed": seed, "task": task, "steps": 0}
                items.append((slot, seed, task))
            if not items:
                return
            obs = pool.reset(items)
            for (slot, _, _), o in zip(items, obs, strict=True):
                running[slot]["obs"] = o
                running[slot]["language"] = o["language"]
                running[slot]["frames"] = []
            controller.reset([s for s, _, _ in items], obs)

        start(list(range(n_envs)))
        while running:
            # Episodes that succeeded (or ran out of steps) end before acting again.
            done = [
                s for s, r in running.items() if r["obs"]["success"] or r["steps"] >= cfg.horizon
            ]
            for slot in done:
                r = running.pop(slot)
                res = EpisodeResult(
                    r["index"], r["seed"], r["task"], r["language"], bool(r["obs"]["success"]),
                    r["steps"], r["frames"],
                )  # fmt: skip
                results[r["index"]] = res
                if on_episode is not None:
                    on_episode(res)
            if done:
                start(done)
            if not running:
                break
            slots = sorted(running)
            obs = [running[s]["obs"] for s in slots]
            for s in slots:
                if running[s]["index"] < cfg.record and obs[slots.index(s)]["rgb"] is not None:
                    running[s]["frames"].append(running[s]["obs"]["rgb"])
            actions = np.asarray(controller.act(slots, obs), dtype=np.float64)
            new = pool.step(list(zip(slots, actions, strict=True)))
            for s, o in zip(slots, new, strict=True):
                running[s]["obs"] = o
                running[s]["steps"] += 1
    finally:
        pool.close()
    return [results[i] for i, _, _ in plan]


# -------------------------------------------------------------------------------- controllers


class ExpertController:
    """The scripted expert (the ceiling of a success table): acts on the true state."""

    def reset(self, slots: Sequence[int], obs: Sequence[Obs]) -> None:
        pass

    def act(self, slots: Sequence[int], obs: Sequence[Obs]) -> np.ndarray:
        return np.stack([o["expert"] for o in obs])


def proprio_vector(proprio: dict[str, np.ndarray]) -> np.ndarray:
    """The proprio vector as the native reader builds it from a log (schema key order, keys
    the simulator does not record skipped)."""
    from dynaflip_adapt.data.schema import load_schema

    keys = load_schema("native").proprio.get("keys", [])
    return np.concatenate(
        [np.asarray(proprio[k], np.float32).reshape(-1) for k in keys if k in proprio]
    )


class PolicyController:
    """A policy in closed loop: frames -> (encoder) -> policy -> action, batched.

    Args:
        policy: A loaded policy.
        encoder: The image encoder its features come from (base, or an adapter merged in);
            None for heads that read no backbone.
        preprocess: The backbone's preprocessing.
        image_size: The encoder's input size.
        embed: Instruction embedder (language-conditioned policies).
        execute: For a diffusion head, actions of each predicted chunk executed before it
            predicts again (1: receding horizon, re-planned every step).
    """

    def __init__(
        self,
        policy: Policy,
        encoder: nn.Module | None,
        preprocess: Preprocess,
        image_size: int,
        embed: Callable[[Sequence[str]], Any] | None = None,
        execute: int = 1,
    ) -> None:
        self.policy, self.encoder, self.preprocess = policy, encoder, preprocess
        self.image_size, self.embed, self.execute = image_size, embed, max(1, execute)
        self.language: dict[int, Any] = {}
        self.queue: dict[int, list[np.ndarray]] = {}

    def reset(self, slots: Sequence[int], obs: Sequence[Obs]) -> None:
        if self.policy.uses_language and self.embed is not None:
            emb = self.embed([o["language"] for o in obs])
            for i, s in enumerate(slots):
                self.language[s] = emb[i]
        for s in slots:
            self.queue[s] = []

    def act(self, slots: Sequence[int], obs: Sequence[Obs]) -> np.ndarray:
        import torch

        from dynaflip_adapt.data.frames import resize_uint8
        from dynaflip_adapt.policies import oracle_features, policy_input
        from dynaflip_adapt.policies.heads import DiffusionHead
        from dynaflip_adapt.policies.policy import FRAME_READS, decode_actions, head_inputs

        need = [i for i, s in enumerate(slots) if not self.queue[s]]
        if need:
            sub = [obs[i] for i in need]
            data: dict[str, torch.Tensor] = {
                "proprio": torch.from_numpy(np.stack([proprio_vector(o["proprio"]) for o in sub]))
            }
            reads = self.policy.reads
            if reads in FRAME_READS:
                rgb = torch.from_numpy(np.stack([o["rgb"] for o in sub])).permute(0, 3, 1, 2)
                data["rgb"] = resize_uint8(rgb.contiguous(), self.image_size)
            if reads == "state":
                data["state"] = oracle_features(
                    torch.from_numpy(np.stack([o["object_state"] for o in sub])),
                    torch.from_numpy(np.stack([o["eef"] for o in sub])),
                )
            lang = (
                torch.stack([self.language[slots[i]] for i in need])
                if self.policy.uses_language
                else None
            )
            with torch.no_grad():
                x = policy_input(self.policy, data, self.encoder, self.preprocess)
                head = self.policy.head
                if isinstance(head, DiffusionHead) and self.execute > 1:
                    f, p = head_inputs(
                        self.policy.stats, x, data["proprio"], lang, self.policy.reads,
                        self.policy.uses_proprio,
                    )  # fmt: skip
                    chunk = head.sample(f, p)[:, : self.execute]  # (B, K, A) normalized
                    acts = decode_actions(self.policy.stats, chunk)
                else:
                    acts = self.policy.act(x, data["proprio"], lang)[:, None]
            for j, i in enumerate(need):
                self.queue[slots[i]] = list(acts[j].numpy())
        return np.stack([self.queue[s].pop(0) for s in slots])


# ----------------------------------------------------------------------------------- summary


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% by default): well behaved at 0/n and
    n/n, where the normal approximation collapses to a point."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # Exactly 0 and 1 at the ends (what the closed form gives, less rounding).
    lo = 0.0 if successes == 0 else max(0.0, float(centre - half))
    hi = 1.0 if successes == n else min(1.0, float(centre + half))
    return (lo, hi)


def success_table(results: Sequence[EpisodeResult]) -> dict[str, dict[str, Any]]:
    """Success rate with its Wilson interval per task and over all episodes."""
    out: dict[str, dict[str, Any]] = {}
    groups: dict[str, list[EpisodeResult]] = {"all": list(results)}
    for r in results:
        groups.setdefault(r.task, []).append(r)
    for name, rs in groups.items():
        k = sum(r.success for r in rs)
        lo, hi = wilson(k, len(rs))
        out[name] = {
            "successes": k,
            "episodes": len(rs),
            "rate": k / max(len(rs), 1),
            "ci95": [lo, hi],
        }
    return out
