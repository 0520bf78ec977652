"""Inference latency: merged export vs the base encoder vs unmerged PEFT, batch 1 and 32.

Goal: merged / base <= 1.02 at both batch sizes (merging makes LoRA free at inference);
unmerged PEFT is measurably slower.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _common import SIZES, model_config, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="small", choices=SIZES)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.models.adapter import wrap_lora
    from dynaflip_adapt.models.backbone import Backbone

    torch.manual_seed(0)
    model = Backbone(model_config(args.size)).eval()
    lo = load_recipe("finetune/default")[0].lora
    peft = wrap_lora(model.image, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.use_dora).eval()
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    merged = copy.deepcopy(peft).merge_and_unload().eval()
    base = model.image
    s = model.cfg.image_size
    torch.set_num_threads(torch.get_num_threads())
    with torch.no_grad():
        for bs in (1, 32):
            x = torch.randn(bs, 3, s, s)
            reps = args.reps * (4 if bs == 1 else 1)
            # Interleave the contenders so machine noise hits them alike.
            t = {"base": [], "merged": [], "peft": []}
            for _ in range(5):
                t["base"].append(timed(lambda x=x: base(x), reps))
                t["merged"].append(timed(lambda x=x: merged(x), reps))
                t["peft"].append(timed(lambda x=x: peft(x), reps))
            best = {k: min(v) for k, v in t.items()}
            ratio = best["merged"] / best["base"]
            print(
                f"batch {bs:2d}: base {best['base'] * 1e3:7.2f} ms, merged {best['merged'] * 1e3:7.2f} ms, "
                f"unmerged PEFT {best['peft'] * 1e3:7.2f} ms | merged/base {ratio:.3f} "
                f"({'PASS' if ratio <= 1.02 else 'FAIL'} <= 1.02), PEFT/base {best['peft'] / best['base']:.3f}"
            )
            diff = (merged(x) - peft(x)).abs().max().item()
            print(f"          merged vs unmerged max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
