"""Out-of-distribution evaluation: does an adapter make pinned policies work at a shifted site
without breaking them at the base site?

Measures, for image encoders (the base, an adapter merged in, ablations):

- action error of each policy on held-out episodes of the shifted site (MSE in units of the
  policy's action std, per dimension too), and on held-out base-site episodes (retention);
- paired feature drift where paired logs exist (same motion rendered at both sites): mean
  distance between a frame's shifted-site features and the base encoder's features of the same
  frame at the base site, divided by the mean distance between two random base frames (1.0 = as
  far apart as unrelated frames, 0 = invariant);
- the audit's dynamic verdict against the same policies.

`run_benchmark` runs the whole protocol (presets x seeds x ablations) on simulator logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dynaflip_adapt.config import FinetuneRecipe
from dynaflip_adapt.models.adapter import load_adapter
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.policies import (
    IMAGE_HEADS,
    Policy,
    encode_frames,
    load_policy,
    policy_input,
    save_policy,
)
from dynaflip_adapt.strength import StrengthFit
from dynaflip_adapt.workflows.adapt import AdaptResult, has_checkpoint, mlflow_steps

if TYPE_CHECKING:
    from dynaflip_adapt.registry import Registry, RunHandle

Frames = dict[str, torch.Tensor]  # rgb (N,3,S,S) uint8, proprio, actions, episode


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


# --------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def action_error(
    policy: Policy,
    features: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    language: torch.Tensor | None = None,
) -> dict[str, Any]:
    """MSE of the policy's actions in units of its action std: overall and per dimension."""
    z = (policy.act(features, proprio, language) - actions) / policy.action_scale
    per_dim = (z**2).mean(0)
    return {"mse": float(per_dim.mean()), "per_dim": [float(v) for v in per_dim]}


def paired_drift(new_shifted: torch.Tensor, base_reference: torch.Tensor) -> float:
    """Mean ||f_new(x_shifted_i) - f_base(x_base_i)|| over paired frames, divided by the mean
    distance between base features of frames i and i + N/2 (unrelated frames)."""
    n = len(base_reference)
    if n < 2:
        raise ValueError("paired drift needs at least two paired frames")
    d = (new_shifted - base_reference).norm(dim=1).mean()
    other = base_reference.roll(n // 2, dims=0)
    return float(d / (base_reference - other).norm(dim=1).mean().clamp_min(1e-12))


@dataclass
class EncoderEval:
    """One encoder's numbers on one shifted site (and the base site)."""

    encoder: str
    shifted: dict[str, dict[str, Any]]
    base: dict[str, dict[str, Any]] = field(default_factory=dict)
    paired_drift: float | None = None
    audit: str | None = None
    audit_detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_encoder(
    bundle: Bundle,
    name: str,
    encoder: nn.Module,
    policies: dict[str, Policy],
    shifted: Frames,
    base: Frames | None = None,
    paired: Frames | None = None,
    base_paired_features: torch.Tensor | None = None,
) -> EncoderEval:
    """Action errors of every policy with `encoder` on the shifted (and base) held-out frames;
    `paired` are the base-site renders of the shifted frames, in the same order."""
    pre = bundle.model.preprocess

    def errors(frames: Frames) -> tuple[dict[str, dict[str, Any]], torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        out = {
            p: action_error(
                pol,
                policy_input(pol, frames, encoder, pre, cache),
                frames["proprio"],
                frames["actions"],
                frames.get("language"),
            )
            for p, pol in policies.items()
        }
        if "features" not in cache:  # paired drift is measured on the pooled features
            cache["features"] = encode_frames(encoder, pre, frames["rgb"])
        return out, cache["features"]

    shifted_err, fs = errors(shifted)
    out = EncoderEval(name, shifted_err)
    if base is not None:
        out.base = errors(base)[0]
    if paired is not None:
        ref = base_paired_features
        if ref is None:
            ref = encode_frames(bundle.model.image, pre, paired["rgb"])
        out.paired_drift = paired_drift(fs, ref)
    return out


# --------------------------------------------------------------------------------------------
# The benchmark


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
    closed_loop: int = 0

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


Event = Callable[[str], None]


def _site_logs(workdir: Path, site: str, seed: int, episodes: int, frames: int, size: int) -> Path:
    """Simulator logs for (site, seed), generated once and reused (the file is complete only
    once renamed into place)."""
    from dynaflip_adapt.sim.generate import GenerateSpec, generate
    from dynaflip_adapt.sim.sites import get_site

    path = workdir / "logs" / f"{site}_s{seed}_n{episodes}_f{frames}_{size}px.h5"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial.h5")
        spec = GenerateSpec(
            site=get_site(site, None), episodes=episodes, frames=frames, seed=seed, size=size
        )
        spec.validate()
        generate(tmp, spec, workers=2)
        tmp.rename(path)
    return path


def _frames(bundle: Bundle, path: Path, language: bool, state: bool = False) -> Frames:
    """A log's frames as `collect` gives them; `state` also reads the object state (what
    object heads are trained against; simulator logs record it)."""
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.policies import collect, instruction_embedder

    embed = instruction_embedder(bundle) if language else None
    size = bundle.model.cfg.image_size
    return collect(
        open_logs([path]), EpisodeReader(), size, language=embed, state=state, objects=state
    )


def _ensure_extracted(path: Path, gap: int) -> None:
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.flow.extract import ExtractConfig, extract_logs

    src = extracted_source(gap)
    if all(ep.flow(src, gap) is not None for ep in open_logs([path]).episodes):
        return
    extract_logs([path], ExtractConfig(stride=gap), overwrite=True)


def run_benchmark(
    bundle: Bundle,
    recipe: FinetuneRecipe,
    cfg: BenchmarkConfig,
    workdir: str | Path,
    *,
    on_event: Event | None = None,
    on_step: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Presets x seeds x ablations on simulator logs; returns runs (one row per preset, seed,
    ablation) and their summary. `on_event(message)` reports stages, `on_step(run, step, total)`
    finetune steps.

    Per seed: base-site train logs (the policies' data) and held-out base logs; per preset: the
    shifted site's train logs (what the adapter sees) and held-out logs rendered from the same
    episode seeds as the held-out base logs (paired). Policies are trained on base features of
    the base train logs, pinned to the base encoder.
    """
    from dynaflip_adapt.audit import policy_verdicts
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.policies import fit_policy
    from dynaflip_adapt.train.finetune import finetune

    cfg.validate()
    workdir = Path(workdir)
    say = on_event or (lambda _m: None)
    base_enc = bundle.model.image.eval()
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    from dynaflip_adapt.policies import HEAD_KINDS

    state = any(HEAD_KINDS[h].needs_state for h in cfg.heads)

    def frames(site: str, seed: int, episodes: int) -> Frames:
        path = _site_logs(workdir, site, seed, episodes, cfg.frames, cfg.size)
        return _frames(bundle, path, cfg.language, state)

    sandbox = _sandbox(workdir)

    def adapted(
        ab: Ablation, preset: str, seed: int, site: str, train_path: Path, s_train: int
    ) -> tuple[nn.Module, dict[str, torch.Tensor], StrengthFit | None, str]:
        """The ablation's adapted encoder (merged), its probe set, strength fit and the ablation
        it was trained as. LoRA ablations go through `adapt_site`, the job behind `finetune`
        (fallback, strength fit, retained logs, registration in the benchmark's own registry,
        where the seed's policies are pinned to `site`); a run whose training finished earlier
        (same recipe, steps and logs) is reused."""
        from dynaflip_adapt.workflows.adapt import AdaptRequest, adapt_site

        if ab.extracted_flow:
            say(f"seed {seed} {preset}: flow extract")
            _ensure_extracted(train_path, recipe.data.gap)
        r = _seeded(ablation_recipe(recipe, ab), seed, cfg.steps)
        base_path = _site_logs(workdir, "base", s_train, cfg.train_episodes, cfg.frames, cfg.size)
        data = [train_path.name] + ([base_path.name] if ab.retain else [])
        run_dir = workdir / "runs" / _run_name(preset, seed, r, cfg, ab.full, data)
        label = f"{preset} s{seed} {ab.name}"
        if ab.full:  # a baseline the product does not offer: trained directly
            say(f"seed {seed} {preset}: finetune {ab.name}")
            res = finetune(
                bundle,
                open_logs([train_path], r.data.source_settings()),
                r,
                run_dir,
                site=preset,
                full=True,
                on_step=_step_reporter(on_step, label, cfg.steps),
            )
            return res.encoder, res.probe, None, ab.name
        chain = [ab] + ([ABLATIONS[ab.fallback]] if ab.fallback else [])
        files = [
            _recipe_file(workdir, _seeded(ablation_recipe(recipe, a), seed, cfg.steps))
            for a in chain
        ]
        budget = next((a.fit_budget for a in chain if a.fit_budget is not None), None)
        resume = (run_dir / "adapter" / "manifest.json").is_file() or has_checkpoint(run_dir)
        say(f"seed {seed} {preset}: {'adapter' if resume else 'finetune'} {ab.name}")

        @contextlib.contextmanager
        def monitor(
            title: str, total: int, run: RunHandle, log_every: int, keys: tuple[str, ...]
        ) -> Iterator[Callable[[int, dict[str, float]], None]]:
            report = _step_reporter(on_step, label, total)
            with mlflow_steps(title, total, run, log_every, keys) as log:

                def step(i: int, metrics: dict[str, float]) -> None:
                    log(i, metrics)
                    if report is not None:
                        report(i, metrics)

                yield step

        result = adapt_site(
            AdaptRequest(
                logs=(train_path,),
                site=site,
                recipe=str(files[0]),
                fallback=tuple(str(f) for f in files[1:]),
                backbone=str(bundle.path),
                workdir=run_dir,
                resume=resume,
                retain=(base_path,) if ab.retain else (),
                retain_frames=RETAIN_FRAMES,
                strength="1" if budget is None else "auto",
                budget=budget or 1.0,
            ),
            tracking_uri=sandbox.store.tracking_uri,
            monitor=monitor,
            notify=lambda level, message: say(f"seed {seed} {preset} {ab.name}: {message}"),
        )
        assert isinstance(result, AdaptResult)
        used = chain[[f.resolve() for f in files].index(result.recipe.resolve())]
        if used is not ab:
            say(f"seed {seed} {preset} {ab.name}: audit failed, {used.name}")
        adapter = load_adapter(bundle, result.folder)
        return adapter.merged().eval(), adapter.probe, result.strength_fit, used.name

    for seed in cfg.seeds:
        s_train, s_test, s_site = 10_000 + 3 * seed, 10_000 + 3 * seed + 1, 10_000 + 3 * seed + 2
        say(f"seed {seed}: base-site logs")
        base_train = frames("base", s_train, cfg.train_episodes)
        base_test = frames("base", s_test, cfg.test_episodes)
        policies: dict[str, Policy] = {}
        for h in cfg.heads:
            folder = _policy_path(workdir, bundle, cfg, seed, h)
            if (folder / "policy.json").exists():
                say(f"seed {seed}: policy {h} trained in an earlier run ({folder.name})")
                policies[h] = load_policy(folder)
                continue
            say(f"seed {seed}: policy {h} on base features")
            policies[h], _ = fit_policy(
                base_enc,
                bundle.model.preprocess,
                base_train,
                head=h,
                tolerance=cfg.tolerance,
                pin={"backbone_fingerprint": bundle.fingerprint},
                steps=cfg.policy_steps,
                seed=seed,
            )
            tmp = folder.with_name(folder.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            save_policy(tmp, policies[h].head, policies[h].spec, policies[h].stats)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        ref = encode_frames(base_enc, bundle.model.preprocess, base_test["rgb"])
        audited = [(h, policies[h], None) for h in cfg.heads if h in IMAGE_HEADS]
        # The seed's image policies, pinned in the benchmark's registry for its adapters' audits.
        site = _pin_policies(
            sandbox, seed, {h: _policy_path(workdir, bundle, cfg, seed, h) for h, *_ in audited}
        )
        # Closed loop for heads no encoder changes (and the expert): once per site and seed.
        fixed_loop: dict[str, dict[str, Any]] = {}
        for preset in cfg.presets:
            train_path = _site_logs(
                workdir, preset, s_site, cfg.train_episodes, cfg.frames, cfg.size
            )
            shifted = frames(preset, s_test, cfg.test_episodes)
            for ab_name in cfg.ablations:
                ab = ABLATIONS[ab_name]
                cached = _result_path(workdir, bundle, recipe, cfg, preset, seed, ab)
                if cached.exists():
                    rows.append(json.loads(cached.read_text()))
                    say(f"seed {seed} {preset} {ab_name}: done in an earlier run ({cached.name})")
                    continue
                t0 = time.perf_counter()
                probe: dict[str, torch.Tensor] = {}
                fit: StrengthFit | None = None
                used = ab.name
                if not ab.train:
                    enc: nn.Module = base_enc
                else:
                    enc, probe, fit, used = adapted(ab, preset, seed, site, train_path, s_train)
                    if fit is not None:
                        say(f"seed {seed} {preset} {ab_name}: strength {fit.strength:.4f}")
                ev = evaluate_encoder(
                    bundle, ab_name, enc, policies, shifted, base_test, base_test, ref
                )
                loop = None
                if cfg.closed_loop:
                    say(f"seed {seed} {preset} {ab_name}: closed loop")
                    loop = _closed_loop_row(
                        bundle, cfg, policies, enc, (preset, "base"), s_test, fixed_loop
                    )
                if probe:
                    verdicts = policy_verdicts(bundle, enc, probe, audited)
                    ev.audit = _worst([v.verdict for v in verdicts])
                    keep = ("action_deviation.", "bct_retrieval.", "trimodal_area.")
                    ev.audit_detail = {
                        v.policy: {c.name: c.value for c in v.checks if c.name.startswith(keep)}
                        | {"failed": [c.name for c in v.checks if c.blocks]}
                        for v in verdicts
                    }
                else:
                    ev.audit = "compatible"  # the base encoder itself
                row = {
                    "preset": preset,
                    "seed": seed,
                    "ablation": ab_name,
                    "seconds": time.perf_counter() - t0,
                    **ev.to_dict(),
                    "trained_as": used,
                    "strength": fit.strength if fit else (1.0 if ab.train else 0.0),
                    "strength_fit": fit.to_dict() if fit else None,
                    "closed_loop": loop,
                }
                rows.append(row)
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")
                tmp.write_text(json.dumps(row, default=str))
                tmp.replace(cached)
                success = ""
                if loop is not None:
                    success = "; success " + ", ".join(
                        f"{h} {loop[preset][h]['all']['rate']:.0%}" for h in cfg.heads
                    )
                say(
                    f"seed {seed} {preset} {ab_name}: "
                    + ", ".join(f"{h} {row['shifted'][h]['mse']:.3f}" for h in cfg.heads)
                    + f"; drift {row['paired_drift']:.3f}; audit {row['audit']}{success}"
                )
    return {
        "config": asdict(cfg),
        "recipe": json.loads(recipe.model_dump_json()),
        "backbone": bundle.fingerprint,
        "seconds": time.perf_counter() - t_start,
        "runs": rows,
        "summary": summarize(rows, cfg.heads),
    }


def _closed_loop_row(
    bundle: Bundle,
    cfg: BenchmarkConfig,
    policies: dict[str, Policy],
    encoder: nn.Module,
    sites: tuple[str, ...],
    seed: int,
    fixed: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Success tables per site and head with `encoder` (on the held-out episodes' scenes);
    heads that read no backbone, and the expert, are run once per site (cached in `fixed`)."""
    from dynaflip_adapt.workflows.rollout import RolloutRequest, closed_loop

    def request(expert: bool) -> RolloutRequest:
        return RolloutRequest(
            sites=sites, episodes=cfg.closed_loop, seed=seed, render_size=cfg.size, expert=expert
        )

    image = {h: p for h, p in policies.items() if p.uses_image}
    other = {h: p for h, p in policies.items() if not p.uses_image}
    out: dict[str, dict[str, Any]] = {s: {} for s in sites}
    report = closed_loop(request(False), bundle, image, {"encoder": encoder}) if image else None
    for c in report.cells if report else []:
        out[c.site][c.policy] = c.table
    key = "|".join(sites)
    if key not in fixed:
        rep = closed_loop(request(True), bundle, other, {})
        fixed[key] = {"cells": {(c.site, c.policy): c.table for c in rep.cells},
                      "expert": rep.expert}  # fmt: skip
    for (site, head), table in fixed[key]["cells"].items():
        out[site][head] = table
    for site, table in fixed[key]["expert"].items():
        out[site]["expert"] = table
    return out


def _result_path(
    workdir: Path,
    bundle: Bundle,
    recipe: FinetuneRecipe,
    cfg: BenchmarkConfig,
    preset: str,
    seed: int,
    ablation: Ablation,
) -> Path:
    """Where one run's row is kept: keyed by everything that determines it (backbone, the
    ablation's recipe, sizes, heads, steps), so an interrupted or repeated benchmark reuses
    finished runs (policies and finetunes are deterministic under their seeds)."""
    from dynaflip_adapt.config import recipe_hash

    sizes = {k: v for k, v in asdict(cfg).items() if k not in ("presets", "seeds", "ablations")}
    # Fields added to Ablation later count only when set, so earlier results keep their keys.
    ab = {k: v for k, v in asdict(ablation).items() if not (k in _LATER_FIELDS and v is None)}
    if ablation.fallback is not None:
        # What the fallback does decides the row too.
        ab["fallback"] = asdict(ABLATIONS[ablation.fallback])
    digest = _digest(bundle.fingerprint, recipe_hash(ablation_recipe(recipe, ablation)), sizes, ab)
    return workdir / "results" / f"{preset}_s{seed}_{ablation.name}_{digest}.json"


_LATER_FIELDS = ("fallback",)


def _run_name(
    preset: str,
    seed: int,
    recipe: FinetuneRecipe,
    cfg: BenchmarkConfig,
    full: bool,
    data: Sequence[str],
) -> str:
    """A finetune's work folder, keyed by what determines the adapter: the recipe, steps, full
    or LoRA, and the logs it reads (their file names carry site, seed and sizes), so ablations
    that train alike share one run and a benchmark at other sizes trains its own."""
    from dynaflip_adapt.config import recipe_hash

    return f"{preset}_s{seed}_{_digest(recipe_hash(recipe), cfg.steps, full, list(data))}"


def _seeded(recipe: FinetuneRecipe, seed: int, steps: int) -> FinetuneRecipe:
    """`recipe` with the benchmark's seed and step count."""
    return recipe.model_copy(
        update={
            "run": recipe.run.model_copy(update={"seed": seed}),
            "optim": recipe.optim.model_copy(update={"max_steps": steps}),
        }
    )


def _recipe_file(workdir: Path, recipe: FinetuneRecipe) -> Path:
    """`recipe` as a YAML file `adapt_site` can load (named by its hash)."""
    import yaml

    from dynaflip_adapt.config import recipe_hash, recipe_to_dict

    path = workdir / "recipes" / f"finetune-{recipe_hash(recipe)[:16]}.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        tmp.replace(path)
    return path


def _sandbox(workdir: Path) -> Registry:
    """The benchmark's own registry (sqlite under the work folder): its policies and adapters
    never reach the user's."""
    from dynaflip_adapt.registry import Registry
    from dynaflip_adapt.store import resolve_store

    db = workdir / "registry" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return Registry(resolve_store(f"sqlite:///{db}"))


def _pin_policies(registry: Registry, seed: int, folders: dict[str, Path]) -> str:
    """Registers a seed's policy folders (head -> folder) pinned to a site of their own, named
    by the folders (retrained policies are another site), unless they are already; returns the
    site."""
    from dynaflip_adapt.lifecycle import policies_for_site, register_policy

    site = f"bench-s{seed}-{_digest(sorted(f.name for f in folders.values()))[:8]}"
    have = {v.tags.get("name") for v in policies_for_site(registry, site)}
    for head, folder in folders.items():
        if head not in have:
            register_policy(registry, folder, site=site, name=head)
    return site


def _policy_path(workdir: Path, bundle: Bundle, cfg: BenchmarkConfig, seed: int, head: str) -> Path:
    """Where a seed's trained policy head is kept (keyed by what determines it: backbone, the
    base-site data sizes, head, steps, tolerance, language), so reruns skip retraining."""
    keep = ("train_episodes", "frames", "size", "policy_steps", "tolerance", "language")
    digest = _digest(bundle.fingerprint, seed, head, {k: getattr(cfg, k) for k in keep})
    return workdir / "policies" / f"{head}_s{seed}_{digest}"


def _digest(*parts: Any) -> str:
    """16 hex digits of the sha256 of `parts` as canonical JSON (a cache key)."""
    import hashlib

    key = json.dumps(list(parts), sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _step_reporter(
    on_step: Callable[[str, int, int], None] | None, name: str, total: int
) -> Callable[[int, dict[str, float]], None] | None:
    if on_step is None:
        return None
    report = on_step
    return lambda step, _metrics: report(name, step, total)


def _worst(verdicts: Sequence[str]) -> str:
    for v in ("incompatible", "warning"):
        if v in verdicts:
            return v
    return "compatible"


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs) if xs else math.nan,
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


RETAIN_FRAMES = 512  # base-site frames the `retain` ablations add to the teacher's pool

GOAL_REDUCTION = 0.225  # the paper's +22.5% out of distribution
GOAL_BASE_INCREASE = 0.03


def summarize(rows: list[dict[str, Any]], heads: Sequence[str]) -> dict[str, Any]:
    """Mean and spread over (preset, seed) of each ablation's numbers, reductions relative to
    `none` on the same (preset, seed), and the goal check.

    Per head: shifted-site MSE, its relative reduction vs no adaptation, base-site MSE and its
    relative change (retention). `image_heads` averages the heads that read the image. The
    proprio-only head reads no image: its error is the bar an image head must clear for the
    image to help at all. The audit counts as passed when promotion would accept it
    (compatible, or compatible with warnings).
    """
    none = {(r["preset"], r["seed"]): r for r in rows if r["ablation"] == "none"}
    image_heads = [h for h in heads if h in IMAGE_HEADS]
    out: dict[str, Any] = {}
    for ab in dict.fromkeys(r["ablation"] for r in rows):
        mine = [r for r in rows if r["ablation"] == ab and (r["preset"], r["seed"]) in none]
        s: dict[str, Any] = {"heads": {}}
        red_img: list[float] = []
        base_img: list[float] = []
        for h in heads:
            shift = [r["shifted"][h]["mse"] for r in mine]
            red = [
                1 - r["shifted"][h]["mse"] / none[(r["preset"], r["seed"])]["shifted"][h]["mse"]
                for r in mine
            ]
            base = [r["base"][h]["mse"] for r in mine]
            dbase = [
                r["base"][h]["mse"] / none[(r["preset"], r["seed"])]["base"][h]["mse"] - 1
                for r in mine
            ]
            s["heads"][h] = {
                "shifted_mse": _mean_sd(shift),
                "reduction": _mean_sd(red),
                "base_mse": _mean_sd(base),
                "base_change": _mean_sd(dbase),
            }
            if h in image_heads:
                red_img.append(s["heads"][h]["reduction"]["mean"])
                base_img.append(s["heads"][h]["base_change"]["mean"])
        drift = [r["paired_drift"] for r in mine if r["paired_drift"] is not None]
        verdicts = [r["audit"] for r in mine]
        s["paired_drift"] = _mean_sd(drift)
        s["strength"] = _mean_sd([r["strength"] for r in mine if r.get("strength") is not None])
        s["audit_compatible"] = sum(v == "compatible" for v in verdicts)
        s["audit_warning"] = sum(v == "warning" for v in verdicts)
        # The promotion gate: warnings (changes at the new site, where the old features are the
        # degraded ones) are reported but do not block; only hard failures do.
        s["audit_passed"] = s["audit_compatible"] + s["audit_warning"]
        s["audit_runs"] = len(verdicts)
        s["image_heads_reduction"] = statistics.fmean(red_img) if red_img else math.nan
        s["image_heads_base_change"] = statistics.fmean(base_img) if base_img else math.nan
        if "proprio_only" in heads:
            bar = s["heads"]["proprio_only"]["shifted_mse"]["mean"]
            s["image_heads_beating_proprio_only"] = [
                h for h in image_heads if s["heads"][h]["shifted_mse"]["mean"] < bar
            ]
        s["goal_met"] = bool(
            s["image_heads_reduction"] >= GOAL_REDUCTION
            and s["image_heads_base_change"] <= GOAL_BASE_INCREASE
            and s["audit_passed"] == s["audit_runs"]
        )
        if all(r.get("closed_loop") for r in mine) and mine:
            s["closed_loop"] = _closed_loop_summary(mine, none, heads)
        out[ab] = s
    return out


def _closed_loop_summary(
    mine: list[dict[str, Any]], none: dict[tuple[str, int], dict[str, Any]], heads: Sequence[str]
) -> dict[str, Any]:
    """Success rates (mean and sd over presets and seeds) at the shifted and the base site per
    head, their change against no adaptation on the same (preset, seed), and the goal: the
    image heads' shifted-site success up by GOAL_REDUCTION relative, base-site success within
    the no-adaptation run's 95% interval."""
    out: dict[str, Any] = {"heads": {}}
    gains: list[float] = []
    kept: list[bool] = []
    for h in heads:
        shifted, base, gain, rel = [], [], [], []
        for r in mine:
            ref = none[(r["preset"], r["seed"])]["closed_loop"]
            sh, rs = r["closed_loop"][r["preset"]][h]["all"], ref[r["preset"]][h]["all"]
            b, rb = r["closed_loop"]["base"][h]["all"], ref["base"][h]["all"]
            shifted.append(sh["rate"])
            base.append(b["rate"])
            gain.append(sh["rate"] - rs["rate"])
            if rs["rate"] > 0:
                rel.append(sh["rate"] / rs["rate"] - 1)
            if h in IMAGE_HEADS:
                kept.append(rb["ci95"][0] <= b["rate"] <= rb["ci95"][1] or b["rate"] >= rb["rate"])
        out["heads"][h] = {
            "shifted_success": _mean_sd(shifted),
            "base_success": _mean_sd(base),
            "success_gain": _mean_sd(gain),
            "relative_gain": _mean_sd(rel) if rel else None,
        }
        if h in IMAGE_HEADS and rel:
            gains.append(statistics.fmean(rel))
    ref_rows = [none[(r["preset"], r["seed"])]["closed_loop"] for r in mine]
    out["expert"] = {
        "shifted_success": _mean_sd([x[r["preset"]]["expert"]["all"]["rate"]
                                     for x, r in zip(ref_rows, mine, strict=True)]),
        "base_success": _mean_sd([x["base"]["expert"]["all"]["rate"] for x in ref_rows]),
    }  # fmt: skip
    out["image_heads_relative_gain"] = statistics.fmean(gains) if gains else math.nan
    out["image_heads_base_kept"] = all(kept)
    out["goal_met"] = bool(gains and out["image_heads_relative_gain"] >= GOAL_REDUCTION
                           and all(kept))  # fmt: skip
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """A PNG of shifted-site and base-site error per ablation and head (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = result["summary"]
    heads = result["config"]["heads"]
    abls = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(abls), 4), sharey=False)
    width = 0.8 / max(len(heads), 1)
    for ax, key, title in (
        (axes[0], "shifted_mse", "shifted site (held out)"),
        (axes[1], "base_mse", "base site (retention)"),
    ):
        for i, h in enumerate(heads):
            m = [summary[a]["heads"][h][key]["mean"] for a in abls]
            e = [summary[a]["heads"][h][key]["sd"] for a in abls]
            # Log scale (errors span orders of magnitude): clip the lower bar above zero.
            lo = [min(sd, 0.9 * mu) for mu, sd in zip(m, e, strict=True)]
            xs = [j + i * width for j in range(len(abls))]
            ax.bar(xs, m, width, yerr=[lo, e], label=h, capsize=2)
        ax.set_xticks([j + width * (len(heads) - 1) / 2 for j in range(len(abls))])
        ax.set_xticklabels(abls, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("action MSE (action-std units)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
