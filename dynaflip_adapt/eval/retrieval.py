"""Held-out evaluation of a backbone: tri-modal retrieval and simplex area, with intervals.

Held-out triplets from one episode share its instruction, scene and motion, so they are not
independent draws: a few hundred triplets are a few dozen episodes. Intervals therefore come
from a bootstrap over episodes (whole episodes resampled), and a comparison between two encoders
from the same resampling of their paired per-triplet hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    episodes: int = 0
    # Per-triplet 0/1 hits for each metric in METRICS, and each triplet's episode (the bootstrap
    # cluster); kept for intervals and paired comparisons, not serialised.
    hits: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    clusters: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def interval(self, metric: str, level: float = 0.95) -> tuple[float, float]:
        """Episode-bootstrap interval of `metric` (one of METRICS)."""
        _, lo, hi = cluster_bootstrap(self.hits[metric], self.clusters, level=level)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "name",
                "triplets",
                "instructions",
                "episodes",
                *METRICS,
                "mean_area",
                "chance_flow_top1",
                "chance_lang_top1",
            )
        }
        if self.hits:
            out["ci95"] = {m: list(self.interval(m)) for m in METRICS}
        return out


METRICS = ("img_to_flow_top1", "img_to_flow_top5", "img_to_lang_top1", "img_to_lang_top5")


def cluster_bootstrap(
    values: np.ndarray | torch.Tensor,
    clusters: np.ndarray,
    *,
    reps: int = 4000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of `values` and its percentile-bootstrap interval, resampling whole clusters.

    Each resample draws as many clusters as there are, with replacement; its mean is the summed
    values of the drawn clusters over their summed sizes. With one value per cluster this is the
    ordinary bootstrap of a mean. One cluster gives a zero-width interval.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    ids = np.unique(np.asarray(clusters).reshape(-1), return_inverse=True)[1]
    if v.shape != ids.shape or v.size == 0:
        raise ValueError(f"values ({v.size}) and clusters ({ids.size}) must be equal, non-empty")
    n_c = int(ids.max()) + 1
    sums = np.bincount(ids, weights=v, minlength=n_c)
    sizes = np.bincount(ids, minlength=n_c).astype(np.float64)
    draws = np.random.default_rng(seed).multinomial(n_c, np.full(n_c, 1.0 / n_c), size=reps)
    boot = (draws @ sums) / (draws @ sizes)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(v.mean()), float(lo), float(hi)


def paired_difference(
    a: RetrievalReport, b: RetrievalReport, metric: str, level: float = 0.95
) -> tuple[float, float, float]:
    """`a` minus `b` on `metric` over the same triplets: difference and its episode-bootstrap
    interval (both encoders' hits resampled together, so what they share cancels)."""
    if a.clusters.shape != b.clusters.shape or not np.array_equal(a.clusters, b.clusters):
        raise ValueError(f"{a.name!r} and {b.name!r} were not scored on the same triplets")
    diff = a.hits[metric].astype(np.float64) - b.hits[metric].astype(np.float64)
    return cluster_bootstrap(diff, a.clusters, level=level)


def margins(
    ours: list[RetrievalReport], baselines: list[RetrievalReport], level: float = 0.95
) -> list[dict[str, Any]]:
    """Each of `ours` minus each of `baselines`: ``{"backbone", "baseline", metric: [difference,
    lo, hi]}`` rows, with paired episode-bootstrap intervals."""
    rows: list[dict[str, Any]] = []
    for a in ours:
        for b in baselines:
            row: dict[str, Any] = {"backbone": a.name, "baseline": b.name}
            for m in METRICS:
                row[m] = list(paired_difference(a, b, m, level))
            rows.append(row)
    return rows


def margin_cell(row: dict[str, Any], metric: str) -> tuple[str, bool]:
    """A `margins` row's `metric` as ``+d [+lo, +hi]``, and whether its interval excludes zero."""
    d, lo, hi = row[metric]
    return f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]", bool(lo > 0 or hi < 0)


@torch.no_grad()
def embed_triplets(
    model: Backbone, ds: TripletDataset, text_table: torch.Tensor, n: int, batch: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings a, b, c (N, D), instruction ids (N,) and episode ids (N,) of `n` triplets
    spread evenly over `ds` (the same triplets for every model)."""
    model.eval()
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    A, B, C, T, E = [], [], [], [], []
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
        E.append(torch.tensor([int(it["episode"]) for it in items]))
    return torch.cat(A), torch.cat(B), torch.cat(C), torch.cat(T), torch.cat(E)


def topk_hits(sim: torch.Tensor, target: torch.Tensor, k: int) -> np.ndarray:
    """Per row of `sim` (queries x gallery): is its `target` column among its top k?"""
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices
    return (top == target[:, None]).any(dim=1).numpy()


def topk_accuracy(sim: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of rows of `sim` (queries x gallery) whose `target` column is in their top k."""
    return float(topk_hits(sim, target, k).mean())


def retrieval(
    name: str, model: Backbone, ds: TripletDataset, text_table: torch.Tensor, n: int = 300
) -> RetrievalReport:
    """Image transition -> its flow among all test flows, and -> its instruction among the
    distinct instructions (cosine similarity in the shared space); mean simplex area."""
    a, b, c, t, e = embed_triplets(model, ds, text_table, n)
    N = a.shape[0]
    instr = torch.unique(t)
    with torch.no_grad():
        lang = model.embed_text(text_table[instr])
    target = torch.searchsorted(instr, t)
    to_flow, to_lang, own = a @ c.T, a @ lang.T, torch.arange(N)
    hits = {
        "img_to_flow_top1": topk_hits(to_flow, own, 1),
        "img_to_flow_top5": topk_hits(to_flow, own, 5),
        "img_to_lang_top1": topk_hits(to_lang, target, 1),
        "img_to_lang_top5": topk_hits(to_lang, target, 5),
    }
    return RetrievalReport(
        name=name,
        triplets=N,
        instructions=len(instr),
        img_to_flow_top1=float(hits["img_to_flow_top1"].mean()),
        img_to_flow_top5=float(hits["img_to_flow_top5"].mean()),
        img_to_lang_top1=float(hits["img_to_lang_top1"].mean()),
        img_to_lang_top5=float(hits["img_to_lang_top5"].mean()),
        mean_area=float(triangle_area(a, b, c).mean()),
        chance_flow_top1=1.0 / N,
        chance_lang_top1=1.0 / len(instr),
        episodes=len(torch.unique(e)),
        hits=hits,
        clusters=e.numpy(),
    )
