"""Closed-loop throughput: episodes per minute of `eval rollout`, and what bounds it.

A bc head on the shipped backbone's features, 64 px frames, episodes that run their full 50 steps
(the policy is trained on random actions, so it never succeeds: the worst case), on 2 cores.
Measured side by side in one run: the same episodes with the scripted expert acting (physics and
rendering only, no encoder or policy), and the policy's batched encoder + head pass alone.

Goal: >= 120 episodes per minute.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Never:
    """Steps the expert's environment, never succeeding: a fixed small motion."""

    def reset(self, slots, obs):  # type: ignore[no-untyped-def]
        pass

    def act(self, slots, obs):  # type: ignore[no-untyped-def]
        import numpy as np

        return np.tile([0.0, 0.0, 0.05, 1.0], (len(slots), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--envs", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    import torch

    from dynaflip_adapt.models.backbone import load_bundle
    from dynaflip_adapt.policies import fit_policy
    from dynaflip_adapt.sim.rollout import PolicyController, RolloutConfig, run_rollouts
    from dynaflip_adapt.sim.sites import get_site

    bundle = load_bundle(Path(__file__).resolve().parents[1] / "dynaflip_adapt/assets/backbone")
    g = torch.Generator().manual_seed(0)
    n = 256
    data = {
        "rgb": torch.randint(0, 255, (n, 3, 64, 64), dtype=torch.uint8, generator=g),
        "proprio": torch.randn(n, 9, generator=g),
        "actions": torch.randn(n, 4, generator=g),
        "episode": torch.arange(n) // 16,
    }
    policy, _ = fit_policy(
        bundle.model.image, bundle.model.preprocess, data, head="bc", tolerance=1.0, pin={},
        steps=20, val_fraction=0.0,
    )  # fmt: skip
    cfg = RolloutConfig(get_site("base"), seed=1, episodes=args.episodes, horizon=50,
                        render_size=args.size, envs=args.envs, workers=2)  # fmt: skip
    ctrl = PolicyController(
        policy, bundle.model.image.eval(), bundle.model.preprocess, bundle.model.cfg.image_size
    )
    t0 = time.perf_counter()
    res = run_rollouts(cfg, ctrl)
    t_policy = time.perf_counter() - t0
    steps = sum(r.steps for r in res)
    t0 = time.perf_counter()
    run_rollouts(cfg, _Never())
    t_env = time.perf_counter() - t0
    frames = torch.randint(0, 255, (args.envs, 3, 64, 64), dtype=torch.uint8, generator=g)
    prop = torch.randn(args.envs, 9)
    t0 = time.perf_counter()
    calls = 50
    with torch.no_grad():
        for _ in range(calls):
            policy.act(bundle.model.image(bundle.model.preprocess(frames)), prop)
    t_infer = (time.perf_counter() - t0) / (calls * args.envs)
    rate = 60 * len(res) / t_policy
    print(f"{len(res)} episodes, {steps} steps, {args.size} px, {args.envs} envs, 2 workers")
    print(f"policy in the loop      : {t_policy:6.1f} s = {rate:6.1f} episodes/min "
          f"({steps / t_policy:6.1f} steps/s)")  # fmt: skip
    print(
        f"environments alone      : {t_env:6.1f} s ({steps / t_env:6.1f} steps/s: physics + render)"
    )
    print(f"encoder + head, batched : {1000 * t_infer:6.2f} ms per env step "
          f"({1 / t_infer:6.0f} steps/s on this process)")  # fmt: skip
    bound = "environments (physics + rendering)" if t_env > 0.5 * t_policy else "inference"
    print(f"bound by                : {bound} ({t_env / t_policy:.0%} of the loop's time)")
    print(f"goal >= 120 episodes/min: {'PASS' if rate >= 120 else 'FAIL'}")


if __name__ == "__main__":
    main()
