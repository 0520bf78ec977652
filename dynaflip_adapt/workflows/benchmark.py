"""The out-of-distribution benchmark: does an adapter make pinned policies work at a shifted
site without breaking them at the base site?

`run_benchmark` runs presets x seeds x ablations (`eval.ablations`) on simulator logs: per seed,
policies trained on the base site's features and pinned in the benchmark's own registry; per
preset and ablation, an adapter trained through `adapt_site` (the job behind `finetune`), scored
offline (`eval.offline`: action error at the shifted and the base site, paired drift), by the
audit against the same policies, and optionally in closed loop; `eval.summary` reduces the rows.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dynaflip_adapt.config import FinetuneRecipe
from dynaflip_adapt.eval.ablations import (
    ABLATIONS,
    Ablation,
    BenchmarkConfig,
    ablation_recipe,
    extracted_source,
)
from dynaflip_adapt.eval.offline import Frames, evaluate_encoder
from dynaflip_adapt.eval.strength import StrengthFit
from dynaflip_adapt.eval.summary import summarize
from dynaflip_adapt.models.adapter import load_adapter
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.policies import (
    IMAGE_HEADS,
    Policy,
    encode_frames,
    load_policy,
    save_policy,
)
from dynaflip_adapt.workflows.adapt import RETAIN_FRAMES, AdaptResult, has_checkpoint, mlflow_steps

if TYPE_CHECKING:
    from dynaflip_adapt.eval.audit import AuditedPolicy
    from dynaflip_adapt.registry.client import Registry, RunHandle


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
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.eval.audit import policy_verdicts
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
        run_dir = workdir / "runs" / _run_name(bundle, preset, seed, r, cfg, ab.full, data)
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
        audited: list[AuditedPolicy] = [
            (h, policies[h], None) for h in cfg.heads if h in IMAGE_HEADS
        ]
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
    bundle: Bundle,
    preset: str,
    seed: int,
    recipe: FinetuneRecipe,
    cfg: BenchmarkConfig,
    full: bool,
    data: Sequence[str],
) -> str:
    """A finetune's work folder, keyed by what determines the adapter: the backbone, the
    recipe, steps, full or LoRA, and the logs it reads (their file names carry site, seed and
    sizes), so ablations that train alike share one run (a finished one is reused, a killed one
    resumed) and a benchmark on another backbone or at other sizes trains its own."""
    from dynaflip_adapt.config import recipe_hash

    key = _digest(bundle.fingerprint, recipe_hash(recipe), cfg.steps, full, list(data))
    return f"{preset}_s{seed}_{key}"


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
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    db = workdir / "registry" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return Registry(resolve_store(f"sqlite:///{db}"))


def _pin_policies(registry: Registry, seed: int, folders: dict[str, Path]) -> str:
    """Registers a seed's policy folders (head -> folder) pinned to a site of their own, named
    by the folders (retrained policies are another site), unless they are already; returns the
    site."""
    from dynaflip_adapt.registry.lifecycle import policies_for_site, register_policy

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
