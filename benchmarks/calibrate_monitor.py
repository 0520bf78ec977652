"""Calibrating `monitor`'s drift threshold on simulator sites: the score of new logs of each site
against a reference of the base site, over independent draws (new episode seeds).

Same-site draws must read "fits" (score <= threshold), shifted sites "adapt"; a mild shift
(``SITE@T``: T of the way from the base site to SITE) shows where between them the score lies.
Uses the shipped backbone and `monitor`'s own functions (`data.frames.sample_frames`, `token_maps`,
`drift_score`), with the reference's token maps computed once.

    MUJOCO_GL=egl python benchmarks/calibrate_monitor.py --draws 10 \\
        --site base --site warm_dim@0.25 --site camera@0.25 --site camera@0.5 --site camera
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", action="append", required=True, help="site to score (repeatable)")
    p.add_argument("--draws", type=int, default=10, help="independent draws per site")
    p.add_argument("--episodes", type=int, default=16, help="episodes per draw")
    p.add_argument("--reference-episodes", type=int, default=64)
    p.add_argument("--frames", type=int, default=256, help="frames sampled on each side")
    p.add_argument("--seed", type=int, default=600, help="first draw's episode seed")
    p.add_argument("--threshold", type=float, default=None, help="default: the monitor recipe's")
    p.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="base-site logs for the reference (default: generated, seed 12345)",
    )
    p.add_argument(
        "--policy",
        action="append",
        default=[],
        help="registered policy version (repeatable): also score its action drift",
    )
    args = p.parse_args()

    import torch

    from dynaflip_adapt.config import MonitorRecipe, load_recipe
    from dynaflip_adapt.data.frames import sample_frames
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.eval.drift import action_drift, drift_score, token_maps
    from dynaflip_adapt.models.backbone import load_bundle
    from dynaflip_adapt.policies import actions_on_frames
    from dynaflip_adapt.sim.generate import GenerateSpec, generate
    from dynaflip_adapt.sim.sites import get_site

    recipe, _ = load_recipe("monitor/default", [], kind="monitor")
    assert isinstance(recipe, MonitorRecipe)
    threshold = args.threshold if args.threshold is not None else recipe.drift.threshold
    policies = {}
    if args.policy:
        from dynaflip_adapt.registry.client import Registry
        from dynaflip_adapt.registry.lifecycle import POLICY_MODEL, load_policy_version
        from dynaflip_adapt.registry.store import resolve_store

        registry = Registry(resolve_store(None))
        for ref in args.policy:
            policies[ref] = load_policy_version(registry, registry.resolve(POLICY_MODEL, ref))
    import dynaflip_adapt

    bundle = load_bundle(Path(dynaflip_adapt.__file__).parent / "assets" / "backbone")
    encoder, pre, size = bundle.model.image.eval(), bundle.model.preprocess, 128

    def maps_of(site: str, episodes: int, seed: int, tmp: Path, logs: Path | None = None) -> tuple:
        out = logs or tmp / f"{site}-{seed}.h5"
        if logs is None:
            spec = GenerateSpec(site=get_site(site), episodes=episodes, seed=seed, size=size)
            generate(out, spec)
        sample = sample_frames(open_logs([out]), bundle.model.cfg.image_size, args.frames)
        if logs is None:
            out.unlink()
        with torch.no_grad():  # as `monitor` scores them
            acts = {name: actions_on_frames(policy, encoder, pre, sample.frames)
                    for name, policy in policies.items()}  # fmt: skip
        return token_maps(encoder, pre, sample.frames), sample.episodes, acts

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        ref, ref_eps, ref_acts = maps_of(
            "base", args.reference_episodes, 12345, tmp, args.reference
        )
        print(f"reference: {len(ref)} frames of {len(set(ref_eps.tolist()))} base episodes "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        for site in args.site:
            scores, actions = [], {name: [] for name in policies}
            for k in range(args.draws):
                new, _, acts = maps_of(site, args.episodes, args.seed + k, tmp)
                scores.append(drift_score(ref, ref_eps, new).score)
                for name, policy in policies.items():
                    actions[name].append(action_drift(ref_acts[name], acts[name],
                                                      policy.action_scale))  # fmt: skip
            rows.append({
                "site": site, "draws": len(scores), "min": min(scores),
                "median": statistics.median(scores), "max": max(scores),
                "adapt": sum(s > threshold for s in scores), "scores": scores,
                "actions": actions,
            })  # fmt: skip
            r = rows[-1]
            print(f"{site}: min {r['min']:.3f} median {r['median']:.3f} max {r['max']:.3f}, "
                  f"adapt {r['adapt']}/{r['draws']} at {threshold}", flush=True)  # fmt: skip
            for name, values in actions.items():
                print(
                    f"  policy {name}: action drift min {min(values):.4f} median "
                    f"{statistics.median(values):.4f} max {max(values):.4f}",
                    flush=True,
                )
    print(f"\n| new logs | min | median | max | read as `adapt` at {threshold} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['site']} | {r['min']:.3f} | {r['median']:.3f} | {r['max']:.3f} | "
              f"{r['adapt']} / {r['draws']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"threshold": threshold, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
