"""Held-out evaluation of a backbone against baselines (docs/results/2026-11-backbone.md).

Candidates, all evaluated on held-out triplets (sites and episodes never seen in training):
- the backbone with its own heads;
- probes: the image encoder frozen, fresh heads trained with the tri-modal objective on the
  training logs (same steps for every candidate), for the backbone, the same architecture at
  random init, and an image-only (time-contrastive) baseline pretrained on the same logs.
Only the image encoder differs between probes, so the comparison isolates what it learned.

`--test` may be repeated: each is a held-out set (e.g. unseen sites; new episodes of the
pretraining sites), scored with the same probes (trained once).

Every encoder is scored on the same triplets, so each margin (backbone minus baseline) comes with
a paired 95% interval from a bootstrap over episodes (a set's triplets are a few dozen episodes,
not independent draws); a margin is printed in bold when its interval excludes zero.

Usage: python benchmarks/eval_backbone.py --train LOGS... --test LOGS... [--test LOGS...]
       [--baseline-steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from dynaflip_adapt.eval.retrieval import RetrievalReport


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--backbone", default=str(ROOT / "dynaflip_adapt" / "assets" / "backbone"))
    ap.add_argument("--train", nargs="+", required=True)
    ap.add_argument(
        "--test",
        nargs="+",
        action="append",
        required=True,
        help="held-out logs (files or folders); repeat for several sets",
    )
    ap.add_argument("--probe-steps", type=int, default=300)
    ap.add_argument(
        "--baseline-steps", type=int, default=None, help="default: the backbone's own steps"
    )
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from dynaflip_adapt.config import PretrainRecipe
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.eval.backbone import heldout_gap, probe, test_triplets
    from dynaflip_adapt.eval.retrieval import margins as retrieval_margins
    from dynaflip_adapt.eval.retrieval import retrieval
    from dynaflip_adapt.models.backbone import Backbone, load_bundle
    from dynaflip_adapt.train.pretrain import backbone_config, pretrain

    bundle = load_bundle(args.backbone)
    prov = bundle.manifest["provenance"]
    recipe = PretrainRecipe.model_validate(prov["recipe"])
    gap = heldout_gap(bundle)
    sets: dict[str, list[str]] = {}
    for i, paths in enumerate(args.test):
        name = _set_name(paths)
        sets[name if name not in sets else f"{name} #{i + 1}"] = paths
    # Every candidate shares the recipe's input size, flow points and text encoder, so each
    # set's triplets (and instruction embeddings) are built once and scored for all of them.
    tests = {key: test_triplets(bundle.model, paths, gap) for key, paths in sets.items()}
    reports = {
        key: [retrieval("DynaFLIP (own heads)", bundle.model, ds, text, args.samples)]
        for key, (ds, text) in tests.items()
    }
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
            for key, (ds, text) in tests.items():
                reports[key].append(retrieval(name, probed, ds, text, args.samples))
    margins = {key: retrieval_margins(rows[:2], rows[2:]) for key, rows in reports.items()}
    for key, rows in reports.items():
        _print_table(key, rows, gap)
        _print_margins(margins[key])
    if args.json:
        out = {
            key: {"encoders": [r.to_dict() for r in rows], "margins": margins[key]}
            for key, rows in reports.items()
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


def _print_margins(rows: list[dict[str, Any]]) -> None:
    from dynaflip_adapt.eval.retrieval import METRICS, margin_cell

    print("\nmargins (backbone minus baseline; 95% paired interval, bootstrap over episodes):")
    print("| backbone - baseline | img->flow top-1 | top-5 | img->language top-1 | top-5 |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = []
        for m in METRICS:
            cell, clear = margin_cell(row, m)
            cells.append(f"**{cell}**" if clear else cell)
        print(f"| {row['backbone']} - {row['baseline']} | " + " | ".join(cells) + " |")


def _set_name(paths: list[str]) -> str:
    """A set's label: its path; files of one folder as `folder/ (N logs)`; else joined by +."""
    if len(paths) == 1:
        return paths[0]
    parents = {Path(p).parent for p in paths}
    if len(parents) == 1 and all(Path(p).is_file() for p in paths):
        return f"{parents.pop()}/ ({len(paths)} logs)"
    return " + ".join(paths)


def _print_table(key: str, reports: list[RetrievalReport], gap: int) -> None:
    first = reports[0]
    print(
        f"\n{key}: held-out tri-modal retrieval (gap {gap}, {first.triplets} triplets, "
        f"{first.instructions} instructions)"
    )
    print("| encoder | img->flow top-1 | top-5 | img->language top-1 | top-5 | mean area |")
    print("|---|---|---|---|---|---|")
    for r in reports:
        print(
            f"| {r.name} | {r.img_to_flow_top1:.3f} | {r.img_to_flow_top5:.3f} | "
            f"{r.img_to_lang_top1:.3f} | {r.img_to_lang_top5:.3f} | {r.mean_area:.3f} |"
        )
    print(
        f"| chance | {first.chance_flow_top1:.3f} | {min(1.0, 5 * first.chance_flow_top1):.3f} | "
        f"{first.chance_lang_top1:.3f} | {min(1.0, 5 * first.chance_lang_top1):.3f} | |"
    )


if __name__ == "__main__":
    main()
