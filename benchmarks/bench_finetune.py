"""Adapter (LoRA) training throughput vs a full fine-tune of the same encoder, in one run, and
against the compute-bound limit; where the time goes in a real `finetune`; peak RSS 1x vs 10x.

Limit: (forward FLOPs + activation-backward FLOPs) / measured fp32 matmul FLOP/s. With LoRA the
frozen weights need no weight gradients, so the backward costs about one forward. Goal: the
LoRA step reaches >= 0.6 of that limit at the default model size.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import SIZES, count_flops, matmul_flops_per_s, model_config, timed  # noqa: E402


def compute_part(size: str, batch: int) -> dict[str, float]:
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.losses import relative_mse
    from dynaflip_adapt.models.adapter import wrap_lora
    from dynaflip_adapt.models.backbone import Backbone

    torch.manual_seed(0)
    model = Backbone(model_config(size)).eval().requires_grad_(False)
    s = model.cfg.image_size
    x = torch.randn(2 * batch, 3, s, s)
    lo = load_recipe("finetune/default")[0].lora
    lora = wrap_lora(model.image, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.use_dora)
    full = copy.deepcopy(model.image).requires_grad_(True)
    target = model.image(x).detach()

    def make_step(enc):
        params = [p for p in enc.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            loss = relative_mse(enc(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    lora_step, full_step = make_step(lora), make_step(full)
    fwd = count_flops(lambda: model.image(x))
    t_lora = timed(lora_step, 8)
    t_full = timed(full_step, 8)
    t_fwd = timed(lambda: torch.no_grad()(model.image)(x), 8)
    ceiling = matmul_flops_per_s()
    limit_lora = 2 * fwd / ceiling  # forward + activation backward
    limit_full = 3 * fwd / ceiling  # + weight gradients
    return {
        "frames_per_step": 2 * batch,
        "forward_gflop": fwd / 1e9,
        "matmul_gflops": ceiling / 1e9,
        "lora_frames_per_s": 2 * batch / t_lora,
        "full_frames_per_s": 2 * batch / t_full,
        "forward_frames_per_s": 2 * batch / t_fwd,
        "lora_fraction_of_limit": limit_lora / t_lora,
        "full_fraction_of_limit": limit_full / t_full,
        "forward_fraction_of_limit": (fwd / ceiling) / t_fwd,
    }


def _finetune_child(logs: str, backbone: str, steps: int) -> None:
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.models.backbone import load_bundle
    from dynaflip_adapt.train.finetune import finetune

    rec = load_recipe(
        "finetune/default", [f"optim.max_steps={steps}", "run.checkpoint_every=100000"]
    )[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = finetune(load_bundle(backbone), open_logs(logs), rec, tmp, site="bench")
        wall = time.perf_counter() - t0
    rss = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(json.dumps({"frames_per_s": res.frames_per_second, "wall": wall, "rss_kb": rss}))


def real_part(backbone: str, steps: int, episodes: int) -> None:
    """A real finetune (data loading, kornia augmentation, replay, EMA) on 1x and 10x logs."""
    from dynaflip_adapt.sim.generate import GenerateSpec, generate
    from dynaflip_adapt.sim.sites import get_site

    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for name, n in (("1x", episodes), ("10x", 10 * episodes)):
            p = Path(tmp) / f"{name}.h5"
            generate(
                p,
                GenerateSpec(get_site("night_shift"), n, 50, 0, 128, flow_strides=(4,)),
                workers=2,
            )
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(p), backbone, str(steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"real finetune on {name} logs ({p.stat().st_size / 2**20:.0f} MiB): {out[name]['frames_per_s']:.0f} frames/s, peak RSS {out[name]['rss_kb'] / 1024:.0f} MiB"
            )
        ratio = out["10x"]["rss_kb"] / out["1x"]["rss_kb"]
        print(f"peak RSS 10x / 1x: {ratio:.3f} (goal <= 1.1: {'PASS' if ratio <= 1.1 else 'FAIL'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--backbone", default=str(ROOT / "dynaflip_adapt" / "assets" / "backbone"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--episodes", type=int, default=6)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _finetune_child(args.child[0], args.child[1], int(args.child[2]))
        return
    r = compute_part(args.size, args.batch)
    print(
        f"model {args.size}: {r['forward_gflop']:.2f} GFLOP forward per {r['frames_per_step']} frames; matmul ceiling {r['matmul_gflops']:.0f} GFLOP/s"
    )
    print(
        f"forward only        : {r['forward_frames_per_s']:7.1f} frames/s ({r['forward_fraction_of_limit']:.2f} of its limit)"
    )
    print(
        f"LoRA adapter step   : {r['lora_frames_per_s']:7.1f} frames/s ({r['lora_fraction_of_limit']:.2f} of the fwd+act-bwd limit)"
    )
    print(
        f"full fine-tune step : {r['full_frames_per_s']:7.1f} frames/s ({r['full_fraction_of_limit']:.2f} of the fwd+full-bwd limit)"
    )
    print(f"LoRA / full         : {r['lora_frames_per_s'] / r['full_frames_per_s']:7.2f}")
    verdict = "PASS" if r["lora_fraction_of_limit"] >= 0.6 else "FAIL"
    print(f"goal LoRA >= 0.6 of limit: {verdict}")
    if args.size in ("tiny", "small") and Path(args.backbone, "manifest.json").exists():
        real_part(args.backbone, args.steps, args.episodes)


if __name__ == "__main__":
    main()
