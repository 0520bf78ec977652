"""Backbone evaluation on held-out logs, and the probe protocol that compares encoders fairly.

Probe: freeze an image encoder, train fresh heads (transition, language projection, flow encoder)
with the tri-modal objective on training logs, then measure retrieval on held-out logs. Only
the image encoder differs between candidates, so the comparison isolates what it learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dynaflip_adapt.config import PretrainRecipe
from dynaflip_adapt.data.dataset import FramePairDataset
from dynaflip_adapt.data.logs import open_logs
from dynaflip_adapt.eval.retrieval import RetrievalReport, retrieval
from dynaflip_adapt.models.backbone import Backbone, Bundle
from dynaflip_adapt.models.text import embed_instructions
from dynaflip_adapt.train.triplets import TripletDataset


def test_triplets(
    model: Backbone, logs: Sequence[str | Path], gap: int, seed: int = 1234
) -> tuple[TripletDataset, torch.Tensor]:
    """Held-out triplets sized for `model`, and their instruction table."""
    pairs = FramePairDataset(
        open_logs(logs), gap=gap, require=["language", "flow"], fields=["flow"]
    )
    instructions = sorted({e.language or "" for e in pairs.episodes})
    table = embed_instructions(model.cfg.text_encoder, instructions)
    text = torch.from_numpy(np.stack([table[s] for s in instructions]))
    return TripletDataset(
        pairs, model.cfg.image_size, model.cfg.flow_points, instructions, seed
    ), text


def heldout_gap(bundle: Bundle, gap: int | None = None) -> int:
    """The frame gap to evaluate `bundle` at: `gap`, else the one it was pretrained with."""
    if gap is not None:
        return gap
    return int(
        bundle.manifest.get("provenance", {}).get("recipe", {}).get("data", {}).get("gap", 4)
    )


def heldout_retrieval(
    named: Sequence[tuple[str, Bundle]],
    logs: Sequence[str | Path],
    *,
    samples: int = 300,
    gap: int | None = None,
) -> list[RetrievalReport]:
    """Retrieval of each (name, backbone) with its own heads, all on the same held-out triplets
    at the first one's gap. The triplets depend on a backbone only through its input size, flow
    points and text encoder, so they are built (logs opened, instructions embedded) once per
    such format, not once per backbone."""
    step = heldout_gap(named[0][1], gap)
    built: dict[tuple[str, int, int], tuple[TripletDataset, torch.Tensor]] = {}
    reports = []
    for name, bundle in named:
        cfg = bundle.model.cfg
        key = (cfg.text_encoder, cfg.image_size, cfg.flow_points)
        if key not in built:
            built[key] = test_triplets(bundle.model, logs, step)
        ds, text = built[key]
        reports.append(retrieval(name, bundle.model, ds, text, samples))
    return reports


def probe(
    image: Backbone,
    train_logs: Sequence[str | Path],
    recipe: PretrainRecipe,
    workdir: Path,
    steps: int,
) -> Backbone:
    """Fresh heads trained on a frozen copy of `image`'s encoder (see module doc)."""
    from dynaflip_adapt.train.pretrain import pretrain

    res = pretrain(
        open_logs(train_logs), recipe, workdir, max_steps=steps, init_image=image, freeze_image=True
    )
    from dynaflip_adapt.models.backbone import load_bundle

    assert res.bundle is not None  # one process
    return load_bundle(res.bundle).model
