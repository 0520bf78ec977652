"""Held-out evaluation of a backbone against baselines (the README's backbone table).

Candidates, all evaluated on held-out triplets (sites and episodes never seen in training):
- the backbone with its own heads;
- probes: the image encoder frozen, fresh heads trained with the tri-modal objective on the
  training logs (same steps for every candidate), for the backbone, the same architecture at
  random init, and an image-only (time-contrastive) baseline pretrained on the same logs.
Only the image encoder differs between probes, so the comparison isolates what it learned.

Usage: python benchmarks/eval_backbone.py --train LOGS... --test LOGS... [--baseline-steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default=str(ROOT / "dynaflip_adapt" / "assets" / "backbone"))
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument("--test", nargs="+", required=True)
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument(
        "--baseline-steps", type=int, default=None, help="default: the backbone's own steps"
    )
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dynaflip_adapt.config import PretrainRecipe
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.models.backbone import Backbone, load_bundle
    from dynaflip_adapt.train.evaluation import heldout_retrieval, probe, test_triplets
    from dynaflip_adapt.train.pretrain import backbone_config, pretrain
    from dynaflip_adapt.train.retrieval import retrieval

    bundle = load_bundle(args.backbone)
    prov = bundle.manifest["provenance"]
    recipe = PretrainRecipe.model_validate(prov["recipe"])
    gap = recipe.data.gap
    reports = [
        heldout_retrieval(bundle, args.test, samples=args.samples, name="DynaFLIP (own heads)")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        base_steps = args.baseline_steps or int(prov["steps"])
        img_only = pretrain(
            open_logs(args.train),
            recipe,
            Path(tmp) / "img",
            max_steps=base_steps,
            objective="image_only",
        )
        import torch

        torch.manual_seed(123)
        candidates = {
            "DynaFLIP (probe)": bundle.model,
            "random init (probe)": Backbone(backbone_config(recipe)),
            f"image-only contrastive, {base_steps} steps (probe)": load_bundle(
                img_only.bundle
            ).model,
        }
        for i, (name, model) in enumerate(candidates.items()):
            probed = probe(model, args.train, recipe, Path(tmp) / f"probe{i}", args.probe_steps)
            ds, text = test_triplets(probed, args.test, gap)
            reports.append(retrieval(name, probed, ds, text, args.samples))
    print(
        f"held-out tri-modal retrieval (gap {gap}, {reports[0].triplets} triplets, {reports[0].instructions} instructions)"
    )
    print("| encoder | img->flow top-1 | top-5 | img->language top-1 | top-5 | mean area |")
    print("|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r.name} | {r.img_to_flow_top1:.3f} | {r.img_to_flow_top5:.3f} | {r.img_to_lang_top1:.3f} | {r.img_to_lang_top5:.3f} | {r.mean_area:.3f} |"
        )
    print(
        f"| chance | {reports[0].chance_flow_top1:.3f} | {min(1.0, 5 * reports[0].chance_flow_top1):.3f} | {reports[0].chance_lang_top1:.3f} | {min(1.0, 5 * reports[0].chance_lang_top1):.3f} | |"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=2))


if __name__ == "__main__":
    main()
