"""Held-out evaluation of a backbone: tri-modal retrieval and simplex area."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dynaflip_adapt.losses import triangle_area
from dynaflip_adapt.models.backbone import Backbone
from dynaflip_adapt.models.flow_encoder import flow_features
from dynaflip_adapt.train.triplets import TripletDataset


@dataclass
class RetrievalReport:
    """Retrieval from the image transition, on held-out triplets."""

    name: str
    triplets: int
    instructions: int
    img_to_flow_top1: float
    img_to_flow_top5: float
    img_to_lang_top1: float
    img_to_lang_top5: float
    mean_area: float
    chance_flow_top1: float
    chance_lang_top1: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def embed_triplets(
    model: Backbone, ds: TripletDataset, text_table: torch.Tensor, n: int, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings a, b, c (N, D) and instruction ids (N,) of `n` triplets spread over `ds`."""
    model.eval()
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    A, B, C, T = [], [], [], []
    for s in range(0, len(idx), batch):
        items = [ds[int(i)] for i in idx[s : s + batch]]
        rgb0 = torch.stack([it["rgb0"] for it in items])
        rgb1 = torch.stack([it["rgb1"] for it in items])
        text = torch.tensor([it["text"] for it in items])
        mask = torch.stack([it["flow_mask"] for it in items])
        feats = flow_features(
            torch.stack([it["flow_points"] for it in items]),
            torch.stack([it["flow_delta"] for it in items]),
            mask,
        )
        f = model.features(torch.cat([rgb0, rgb1]))
        f0, f1 = f.chunk(2)
        A.append(model.embed_transition(f0, f1))
        B.append(model.embed_text(text_table[text]))
        C.append(model.embed_flow(feats, mask))
        T.append(text)
    return torch.cat(A), torch.cat(B), torch.cat(C), torch.cat(T)


def topk_accuracy(sim: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of rows of `sim` (queries x gallery) whose `target` column is in their top k."""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return float((top == target[:, None]).any(dim=1).float().mean())


def retrieval(
    name: str, model: Backbone, ds: TripletDataset, text_table: torch.Tensor, n: int = 300
) -> RetrievalReport:
    """Image transition -> its flow among all test flows, and -> its instruction among the
    distinct instructions (cosine similarity in the shared space); mean simplex area."""
    a, b, c, t = embed_triplets(model, ds, text_table, n)
    N = a.shape[0]
    flow_top1 = topk_accuracy(a @ c.T, torch.arange(N), 1)
    flow_top5 = topk_accuracy(a @ c.T, torch.arange(N), 5)
    instr = torch.unique(t)
    lang = model.embed_text(text_table[instr])
    target = torch.searchsorted(instr, t)
    return RetrievalReport(
        name=name,
        triplets=N,
        instructions=len(instr),
        img_to_flow_top1=flow_top1,
        img_to_flow_top5=flow_top5,
        img_to_lang_top1=topk_accuracy(a @ lang.T, target, 1),
        img_to_lang_top5=topk_accuracy(a @ lang.T, target, 5),
        mean_area=float(triangle_area(a, b, c).mean()),
        chance_flow_top1=1.0 / N,
        chance_lang_top1=1.0 / len(instr),
    )
