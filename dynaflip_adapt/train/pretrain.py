"""Pretraining the base backbone on (transition, language, 3D flow) triplets.

Deterministic under a seed; ``resume`` continues from the last checkpoint exactly where an
uninterrupted run would be (same batches, same optimizer state).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from dynaflip_adapt.config import PretrainLoss, PretrainRecipe, recipe_hash, recipe_to_dict
from dynaflip_adapt.data.dataset import FramePairDataset
from dynaflip_adapt.data.logs import LogSet
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.losses import (
    area_infonce,
    cosine_infonce,
    cosine_regularizer,
    masked_mse,
    triangle_area,
    variance_floor,
    vocabulary_infonce,
)
from dynaflip_adapt.models.backbone import Backbone, BackboneConfig, save_bundle
from dynaflip_adapt.models.flow_encoder import DELTA_SCALE, flow_features
from dynaflip_adapt.models.text import embed_instructions
from dynaflip_adapt.models.vit import load_timm_checkpoint
from dynaflip_adapt.train.augment import appearance_views, augment_pair, build_augment
from dynaflip_adapt.train.common import (
    ResumableSampler,
    autocast,
    checkpoint_due,
    load_checkpoint,
    optimizer,
    resolve_device,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    to_device,
    update,
)
from dynaflip_adapt.train.distributed import ShardedBatches, check_batch, init_from_env
from dynaflip_adapt.train.triplets import TripletDataset

Objective = Literal["trimodal", "image_only"]
StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class PretrainResult:
    """Where the bundle is and how training went."""

    bundle: Path | None  # None on the ranks other than 0 under torchrun
    steps: int
    final: dict[str, float]
    seconds: float
    triplets_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


STYLE_FRAMES = 256  # frames whose appearance the token-invariance copies borrow
POSITION_SCALE = 0.1  # metres: point positions (relative to their centroid) in these units


def backbone_config(recipe: PretrainRecipe) -> BackboneConfig:
    m = recipe.model
    return BackboneConfig(
        point_heads=recipe.loss.point_position > 0 or recipe.loss.point_motion > 0,
        image_size=m.image_size,
        patch_size=m.patch_size,
        width=m.width,
        depth=m.depth,
        heads=m.heads,
        mlp_ratio=m.mlp_ratio,
        embed_dim=m.embed_dim,
        text_encoder=m.text_encoder,
        flow_points=m.flow_points,
        flow_width=m.flow_width,
    )


def _arch(cfg: BackboneConfig) -> str:
    return (
        f"ViT {cfg.image_size} px / patch {cfg.patch_size}, width {cfg.width}, "
        f"depth {cfg.depth}, {cfg.heads} heads"
    )


def build_triplets(
    logs: LogSet, recipe: PretrainRecipe, *, require_flow: bool = True
) -> tuple[TripletDataset, torch.Tensor, list[str]]:
    """The triplet dataset and the instruction embedding table (one row per instruction)."""
    d = recipe.data
    require = ["language", "flow"] if require_flow else ["language"]
    pairs = FramePairDataset(
        logs, gap=d.gap, require=require, flow_source=d.flow_source, fields=["flow"]
    )
    instructions = sorted({e.language or "" for e in pairs.episodes})
    table = embed_instructions(recipe.model.text_encoder, instructions)
    text = torch.from_numpy(np.stack([table[s] for s in instructions]))
    ds = TripletDataset(
        pairs, recipe.model.image_size, recipe.model.flow_points, instructions, recipe.run.seed
    )
    return ds, text, instructions


def trimodal_losses(
    model: Backbone,
    batch: dict[str, Any],
    text_table: torch.Tensor,
    weights: PretrainLoss,
    *,
    image_grad: bool = True,
    step: int | None = None,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The pretraining objective on one batch; returns the total and its parts.

    The area and cosine weights ramp up over ``weights.anchor_ramp_steps`` (see PretrainLoss).
    Under torchrun `gather` concatenates every rank's rows (`Dist.gather`, with gradients), so
    the terms with in-batch negatives or batch statistics see the global batch.
    """
    rgb = torch.cat([batch["rgb0"], batch["rgb1"]])
    points = (weights.point_position > 0 or weights.point_motion > 0) and model.cfg.point_heads
    invariance = weights.token_invariance > 0 and "rgb0_view" in batch and image_grad
    with torch.set_grad_enabled(image_grad and torch.is_grad_enabled()):
        x = model.preprocess(rgb)
        tokens = model.image.tokens(x) if points or invariance else None
        f = tokens[:, 0] if tokens is not None else model.image(x)
    f0, f1 = f.chunk(2)
    a = model.embed_transition(f0, f1)
    b = model.embed_text(text_table[batch["text"]])
    mask = batch["flow_mask"]
    feats = flow_features(batch["flow_points"], batch["flow_delta"], mask)
    c = model.embed_flow(feats, mask)
    parts: dict[str, torch.Tensor] = {}
    parts["area"] = triangle_area(a, b, c).mean()
    parts["cosine"] = cosine_regularizer(b, c, weights.cosine_margin)
    ga, gb, gc = gather(a), gather(b), gather(c)
    parts["contrastive"] = area_infonce(ga, gb, gc, model.logit_scale, weights.label_smoothing)
    if weights.pairwise > 0:
        vocab, ls = model.embed_text(text_table), weights.label_smoothing
        parts["pairwise"] = 0.5 * (
            cosine_infonce(ga, gc, model.logit_scale, ls)
            + vocabulary_infonce(a, vocab, batch["text"], model.logit_scale, ls)
        )
    if weights.temporal > 0:
        if weights.temporal_space == "features":
            parts["temporal"] = cosine_infonce(gather(f0), gather(f1), model.temporal_scale)
        else:
            parts["temporal"] = cosine_infonce(
                gather(model.embed_frame(f0)), gather(model.embed_frame(f1)), model.temporal_scale
            )
    if weights.flow_prediction > 0:
        pred = model.predict_flow(f0, feats[..., :3])
        parts["flow_prediction"] = masked_mse(pred, batch["flow_delta"] * DELTA_SCALE, mask)
    if tokens is not None and points:
        parts |= point_losses(model, tokens, batch, weights)
    if invariance:
        assert tokens is not None
        view = model.image.tokens(model.preprocess(batch["rgb0_view"]))
        parts["token_invariance"] = token_invariance(view, tokens[: len(batch["rgb0"])])
    if weights.variance > 0:
        parts["variance"] = variance_floor(gather(f.float()), weights.variance_target)
    ramp = 1.0
    if step is not None and weights.anchor_ramp_steps > 0:
        ramp = min(1.0, step / weights.anchor_ramp_steps)
    scale = {"area": ramp, "cosine": ramp}
    total = sum(getattr(weights, k) * scale.get(k, 1.0) * v for k, v in parts.items())
    assert isinstance(total, torch.Tensor)
    return total, {k: float(v.detach()) for k, v in parts.items()}


def token_invariance(view: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of a relit copy's tokens (B, 1 + N, D) from the frame's own
    (stop-gradient target), relative to the own tokens' per-channel variance over the batch
    and positions: 0 for an invariant encoder, ~2 for tokens unrelated to their frame's."""
    target = own.detach().float()
    spread = target.var(dim=(0, 1)).mean().clamp_min(1e-6)
    return ((view.float() - target) ** 2).mean() / spread


def point_losses(
    model: Backbone, tokens: torch.Tensor, batch: dict[str, Any], weights: PretrainLoss
) -> dict[str, torch.Tensor]:
    """Per-point terms on the patch tokens of both frames (B2 = 2B, 1 + N, D): each tracked
    point's 3D position relative to its frame's valid points' centroid, from the token at its
    pixel at frame t, and its motion to t + k, from the tokens there at both ends. Items whose
    flow has no pixel coordinates are left out."""
    t0, t1 = tokens.chunk(2)
    mask = batch["flow_mask"] & batch["flow_has_pixels"][:, None]
    uv = batch["flow_pixels"]
    p0 = model.point_tokens(t0, uv)
    out: dict[str, torch.Tensor] = {}
    if weights.point_position > 0:
        m = mask.float().unsqueeze(-1)
        centre = (batch["flow_points"] * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(
            min=1.0
        )
        target = (batch["flow_points"] - centre) / POSITION_SCALE
        out["point_position"] = masked_mse(model.point_position(p0), target, mask)
    if weights.point_motion > 0:
        p1 = model.point_tokens(t1, uv)
        pred = model.point_motion(torch.cat([p0, p1 - p0], dim=-1))
        out["point_motion"] = masked_mse(pred, batch["flow_delta"] * DELTA_SCALE, mask)
    return out


def image_only_losses(
    model: Backbone,
    batch: dict[str, Any],
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Baseline objective: time-contrastive on frames only (no language, no flow)."""
    f = model.features(torch.cat([batch["rgb0"], batch["rgb1"]]))
    f0, f1 = f.chunk(2)
    e0, e1 = gather(model.embed_frame(f0)), gather(model.embed_frame(f1))
    loss = cosine_infonce(e0, e1, model.temporal_scale)
    return loss, {"temporal": float(loss.detach())}


class _Objective(nn.Module):
    """One step's loss as a module, so that DistributedDataParallel sees one forward per step
    (the objective reads many heads, not only ``Backbone.forward``)."""

    def __init__(
        self, model: Backbone, text: torch.Tensor, recipe: PretrainRecipe, objective: Objective,
        freeze_image: bool, gather: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:  # fmt: skip
        super().__init__()
        self.model = model
        self.text, self.recipe, self.objective = text, recipe, objective
        self.freeze_image, self.gather = freeze_image, gather

    def forward(self, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        if self.objective == "image_only":
            return image_only_losses(self.model, batch, self.gather)
        return trimodal_losses(self.model, batch, self.text, self.recipe.loss,
                               image_grad=not self.freeze_image, step=step,
                               gather=self.gather)  # fmt: skip


def build_replay(
    ds: TripletDataset, text: torch.Tensor, n: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`n` triplets spread evenly over the training set, at input size (the replay / probe set)."""
    if n <= 0:
        return {}, []
    idx = np.unique(np.linspace(0, len(ds) - 1, min(n, len(ds))).round().astype(int))
    items = [ds[int(i)] for i in idx]
    names = {v: k for k, v in ds.index.items()}
    rows = [int(it["text"]) for it in items]
    replay = {
        "rgb0": torch.stack([it["rgb0"] for it in items]),
        "rgb1": torch.stack([it["rgb1"] for it in items]),
        "text": text[torch.tensor(rows)],
        "flow_points": torch.stack([it["flow_points"] for it in items]),
        "flow_delta": torch.stack([it["flow_delta"] for it in items]),
        "flow_mask": torch.stack([it["flow_mask"] for it in items]),
    }
    return replay, [names[r] for r in rows]


def pretrain(
    logs: LogSet,
    recipe: PretrainRecipe,
    workdir: str | Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    init_image: str | Path | Backbone | None = None,
    freeze_image: bool = False,
    init_heads: bool = False,
    objective: Objective = "trimodal",
    provenance: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
) -> PretrainResult:
    """Trains a backbone and writes its bundle to ``workdir/backbone``.

    Args:
        logs: Site logs with language and (for ``trimodal``) 3D flow.
        recipe: A validated pretrain recipe.
        workdir: Checkpoints and the bundle go here.
        resume: Continue from ``workdir``'s checkpoint (error when there is none).
        max_steps: Overrides ``optim.max_steps``.
        init_image: Image encoder to start from: a timm-named safetensors file or a backbone.
        freeze_image: Train only the heads (the probe protocol of `backbone eval`).
        init_heads: With a backbone as `init_image`, also start from its heads (continued
            pretraining); otherwise the heads start fresh.
        objective: ``trimodal`` (DynaFLIP) or ``image_only`` (time-contrastive baseline).
        provenance: Extra facts recorded in the manifest (data fingerprint...).
        on_step: Called after every step with the step number and its metrics.

    Raises:
        InputError: Logs without the supervision the objective needs; ``resume`` without a
            checkpoint.
        RuntimeFailure: The loss became NaN/inf.
    """
    workdir = Path(workdir)
    total = max_steps or recipe.optim.max_steps
    dist = init_from_env()
    check_batch(dist, recipe.optim.batch_size, 0)
    seed_everything(recipe.run.seed)
    device = resolve_device(recipe.run.device)
    ds, text, instructions = build_triplets(logs, recipe, require_flow=objective == "trimodal")
    cfg = backbone_config(recipe)
    if isinstance(init_image, Backbone):
        # The encoder's preprocessing travels with its weights (an imported ViT's own mean/std).
        src = init_image.cfg
        cfg = replace(cfg, mean=src.mean, std=src.std, channel_order=src.channel_order)
    model = Backbone(cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / recipe.loss.temperature_init))
    if isinstance(init_image, Backbone):
        try:
            model.image.load_state_dict(init_image.image.state_dict())
        except RuntimeError:
            raise InputError(
                None,
                "model",
                _arch(init_image.cfg),
                f"the recipe's {_arch(cfg)} (start from a backbone of the recipe's shape)",
            ) from None
        if init_heads:
            own = model.state_dict()
            model.load_state_dict(
                {
                    k: v
                    for k, v in init_image.head_state().items()
                    if k in own and own[k].shape == v.shape
                },
                strict=False,
            )
    elif init_image is not None:
        load_timm_checkpoint(model.image, init_image)
    if freeze_image:
        model.image.requires_grad_(False)
    model.to(device)
    text = text.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    opt, sched = optimizer(params, o, total)
    start = 0
    ckpt: dict[str, Any] = {}
    if resume:
        found = load_checkpoint(workdir)
        if found is None:
            raise InputError(workdir, None, "no checkpoint to resume from", "a run's work folder")
        ckpt = found
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["step"])
    k = recipe.data.batch_groups
    sampler = ResumableSampler(
        len(ds),
        recipe.run.seed,
        start * o.batch_size,
        groups=ds.pairs.file_groups() if k else None,
        chunk=-(-o.batch_size // k) if k else 0,
    )
    # Global batches of `optim.batch_size`; each rank loads its own equal slice.
    loader = DataLoader(
        ds,
        batch_sampler=ShardedBatches(sampler, o.batch_size, dist),
        num_workers=recipe.data.num_workers,
        persistent_workers=recipe.data.num_workers > 0,
    )
    step_loss = dist.wrap(
        _Objective(model, text, recipe, objective, freeze_image, dist.gather),
        device,
        find_unused=True,  # heads a recipe leaves at weight 0 get no gradient
    )
    it = iter(loader)
    aug = build_augment(recipe.augment, recipe.model.image_size)
    styles = None
    if recipe.loss.token_invariance > 0 and not freeze_image:
        # Other sites' looks for the relit copies: frames spread over every pretraining log.
        picks = torch.linspace(0, len(ds) - 1, min(len(ds), STYLE_FRAMES)).round().long()
        styles = torch.stack([ds[int(i)]["rgb0"] for i in picks])
    if resume:
        # After creating the iterator: DataLoader draws a base seed from the global RNG then.
        set_rng_state(ckpt["rng"])
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seen = 0
    model.train()
    for step in range(start, total):
        batch = to_device(next(it), device)
        if aug is not None:
            batch["rgb0"], batch["rgb1"] = augment_pair(aug, batch["rgb0"], batch["rgb1"])
        if styles is not None:
            # Relit copies of the frames as trained on (deterministic in seed and step, the
            # global RNG untouched: resumes stay bit-identical).
            seed = recipe.run.seed * 1_000_003 + step
            batch["rgb0_view"] = appearance_views(batch["rgb0"].cpu(), styles, seed=seed)
            batch["rgb0_view"] = batch["rgb0_view"].to(device)
        with autocast(device, recipe.run.precision):
            loss, parts = step_loss(batch, step)
        update(loss, step, opt, sched, params, o.grad_clip)
        seen += o.batch_size
        metrics: dict[str, float] = {"loss": float(loss.detach()), **parts}
        metrics["lr"] = float(sched.get_last_lr()[0])
        metrics["triplets_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
        if checkpoint_due(step, recipe.run.checkpoint_every, total, dist.is_main):
            save_checkpoint(
                workdir,
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "step": step + 1,
                },
            )
    seconds = time.perf_counter() - t0
    final = history[-1] if history else {}
    if not dist.is_main:  # rank 0 writes the bundle
        dist.barrier()
        return PretrainResult(
            bundle=None, steps=total, final=final, seconds=seconds, triplets_per_second=0.0,
            history=history,
        )  # fmt: skip
    model.eval().cpu()
    replay, replay_text = build_replay(ds, text.cpu(), recipe.replay.frames)
    prov = {
        "recipe": recipe_to_dict(recipe),
        "recipe_hash": recipe_hash(recipe),
        "objective": objective,
        "steps": total,
        "seed": recipe.run.seed,
        "instructions": instructions,
        "torch": torch.__version__,
        **(provenance or {}),
    }
    bundle = save_bundle(
        model, workdir / "backbone", replay=replay, replay_instructions=replay_text, provenance=prov
    )
    dist.barrier()
    return PretrainResult(
        bundle=bundle, steps=total, final=final, seconds=seconds,
        triplets_per_second=seen / max(seconds, 1e-9), history=history,
    )  # fmt: skip
