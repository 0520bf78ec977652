"""Pretraining throughput (triplets/s) and achieved FLOP/s as a fraction of a plain fp32 matmul's
FLOP/s measured in the same run. Goal: >= 0.5 for the default model size (the compute step, no
data loading: that is what the model costs; data loading overlaps in DataLoader workers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import count_flops, matmul_flops_per_s, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument(
        "--set", action="append", default=[], help="recipe override (e.g. model.width=256)"
    )
    args = ap.parse_args()
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.models.backbone import Backbone
    from dynaflip_adapt.train.pretrain import backbone_config, trimodal_losses

    torch.manual_seed(0)
    rec = load_recipe(f"pretrain/{args.size}", ["model.text_encoder=hashed", *args.set])[0]
    model = Backbone(backbone_config(rec)).train()
    B, s, P = args.batch, model.cfg.image_size, model.cfg.flow_points
    batch = {
        "rgb0": torch.randint(0, 255, (B, 3, s, s), dtype=torch.uint8),
        "rgb1": torch.randint(0, 255, (B, 3, s, s), dtype=torch.uint8),
        "text": torch.randint(0, 8, (B,)),
        "flow_points": torch.randn(B, P, 3),
        "flow_delta": 0.01 * torch.randn(B, P, 3),
        "flow_mask": torch.ones(B, P, dtype=torch.bool),
    }
    text = torch.randn(8, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss, _ = trimodal_losses(model, batch, text, rec.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()

    flops = count_flops(step)
    sec = timed(step, 8)
    ceiling = matmul_flops_per_s()
    achieved = flops / sec
    shape = f"width {model.cfg.width}, depth {model.cfg.depth}, {s}x{s}"
    print(
        f"model {args.size} ({shape}), batch {B}: {flops / 1e9:.2f} GFLOP/step, {sec * 1e3:.0f} ms"
    )
    print(f"throughput      : {B / sec:7.1f} triplets/s ({2 * B / sec:.0f} frames/s)")
    print(
        f"achieved        : {achieved / 1e9:7.1f} GFLOP/s; plain fp32 matmul {ceiling / 1e9:.1f} GFLOP/s"
    )
    frac = achieved / ceiling
    print(f"fraction        : {frac:7.2f} (goal >= 0.5: {'PASS' if frac >= 0.5 else 'FAIL'})")


if __name__ == "__main__":
    main()
