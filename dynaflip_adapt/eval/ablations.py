"""The out-of-distribution benchmark's ablations: how (or whether) the encoder is adapted in
each row of its table, as recipe overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dynaflip_adapt.config import FinetuneRecipe


@dataclass(frozen=True)
class Ablation:
    """One row of the ablation table: how (or whether) the encoder is adapted."""

    name: str
    description: str
    loss: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    full: bool = False
    train: bool = True
    extracted_flow: bool = False
    # Scale the trained adapter to the largest strength whose audit passes with each policy's
    # own-frame deviation within this share of its tolerance (None: use it as trained).
    fit_budget: float | None = None
    # The teacher also holds frames of the base site's training logs (what the policies saw).
    retain: bool = False
    # Train this ablation; if the adapter fails the audit at full strength, use this other
    # ablation instead (`finetune --fallback`).
    fallback: str | None = None


_NO_ANCHORS = {"area": 0.0, "contrastive": 0.0, "cosine": 0.0, "single_frame": 0.0}
_NO_TEACHER = {"distill_replay": 0.0, "invariance": 0.0}

ABLATIONS: dict[str, Ablation] = {
    a.name: a
    for a in (
        Ablation("none", "no adaptation (the base encoder)", train=False),
        Ablation(
            "teacher_only",
            "frozen teacher on augmented site frames only",
            {**_NO_ANCHORS, **_NO_TEACHER, "distill_site": 1.0},
        ),
        Ablation(
            "aug_only",
            "augmentation consistency only (no teacher, no anchors)",
            {**_NO_ANCHORS, **_NO_TEACHER, "consistency": 1.0},
        ),
        Ablation("anchors_only", "simplex/cosine/contrastive anchors only", _NO_TEACHER),
        Ablation(
            "default",
            "anchors + frozen teacher on source replay, clean and augmented (the recipe)",
        ),
        Ablation(
            "default_noinv",
            "the recipe without the teacher on augmented source frames (loss.invariance = 0)",
            {"invariance": 0.0},
        ),
        Ablation(
            "default_fit",
            "the recipe, update scaled to the largest strength the audit passes",
            fit_budget=1.0,
        ),
        Ablation(
            "default_align",
            "the recipe + moment alignment of site features to the source replay",
            {"align": 1.0},
        ),
        Ablation(
            "default_align_fit",
            "the recipe + moment alignment, scaled to the largest strength the audit passes",
            {"align": 1.0},
            fit_budget=1.0,
        ),
        Ablation(
            "default_retain",
            "the recipe, teacher also on the base site's training frames (finetune --retain)",
            retain=True,
        ),
        Ablation(
            "default_retain_fit",
            "default_retain, scaled to the largest strength the audit passes",
            retain=True,
            fit_budget=1.0,
        ),
        Ablation(
            "default_retain_area",
            "default_retain + the area anchor on the backbone's replay triplets",
            {"replay_area": 1.0},
            retain=True,
        ),
        Ablation(
            "default_retain_area_fit",
            "default_retain_area, scaled to the largest strength the audit passes",
            {"replay_area": 1.0},
            retain=True,
            fit_budget=1.0,
        ),
        Ablation(
            "default_retain_hinge",
            "default_retain + a hinge on replay triplets' area above the base encoder's",
            {"replay_area": 1.0, "replay_area_hinge": True},
            retain=True,
        ),
        Ablation(
            "default_retain_cascade",
            "default_retain; when its audit fails at full strength, default_retain_area_fit "
            "(finetune --retain --fallback finetune/replay_area --strength auto)",
            retain=True,
            fallback="default_retain_area_fit",
        ),
        Ablation(
            "full_ft", "the recipe's losses, every encoder weight trained (no LoRA)", full=True
        ),
        Ablation(
            "extracted_flow",
            "the recipe, with flow from `flow extract` instead of ground truth",
            extracted_flow=True,
        ),
    )
}


def ablation_recipe(recipe: FinetuneRecipe, ablation: Ablation) -> FinetuneRecipe:
    """`recipe` with the ablation's loss and data overrides applied."""
    data = dict(ablation.data)
    if ablation.extracted_flow:
        data["flow_source"] = extracted_source(recipe.data.gap)
    return recipe.model_copy(
        update={
            "loss": recipe.loss.model_copy(update=ablation.loss),
            "data": recipe.data.model_copy(update=data),
        }
    )


def extracted_source(gap: int) -> str:
    """The flow group `flow extract --stride gap` writes."""
    from dynaflip_adapt.flow.extract import ExtractConfig

    return ExtractConfig(stride=gap).group_name


@dataclass
class BenchmarkConfig:
    """What `run_benchmark` runs; sizes default to what fits 2 CPU cores in minutes per run."""

    presets: list[str]
    seeds: list[int]
    ablations: list[str]
    heads: list[str] = field(
        default_factory=lambda: ["bc", "diffusion", "image_only", "proprio_only", "cnn"]
    )
    train_episodes: int = 96
    test_episodes: int = 12
    frames: int = 50
    size: int = 128
    steps: int = 300
    policy_steps: int | None = None  # None: each head's own default
    tolerance: float = 0.25
    language: bool = True
    # Closed-loop episodes per (site, head) and row, at the shifted and the base site, on the
    # held-out episodes' scenes (0: offline error only).
    closed_loop: int = 20

    def validate(self) -> None:
        from dynaflip_adapt.errors import InputError
        from dynaflip_adapt.policies import HEAD_KINDS, HEADS
        from dynaflip_adapt.sim.sites import get_site

        for p in self.presets:
            get_site(p)  # presets, random-N, SITE-camera-CAMERA
            if p == "base":
                raise InputError(None, "--preset", "'base'", "a shifted site (not the base)")
        for a in self.ablations:
            if a not in ABLATIONS:
                raise InputError(None, "--ablation", repr(a), "one of " + ", ".join(ABLATIONS))
        for h in self.heads:
            if h not in HEADS or HEAD_KINDS[h].reads == "state":
                usable = [k for k in HEADS if HEAD_KINDS[k].reads != "state"]
                raise InputError(None, "--head", repr(h), "one of " + ", ".join(usable))
        if not self.presets or not self.seeds or not self.ablations:
            raise InputError(
                None, "benchmark", "an empty preset, seed or ablation list", "at least one of each"
            )
        if "none" not in self.ablations:
            self.ablations.insert(0, "none")  # every reduction is relative to it


# What `eval benchmark` runs when an option is not given (one definition, CLI and library).
BENCHMARK_DEFAULTS = BenchmarkConfig(presets=[], seeds=[], ablations=[])
