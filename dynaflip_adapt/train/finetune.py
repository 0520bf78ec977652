"""Site adaptation: a LoRA adapter on the image encoder, anchored to the pretrained geometry.

Per step, on a batch of the site's triplets (augmented with kornia, the same draw for both
frames of a transition) and a batch of the backbone's source-replay frames:

- anchors (frozen language and flow encoders): simplex area, area-InfoNCE, image-anchor cosine,
  and a single-frame anchor (the frozen one-step flow head must predict the site's flow from
  f(I_t) alone, since policies read single frames);
- teacher distillation (adapter disabled = base encoder) on the source replay (retention), and
  optionally on the site's frames;
- invariance: the teacher's features of clean source-replay frames distilled into the student's
  view of the same frames augmented (photometric by default), so a relit or recoloured frame
  maps onto the base-site features that pinned policies read.

Only the LoRA parameters train; the saved adapter is their EMA (torch-ema). ``full=True`` trains
every encoder weight instead (an ablation: no adapter is written, the encoder is returned).
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dynaflip_adapt.config import FinetuneRecipe, recipe_hash, recipe_to_dict
from dynaflip_adapt.data.dataset import FramePairDataset
from dynaflip_adapt.data.logs import LogSet
from dynaflip_adapt.errors import InputError, RuntimeFailure
from dynaflip_adapt.losses import (
    area_infonce,
    bct_influence,
    masked_mse,
    relative_mse,
    triangle_area,
)
from dynaflip_adapt.metrics import linear_cka, mean_cosine
from dynaflip_adapt.models.adapter import PROBE_FILE, lora_state, wrap_lora, write_manifest
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.models.flow_encoder import DELTA_SCALE, flow_features
from dynaflip_adapt.models.text import embed_instructions
from dynaflip_adapt.outputs import writing
from dynaflip_adapt.train.augment import aug_frames, augment_pair, build_augment, site_style
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
from dynaflip_adapt.train.distributed import Dist, ShardedBatches, check_batch, init_from_env
from dynaflip_adapt.train.triplets import TripletDataset

StepCallback = Callable[[int, dict[str, float]], None]
PROBE_FRAMES = 64
# Softmax temperature of the bct term's cosine similarities.
BCT_TEMPERATURE = 0.05


class ExtraTerm(Protocol):
    """An objective on frames of its own that the step encodes with the student in its one
    forward pass (``loss.policies``: `dynaflip_adapt.policies.adaptation.PolicyObjective`)."""

    @property
    def frames_per_step(self) -> int: ...

    def draw(self, dist: Dist, device: torch.device) -> torch.Tensor:
        """This step's uint8 frames for this process."""
        ...

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """The term on the student's output for the drawn frames (all tokens, CLS first)."""
        ...


@dataclass
class FinetuneResult:
    """What a finetune produced."""

    adapter: Path | None
    steps: int
    final: dict[str, float]
    seconds: float
    frames_per_second: float
    anchors: dict[str, bool]
    warnings: list[str] = field(default_factory=list)
    geometry: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    encoder: Any = None  # the adapted image encoder (merged, EMA weights, eval mode, CPU)
    probe: dict[str, torch.Tensor] = field(default_factory=dict)  # what audits probe with


# What a replay triplet holds (a backbone's replay set; older bundles may carry frames only).
REPLAY_TRIPLET = ("rgb0", "rgb1", "text", "flow_points", "flow_delta", "flow_mask")


def site_triplets(
    bundle: Bundle, logs: LogSet, recipe: FinetuneRecipe
) -> tuple[TripletDataset, torch.Tensor, dict[str, bool], list[str]]:
    """The site's triplets, which anchors they support, and warnings for the missing ones.

    Raises:
        InputError: A supervision listed in ``recipe.require`` is missing.
    """
    d = recipe.data
    pairs = FramePairDataset(
        logs, gap=d.gap, require=list(recipe.require), flow_source=d.flow_source, fields=["flow"]
    )
    anchors = {
        "language": all(e.has("language") for e in pairs.episodes),
        "flow": "flow" in pairs.fields,
        "depth": all(e.has("depth") for e in pairs.episodes),
    }
    warnings = []
    if not anchors["flow"]:
        why = (
            "no depth/K to extract it"
            if not anchors["depth"]
            else f"run `flow extract --stride {d.gap}`"
        )
        warnings.append(
            f"no 3D flow of stride {d.gap} in the logs ({why}): the area, contrastive and "
            "single-frame anchors are off; teacher distillation only"
        )
    if not anchors["language"]:
        warnings.append(
            "no language instruction in the logs: the tri-modal anchors are off (use --language)"
        )
    instructions = sorted({e.language or "" for e in pairs.episodes})
    cfg = bundle.model.cfg
    table = embed_instructions(cfg.text_encoder, instructions)
    text = torch.from_numpy(np.stack([table[s] for s in instructions]))
    ds = TripletDataset(pairs, cfg.image_size, cfg.flow_points, instructions, recipe.run.seed)
    return ds, text, anchors, warnings


def probe_replay_rows(n: int) -> torch.Tensor:
    """The rows of an n-frame replay set that an adapter's probe set (and so its audit) uses."""
    return torch.linspace(0, n - 1, min(PROBE_FRAMES, n)).round().long().unique()


def bct_rows(n: int) -> torch.Tensor:
    """The replay rows the bct term trains on: those the audit does not probe."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[probe_replay_rows(n)] = False
    return keep.nonzero().flatten()


def _probe_set(
    bundle: Bundle, ds: TripletDataset, text: torch.Tensor, trimodal: bool
) -> dict[str, torch.Tensor]:
    """Frames that travel with the adapter: source replay and site pairs (with their anchors)."""
    probe: dict[str, torch.Tensor] = {}
    rp = bundle.replay
    if rp:
        sel = probe_replay_rows(rp["rgb0"].shape[0])
        for k in REPLAY_TRIPLET:
            if k in rp:
                probe[f"replay_{k}"] = rp[k][sel].contiguous()
    idx = np.unique(np.linspace(0, len(ds) - 1, min(PROBE_FRAMES, len(ds))).round().astype(int))
    items = [ds[int(i)] for i in idx]
    probe["site_rgb0"] = torch.stack([it["rgb0"] for it in items])
    probe["site_rgb1"] = torch.stack([it["rgb1"] for it in items])
    if trimodal:
        probe["site_text"] = text[torch.tensor([it["text"] for it in items])]
        for k in ("flow_points", "flow_delta", "flow_mask"):
            probe[f"site_{k}"] = torch.stack([it[k] for it in items])
    return probe


@torch.no_grad()
def geometry_fingerprint(
    bundle: Bundle, student: Any, probe: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Statistics of the adapted features on the probe set, against the base encoder."""
    heads = bundle.model
    out: dict[str, float] = {}
    for part in ("replay", "site"):
        key = f"{part}_rgb0"
        if key not in probe:
            continue
        x = heads.preprocess(probe[key])
        new = student(x)
        with student.disable_adapter():
            old = student(x)
        out[f"{part}_cka"] = linear_cka(old, new)
        out[f"{part}_cosine"] = mean_cosine(old, new)
        out[f"{part}_relative_mse"] = float(relative_mse(new, old))
        out[f"{part}_feature_norm"] = float(new.norm(dim=-1).mean())
        if f"{part}_flow_mask" in probe:
            x1 = heads.preprocess(probe[f"{part}_rgb1"])
            a = heads.embed_transition(new, student(x1))
            b = heads.embed_text(probe[f"{part}_text"])
            m = probe[f"{part}_flow_mask"]
            c = heads.embed_flow(
                flow_features(probe[f"{part}_flow_points"], probe[f"{part}_flow_delta"], m), m
            )
            out[f"{part}_mean_area"] = float(triangle_area(a, b, c).mean())
    return out


def retention_frames(logs: LogSet, image_size: int, count: int) -> torch.Tensor:
    """`count` frames spread evenly over every episode of `logs` (uint8, N x 3 x S x S at the
    encoder's input size): frames whose encoding an adapter must keep, typically the logs the
    fleet's policies were trained on."""
    from dynaflip_adapt.data.frames import sample_frames

    return sample_frames(logs, image_size, count).frames


def trimodal_anchors(anchors: dict[str, bool], bundle: Bundle) -> bool:
    """The tri-modal anchors can train: the logs carry flow and language, and the backbone's
    heads were trained (an imported encoder's are only an initialisation)."""
    return anchors["flow"] and anchors["language"] and bundle.has_heads


def active_terms(
    recipe: FinetuneRecipe,
    anchors: dict[str, bool],
    bundle: Bundle,
    *,
    pooled: bool,
    retained: bool,
    extra: bool = False,
) -> tuple[dict[str, float], list[str]]:
    """The weight each loss term trains with for these logs (0: off), and warnings for terms the
    recipe asks for but the logs, the backbone or the options cannot support.

    Args:
        recipe: The finetune recipe.
        anchors: Which supervision the site's logs carry (`site_triplets`).
        bundle: The backbone (its replay set feeds the teacher and the replay-area anchor).
        pooled: The teacher has frames to hold (the backbone's replay and/or ``--retain``).
        retained: ``--retain`` frames were given.
        extra: An objective for ``loss.policies`` was given (pinned policies and
            demonstrations they can read).

    Raises:
        InputError: No term is active.
    """
    w = recipe.loss
    trained = bundle.has_heads
    trimodal = trimodal_anchors(anchors, bundle)
    active = {
        "area": w.area if trimodal else 0.0,
        "contrastive": w.contrastive if trimodal else 0.0,
        "cosine": w.cosine if trimodal else 0.0,
        "single_frame": w.single_frame if anchors["flow"] and trained else 0.0,
        "distill_replay": w.distill_replay if pooled else 0.0,
        "distill_site": w.distill_site,
        "invariance": w.invariance if pooled and recipe.augment.enabled else 0.0,
        "consistency": w.consistency,
        "policies": w.policies if extra else 0.0,
        "align": w.align if bundle.replay else 0.0,
        "replay_area": (
            w.replay_area if trained and set(REPLAY_TRIPLET) <= bundle.replay.keys() else 0.0
        ),
        "bct": (
            w.bct
            if {"rgb0", "rgb1"} <= bundle.replay.keys()
            and len(bct_rows(bundle.replay["rgb0"].shape[0]))
            else 0.0
        ),
    }
    warnings = []
    if not trained:
        warnings.append(
            "the backbone's DynaFLIP heads are untrained (an imported encoder): the area, "
            "contrastive, cosine and single-frame anchors are unavailable; teacher terms only "
            "(`pretrain LOGS --from BACKBONE` trains the heads)"
        )
    if w.policies > 0 and not extra:
        warnings.append(
            "loss.policies: no pinned policy reads the backbone, or the logs carry no "
            "demonstrations it can read: the term is off"
        )
    if w.distill_replay > 0 and not pooled:
        warnings.append("the backbone has no replay set: source-replay distillation is off")
    if w.invariance > 0 and not active["invariance"]:
        warnings.append("the invariance term needs a replay pool and augment.enabled: it is off")
    if active["invariance"] and not retained:
        warnings.append(
            "loss.invariance without --retain frames: on the OOD benchmark it then cost gain "
            "(docs/results/2026-11-ood-benchmark.md); pass --retain FLEET_LOGS or "
            "--set loss.invariance=0"
        )
    if w.site_style > 0 and not active["invariance"]:
        warnings.append("loss.site_style restyles the invariance term's views: it is off too")
    if w.bct > 0 and not active["bct"]:
        warnings.append(
            "loss.bct needs replay pairs beyond the audit's probe frames in the backbone: it is off"
        )
    if w.replay_area > 0 and not active["replay_area"]:
        warnings.append("the backbone's replay set has no triplets: the replay area anchor is off")
    if not any(v > 0 for v in active.values()) and not trained and not pooled:
        raise InputError(
            None,
            "--retain",
            "an imported backbone (untrained heads, no replay frames) and no --retain",
            "--retain LOGS: frames the teacher holds (e.g. the logs your policies were trained on)",
        )
    if not any(v > 0 for v in active.values()):
        raise InputError(
            None,
            "recipe.loss",
            "no active loss term for these logs",
            "anchors (flow + language) or distillation weights > 0",
        )
    return active, warnings


def build_student(
    image: torch.nn.Module, recipe: FinetuneRecipe, parent: Path | None, full: bool
) -> Any:
    """What trains: a fresh LoRA adapter on a copy of the image encoder, the `parent` adapter
    continued, or (``full``, an ablation) a copy of every encoder weight."""
    from peft import PeftModel

    if full:
        return copy.deepcopy(image).requires_grad_(True)
    if parent is not None:
        return PeftModel.from_pretrained(copy.deepcopy(image), str(parent), is_trainable=True)
    lo = recipe.lora
    return wrap_lora(image, lo.r, lo.alpha, lo.dropout, lo.target_modules, lo.use_dora)


def build_teacher(
    image: torch.nn.Module, recipe: FinetuneRecipe, parent: Path | None
) -> torch.nn.Module | None:
    """The teacher when it is not the bare backbone (``loss.teacher: parent`` with a parent):
    a frozen copy of the image encoder with the parent adapter merged. None: the backbone."""
    from peft import PeftModel

    if recipe.loss.teacher != "parent" or parent is None:
        return None
    merged = PeftModel.from_pretrained(copy.deepcopy(image), str(parent)).merge_and_unload()
    return merged.eval().requires_grad_(False)


class StepObjective:
    """The per-step finetune objective: a batch of the site's triplets (plus draws from the
    teacher's pool and the replay triplets) -> the weighted loss and each term's value.

    The teacher is the frozen base encoder (for LoRA: the student with its adapter disabled),
    or `teacher` when given (``loss.teacher: parent``: the parent adapter merged).
    With ``loss.distill_tokens`` the teacher terms compare every output token (B, 1 + N,
    width), CLS first; otherwise the CLS feature (B, width). The anchors read the CLS either
    way.

    Args:
        bundle: The backbone (frozen heads, replay set).
        student: The trainable encoder (`build_student`), on `device`.
        model: The student as called for the training forward (DDP-wrapped under torchrun).
        recipe: The finetune recipe.
        active: Each term's weight (`active_terms`).
        text: The site's instruction embeddings, indexed by the batch's ``text``.
        pool: Frames the teacher holds (uint8, N x 3 x S x S): source replay + ``--retain``.
        device: Where everything runs.
        dist: The process group (`init_from_env`).
        full: The student is a plain encoder (full fine-tuning), not a PEFT model.
        extra: The ``loss.policies`` objective (its frames join the step's forward pass).
    """

    def __init__(
        self,
        bundle: Bundle,
        student: Any,
        model: Any,
        recipe: FinetuneRecipe,
        active: dict[str, float],
        text: torch.Tensor,
        pool: torch.Tensor,
        device: torch.device,
        dist: Dist,
        full: bool = False,
        extra: ExtraTerm | None = None,
        teacher: torch.nn.Module | None = None,
    ) -> None:
        self.heads = bundle.model
        self.student, self.model, self.full = student, model, full
        self.teacher_model = teacher
        self.w, self.active, self.dist, self.device = recipe.loss, active, dist, device
        self.text, self.held = text, pool
        size = self.heads.cfg.image_size
        self.aug = build_augment(recipe.augment, size)
        # The invariance term's own draw: photometric unless told otherwise, since invariance
        # to crops also erases where things are in the frame, which policies read.
        self.inv_aug = (
            build_augment(recipe.augment, size, crop=recipe.augment.invariance_crop)
            if active["invariance"] > 0
            else None
        )
        self.replay = {k: v.to(device) for k, v in bundle.replay.items()}
        o = recipe.optim
        self.n_replay = (
            round(recipe.replay.fraction * o.batch_size)
            if active["distill_replay"] > 0 or active["invariance"] > 0
            else 0
        )
        check_batch(dist, o.batch_size, self.n_replay)
        # Which views of the drawn teacher-pool frames the student encodes each step.
        self.use_rep = self.n_replay > 0 and active["distill_replay"] > 0
        self.use_inv = self.n_replay > 0 and active["invariance"] > 0
        # Replay triplets for the area anchor: as many per step as replay frames for the teacher.
        self.n_area = (
            max(1, round(recipe.replay.fraction * o.batch_size)) if active["replay_area"] else 0
        )
        check_batch(dist, o.batch_size, self.n_area)
        # Replay frames whose features must retrieve the teacher's next frame (bct).
        self.n_bct = max(1, round(recipe.replay.fraction * o.batch_size)) if active["bct"] else 0
        check_batch(dist, o.batch_size, self.n_bct)
        # Frames encoded per step by this process.
        self.frames_per_step = (
            2 * o.batch_size
            + self.n_replay * (self.use_rep + self.use_inv)
            + 2 * self.n_area
            + self.n_bct
        ) // dist.world
        self.tokens = bool(self.w.distill_tokens)
        self.extra = extra if active.get("policies", 0.0) > 0 else None
        # The forward gives every token when the teacher holds them or the policies read them.
        self.all_tokens = self.tokens or self.extra is not None
        if self.extra is not None:
            self.frames_per_step += self.extra.frames_per_step // dist.world
        self.scale, self.center = self._replay_spread()
        self.base_area = self._base_areas()
        self.bct_rows, self.bct_gallery, self.bct_center = self._bct_gallery()

    def teacher(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen base encoder (for LoRA: the student with its adapter disabled), or the
        given teacher (the parent adapter merged)."""
        with torch.no_grad():
            if self.teacher_model is not None:
                t: torch.Tensor = self.teacher_model(x, all_tokens=self.all_tokens)
                return t
            if self.full:
                out: torch.Tensor = self.heads.image(x, all_tokens=self.all_tokens)
                return out
            with self.student.disable_adapter():
                out = self.student(x, all_tokens=self.all_tokens)
                return out

    def cls(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, 0] if self.all_tokens else f

    def _replay_spread(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension spread and mean of the teacher's features over the replay set:
        "standardized" distillation measures drift in these units, which is what a z-scoring
        policy head sees; `align` matches them."""
        width = self.heads.cfg.width
        scale = torch.ones(width, device=self.device)
        center = torch.zeros(width, device=self.device)
        if (self.w.distill_space == "standardized" or self.active["align"] > 0) and self.replay:
            ref = self._teacher_cls(self.replay["rgb0"])
            sd = ref.std(0)
            scale = torch.maximum(sd, 0.1 * sd.median()) + 1e-6
            center = ref.mean(0)
        return scale, center

    def _teacher_cls(self, rgb: torch.Tensor) -> torch.Tensor:
        """The teacher's pooled features of uint8 frames, 128 at a time."""
        return torch.cat([self.cls(self.teacher(self.heads.preprocess(c))) for c in rgb.split(128)])

    def _bct_gallery(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The bct term's replay rows, the teacher's features of each row's second frame (its
        gallery) centred on their mean, and that mean; computed once: the teacher is frozen.
        Centred because a backbone's features of different frames share a large common part
        (raw cosines near 1), which would flatten the softmax."""
        if not self.n_bct:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0), torch.zeros(0)
        rows = bct_rows(self.replay["rgb0"].shape[0]).to(self.device)
        gallery = self._teacher_cls(self.replay["rgb1"][rows])
        mu = gallery.mean(0)
        return rows, gallery - mu, mu

    def replay_areas(self, f0: torch.Tensor, f1: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Simplex areas of replay triplets `idx` whose frames have the features `f0`, `f1`."""
        heads, replay = self.heads, self.replay
        m = replay["flow_mask"][idx]
        return triangle_area(
            heads.embed_transition(f0, f1),
            heads.embed_text(replay["text"][idx]),
            heads.embed_flow(
                flow_features(replay["flow_points"][idx], replay["flow_delta"][idx], m), m
            ),
        )

    def _base_areas(self) -> torch.Tensor:
        """The base encoder's area on every replay triplet: the hinge's "not worse than
        before"."""
        if not (self.active["replay_area"] and self.w.replay_area_hinge):
            return torch.zeros(0, device=self.device)
        rgb0, rgb1 = self.replay["rgb0"], self.replay["rgb1"]
        pre = self.heads.preprocess
        chunks = torch.arange(len(rgb0), device=self.device).split(128)
        return torch.cat(
            [
                self.replay_areas(
                    self.cls(self.teacher(pre(rgb0[i]))), self.cls(self.teacher(pre(rgb1[i]))), i
                )
                for i in chunks
            ]
        ).detach()

    def distill(self, student_f: torch.Tensor, teacher_f: torch.Tensor) -> torch.Tensor:
        """Distance of the student's features from the teacher's (CLS, and with
        ``loss.distill_tokens`` every patch token relative to its own energy)."""
        s, t = self.cls(student_f), self.cls(teacher_f)
        if self.w.distill_space == "standardized":
            out = (((s - t) / self.scale) ** 2).mean()
        else:
            out = relative_mse(s, t)
        if self.tokens:
            out = out + relative_mse(student_f[:, 1:], teacher_f[:, 1:])
        return out

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        heads, w, active, dist, device = self.heads, self.w, self.active, self.dist, self.device
        r0, r1 = augment_pair(self.aug, batch["rgb0"], batch["rgb1"])
        images = [r0, r1]
        rep = self.held[:0]
        if self.n_replay > 0:
            # Drawn for the global batch (same on every rank), then this rank's share.
            sel = torch.randint(0, self.held.shape[0], (self.n_replay,), device=device)
            rep = self.held[dist.shard(sel)]
            if self.use_rep:
                images.append(rep)
            if self.use_inv:
                # The same frames as the student sees them at an augmented "site"; with
                # loss.site_style a share first takes this site's appearance from its frames.
                view = rep
                if w.site_style > 0:
                    restyle = torch.rand(len(rep), device=device) < w.site_style
                    view = rep.clone()
                    view[restyle] = site_style(rep[restyle], batch["rgb0"], w.site_style_band)
                images.append(aug_frames(self.inv_aug, view))
        tri = torch.zeros(0, dtype=torch.long, device=device)
        if self.n_area > 0:
            n = self.replay["rgb0"].shape[0]
            tri = dist.shard(torch.randint(0, n, (self.n_area,), device=device))
            images += [self.replay["rgb0"][tri], self.replay["rgb1"][tri]]
        bct_pos = torch.zeros(0, dtype=torch.long, device=device)
        if self.n_bct > 0:
            n_rows = len(self.bct_rows)
            bct_pos = dist.shard(torch.randint(0, n_rows, (self.n_bct,), device=device))
            images.append(self.replay["rgb0"][self.bct_rows[bct_pos]])
        if self.extra is not None:
            images.append(self.extra.draw(dist, device))
        # One forward through the (DDP-wrapped) student per step.
        sizes = [len(x) for x in images]
        f = self.model(heads.preprocess(torch.cat(images)), all_tokens=self.all_tokens)
        outs = list(f.split(sizes))
        f0_all, f1 = outs.pop(0), self.cls(outs.pop(0))
        f0 = self.cls(f0_all)
        f_rep = outs.pop(0) if self.use_rep else None
        f_inv = outs.pop(0) if self.use_inv else None
        fa0, fa1 = (self.cls(outs.pop(0)), self.cls(outs.pop(0))) if self.n_area else (None, None)
        f_bct = self.cls(outs.pop(0)) if self.n_bct else None
        parts: dict[str, torch.Tensor] = {}
        if f_bct is not None:
            parts["bct"] = bct_influence(
                f_bct - self.bct_center, self.bct_gallery, bct_pos, BCT_TEMPERATURE
            )
        if self.extra is not None:
            parts["policies"] = self.extra.loss(outs.pop(0))
        if any(active[k] > 0 for k in ("area", "contrastive", "cosine")):
            a = heads.embed_transition(f0, f1)
            b = heads.embed_text(self.text[batch["text"]])
            m = batch["flow_mask"]
            c = heads.embed_flow(flow_features(batch["flow_points"], batch["flow_delta"], m), m)
            parts["area"] = triangle_area(a, b, c).mean()
            # In-batch negatives over the global batch.
            parts["contrastive"] = area_infonce(
                dist.gather(a), dist.gather(b), dist.gather(c), heads.logit_scale, w.label_smoothing
            )
            # Language and flow encoders are frozen here, so the language-flow cosine is a
            # constant; the cosine anchor pulls the image toward the midpoint of its anchors.
            parts["cosine"] = (
                1 - F.cosine_similarity(a, F.normalize(b + c, dim=-1), dim=-1)
            ).mean()
        if active["single_frame"] > 0:
            feats = flow_features(batch["flow_points"], batch["flow_delta"], batch["flow_mask"])
            pred = heads.predict_flow(f0, feats[..., :3])
            parts["single_frame"] = masked_mse(
                pred, batch["flow_delta"] * DELTA_SCALE, batch["flow_mask"]
            )
        if f_rep is not None or f_inv is not None:
            t_rep = self.teacher(heads.preprocess(rep))
            if f_rep is not None:
                parts["distill_replay"] = self.distill(f_rep, t_rep)
            if f_inv is not None:
                parts["invariance"] = self.distill(f_inv, t_rep)
        if fa0 is not None and fa1 is not None:
            area = self.replay_areas(fa0, fa1, tri)
            if w.replay_area_hinge:
                area = (area - self.base_area[tri]).clamp_min(0)
            parts["replay_area"] = area.mean()
        if active["distill_site"] > 0:
            # The student sees the augmented frame, the teacher the clean one: without the
            # augmentation the two agree at the start and the term has no gradient.
            clean = self.teacher(heads.preprocess(batch["rgb0"]))
            parts["distill_site"] = self.distill(f0_all, clean)
        if active["align"] > 0:
            z = (f0 - self.center) / self.scale
            parts["align"] = z.mean(0).pow(2).mean() + z.std(0).clamp_min(1e-3).log().pow(2).mean()
        if active["consistency"] > 0:
            with torch.no_grad():
                target = self.student(heads.preprocess(batch["rgb0"]))
            parts["consistency"] = relative_mse(f0, target)
        total_loss = sum(active[k] * v for k, v in parts.items())
        assert isinstance(total_loss, torch.Tensor)
        return total_loss, {k: float(v.detach()) for k, v in parts.items()}


def finetune(
    bundle: Bundle,
    logs: LogSet,
    recipe: FinetuneRecipe,
    workdir: str | Path,
    *,
    site: str,
    parent: Path | None = None,
    resume: bool = False,
    max_steps: int | None = None,
    dry_run: bool = False,
    lineage: dict[str, Any] | None = None,
    on_step: StepCallback | None = None,
    full: bool = False,
    retain: torch.Tensor | None = None,
    extra: ExtraTerm | None = None,
) -> FinetuneResult:
    """Trains a LoRA adapter for a site; writes it to ``workdir/adapter``.

    The parts: `active_terms` (which losses train), `build_student` (what trains),
    `StepObjective` (one step's loss), the optimizer loop with checkpoints here, and
    `write_adapter` (the EMA adapter, its probe set, manifest and geometry).

    Args:
        bundle: The base backbone (frozen; its replay set drives retention).
        logs: The site's logs.
        recipe: A validated finetune recipe.
        workdir: Checkpoints and the adapter folder.
        site: Site name recorded in lineage.
        parent: An existing adapter folder to continue from (continual adaptation).
        resume: Continue from ``workdir``'s checkpoint.
        max_steps: Overrides ``optim.max_steps``.
        dry_run: Build and check everything, run one forward pass, train and write nothing.
        lineage: Extra lineage recorded in the manifest (versions, fingerprints).
        on_step: Called after every step.
        full: Train all image-encoder weights instead of a LoRA adapter (ablation only: writes
            no adapter folder; the result carries the encoder).
        retain: Frames (uint8, N x 3 x S x S at input size; `retention_frames`) added to the
            replay pool the teacher holds: sites whose policies must keep working.
        extra: The ``loss.policies`` objective (`PolicyObjective`): the pinned policies'
            heads on demonstrations; without it the term is off.

    Raises:
        InputError: Missing required supervision, nothing to train, no checkpoint to resume.
        RuntimeFailure: The loss became NaN/inf.
    """
    import peft
    from torch_ema import ExponentialMovingAverage

    workdir = Path(workdir)
    total = max_steps or recipe.optim.max_steps
    dist = init_from_env()
    seed_everything(recipe.run.seed)
    device = resolve_device(recipe.run.device)
    ds, text, anchors, warnings = site_triplets(bundle, logs, recipe)
    trimodal = trimodal_anchors(anchors, bundle)
    # The teacher's pool: the backbone's source replay plus the frames to retain.
    pool = [t for t in (bundle.replay.get("rgb0"), retain) if t is not None and len(t)]
    size = bundle.model.cfg.image_size
    if retain is not None and tuple(retain.shape[1:]) != (3, size, size):
        raise InputError(
            None, "retain", f"frames of shape {tuple(retain.shape[1:])}", f"(3, {size}, {size})"
        )
    active, more = active_terms(
        recipe, anchors, bundle, pooled=bool(pool), retained=retain is not None,
        extra=extra is not None,
    )  # fmt: skip
    warnings += more
    heads = bundle.model.to(device).eval().requires_grad_(False)
    student = build_student(heads.image, recipe, parent, full)
    student.to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    o = recipe.optim
    opt, sched = optimizer(params, o, total)
    ema = ExponentialMovingAverage(params, decay=recipe.ema.decay) if recipe.ema.enabled else None
    held = torch.cat(pool).to(device) if pool else torch.zeros(0, dtype=torch.uint8)
    objective = StepObjective(
        bundle,
        student,
        dist.wrap(student, device),
        recipe,
        active,
        text.to(device),
        held,
        device,
        dist,
        full,
        extra,
        None if full else build_teacher(heads.image, recipe, parent),
    )

    start = 0
    ckpt: dict[str, Any] = {}
    if resume:
        found = load_checkpoint(workdir)
        if found is None:
            raise InputError(
                workdir, None, "no checkpoint to resume from", "a finetune work folder"
            )
        ckpt = found
        student.load_state_dict(ckpt["student"], strict=False)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start = int(ckpt["step"])
    loader = DataLoader(
        ds,
        batch_sampler=ShardedBatches(
            ResumableSampler(len(ds), recipe.run.seed, start * o.batch_size), o.batch_size, dist
        ),
        num_workers=recipe.data.num_workers,
        persistent_workers=recipe.data.num_workers > 0,
    )
    it = iter(loader)
    if resume:
        # After creating the iterator: DataLoader draws a base seed from the global RNG then.
        set_rng_state(ckpt["rng"])

    if dry_run:
        with torch.no_grad(), autocast(device, recipe.run.precision):
            loss, parts = objective(to_device(next(it), device))
        if not torch.isfinite(loss):
            raise RuntimeFailure(f"dry run: the initial loss is {float(loss)}")
        return FinetuneResult(
            adapter=None,
            steps=0,
            final={"loss": float(loss), **parts},
            seconds=0.0,
            frames_per_second=0.0,
            anchors=anchors,
            warnings=warnings,
        )

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    seen = 0
    student.train()
    for step in range(start, total):
        batch = to_device(next(it), device)
        with autocast(device, recipe.run.precision):
            loss, parts = objective(batch)
        update(loss, step, opt, sched, params, o.grad_clip)
        if ema is not None:
            ema.update()
        seen += objective.frames_per_step
        metrics: dict[str, float] = {"loss": float(loss.detach()), **parts}
        metrics["lr"] = float(sched.get_last_lr()[0])
        metrics["frames_per_s"] = seen / max(time.perf_counter() - t0, 1e-9)
        history.append(metrics)
        if on_step is not None:
            on_step(step + 1, metrics)
        if checkpoint_due(step, recipe.run.checkpoint_every, total, dist.is_main):
            save_checkpoint(
                workdir,
                {
                    "student": lora_state(student),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "ema": ema.state_dict() if ema is not None else {},
                    "rng": rng_state(),
                    "step": step + 1,
                },
            )
    seconds = time.perf_counter() - t0
    student.eval()
    if not dist.is_main:  # rank 0 writes the adapter
        dist.barrier()
        return FinetuneResult(
            adapter=None,
            steps=total,
            final=history[-1] if history else {},
            seconds=seconds,
            frames_per_second=0.0,
            anchors=anchors,
            warnings=warnings,
        )
    heads.cpu()
    student.cpu()
    ctx = ema.average_parameters() if ema is not None else contextlib.nullcontext()
    with ctx:
        probe = _probe_set(bundle, ds, text.cpu(), trimodal)
        out, geometry, encoder = write_adapter(
            bundle,
            student,
            probe,
            workdir,
            full=full,
            manifest={
                "site": site,
                "lineage": {
                    "base_fingerprint": bundle.fingerprint,
                    "recipe_hash": recipe_hash(recipe),
                    "parent": str(parent) if parent else None,
                    "peft": peft.__version__,
                    "torch": torch.__version__,
                    "seed": recipe.run.seed,
                    "steps": total,
                    **(lineage or {}),
                },
                "recipe": recipe_to_dict(recipe),
                "anchors": anchors,
                "active_losses": active,
            },
        )
    dist.barrier()
    return FinetuneResult(
        adapter=out,
        steps=total,
        final=history[-1] if history else {},
        seconds=seconds,
        frames_per_second=seen / max(seconds, 1e-9),
        anchors=anchors,
        warnings=warnings,
        geometry=geometry,
        history=history,
        encoder=encoder,
        probe=probe,
    )


def write_adapter(
    bundle: Bundle,
    student: Any,
    probe: dict[str, torch.Tensor],
    workdir: Path,
    *,
    full: bool,
    manifest: dict[str, Any],
) -> tuple[Path | None, dict[str, float], Any]:
    """Writes the trained student (with the weights it should ship, e.g. under the EMA) as
    ``workdir/adapter``: PEFT weights, its probe set and a manifest (`manifest` plus the
    geometry and preprocessing). Returns (folder, geometry, the merged encoder); with ``full``
    (the ablation) nothing is written and the encoder is the trained copy."""
    from safetensors.torch import save_file

    if full:
        return None, {}, copy.deepcopy(student).requires_grad_(False).eval()
    encoder = copy.deepcopy(student).merge_and_unload().requires_grad_(False).eval()
    out = workdir / "adapter"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    geometry = geometry_fingerprint(bundle, student, probe)
    with writing(out, "the adapter", after="nothing was registered"):
        student.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
        save_file({k: v.contiguous() for k, v in probe.items()}, str(out / PROBE_FILE))
        write_manifest(
            out,
            {
                **manifest,
                "geometry": geometry,
                "preprocessing": bundle.model.cfg.preprocessing(),
                "feature_dim": bundle.model.cfg.width,
            },
        )
    return out, geometry, encoder
