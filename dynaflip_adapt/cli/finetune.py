"""``dynaflip-adapt finetune``: adapt the backbone to a site with a LoRA adapter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Any

import typer

from dynaflip_adapt.cli.common import (
    BudgetOpt,
    CameraOpt,
    DepthScaleOpt,
    JsonOpt,
    LanguageOpt,
    LayoutOpt,
    LogsArg,
    MaxStepsHidden,
    OrientationOpt,
    StrengthOpt,
    one_steps,
)
from dynaflip_adapt.cli.output import (
    console,
    err_console,
    print_fit,
    print_json,
    progress_enabled,
    state,
)


def _site_of(logs: list[Path]) -> str:
    import h5py

    from dynaflip_adapt.data.logs import expand_paths

    first = expand_paths(logs)[0]
    with h5py.File(first, "r") as f:
        site = f.attrs.get("site")
    if isinstance(site, bytes):
        site = site.decode()
    return str(site) if site else first.stem


def finetune(
    ctx: typer.Context,
    logs: LogsArg,
    site: Annotated[
        str | None,
        typer.Option("--site", help="Site name (default: the logs' site attribute or file name)."),
    ] = None,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe name or YAML path.")
    ] = "finetune/default",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Dotted override KEY=VALUE.")
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", "-b", help="Backbone version, alias or folder (default: base)."),
    ] = None,
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Continue from this adapter (version, alias or folder)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Optimizer steps (overrides optim.max_steps)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override run.seed.")] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Checkpoints (default: under $DYNAFLIP_HOME/runs)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a killed run from its checkpoint.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Validate logs, recipe, backbone and one forward pass; train nothing."
        ),
    ] = False,
    layout: LayoutOpt = None,
    camera: CameraOpt = None,
    orientation: OrientationOpt = None,
    depth_scale: DepthScaleOpt = None,
    language: LanguageOpt = None,
    retain: Annotated[
        list[Path] | None,
        typer.Option(
            "--retain",
            help="Logs whose encoding must not change (e.g. what the site's policies were "
            "trained on): their frames join the teacher's replay pool (repeatable).",
        ),
    ] = None,
    retain_frames: Annotated[
        int, typer.Option("--retain-frames", min=1, help="Frames taken from the --retain logs.")
    ] = 512,
    fallback: Annotated[
        list[str] | None,
        typer.Option(
            "--fallback",
            help="Recipe to train with when the adapter fails the audit of the site's pinned "
            "policies at full strength (repeatable, tried in order; --set applies to each). The "
            "first that passes, or else the last, is registered, scaled as --strength says.",
        ),
    ] = None,
    strength: StrengthOpt = "1",
    budget: BudgetOpt = 1.0,
    as_json: JsonOpt = False,
    max_steps: MaxStepsHidden = None,
) -> None:
    """Train a LoRA adapter for a site and register it.

    The base image encoder is wrapped with PEFT LoRA; the backbone's frozen language and flow
    encoders anchor the simplex geometry on the site's triplets, and a frozen teacher (the
    adapter disabled) keeps the source-replay frames encoded as before. The adapter (EMA
    weights), a probe set and its lineage are versioned in MLflow. With --strength auto the
    adapter's update is scaled down to the largest share the site's pinned policies pass the
    audit with (see `adapters rescale`). With --fallback, an adapter that fails that audit at
    full strength is set aside (its MLflow run tagged fallback_rejected) and the next recipe
    trains.
    """
    from dynaflip_adapt.adapters import FINETUNE_EXPERIMENT, register_adapter, resolve_adapter
    from dynaflip_adapt.backbones import load_backbone
    from dynaflip_adapt.cli.progress import logged_training
    from dynaflip_adapt.config import (
        FinetuneRecipe,
        load_recipe,
        recipe_hash,
        recipe_params,
        recipe_to_dict,
    )
    from dynaflip_adapt.data.fingerprint import logs_fingerprint
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.lifecycle import audited_policies
    from dynaflip_adapt.models.adapter import load_adapter, read_adapter_manifest
    from dynaflip_adapt.registry import Registry
    from dynaflip_adapt.store import resolve_store
    from dynaflip_adapt.strength import audit_at, parse_strength
    from dynaflip_adapt.train.distributed import init_from_env
    from dynaflip_adapt.train.finetune import finetune as run_finetune
    from dynaflip_adapt.train.finetune import retention_frames

    fixed = parse_strength(strength)  # bad input fails before any training
    max_steps = one_steps(steps, max_steps)
    overrides = list(set_ or [])
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    if max_steps is not None:
        # A recipe override, so the recipe logged with the run is the run that happened.
        overrides.append(f"optim.max_steps={max_steps}")
    # The recipe, then the --fallback recipes: all validated before any training.
    candidates: list[tuple[FinetuneRecipe, Path]] = []
    for name in [recipe, *(fallback or [])]:
        loaded, loaded_path = load_recipe(name, overrides, kind="finetune")
        assert isinstance(loaded, FinetuneRecipe)
        candidates.append((loaded, loaded_path))
    # Only the last candidate is ever scaled.
    rec, rec_path = candidates[-1]
    if fixed != 1.0 and rec.lora.use_dora:
        raise InputError(
            rec_path,
            "lora.use_dora",
            f"true with --strength {strength}",
            "a LoRA adapter (DoRA renormalizes: its update cannot be scaled)",
        )
    settings = {
        "layout": layout,
        "camera": camera,
        "orientation": orientation,
        "depth_scale": depth_scale,
        "language": language,
    }
    # Bad logs fail here, before the registry is touched.
    logsets = [open_logs(logs, r.data.source_settings(**settings)) for r, _ in candidates]
    site = site or _site_of(logs)
    store = resolve_store(state(ctx).tracking_uri)
    # Under torchrun: rank 0 loads (and may bootstrap) the base backbone first; only rank 0
    # logs to MLflow and registers the adapter.
    dist = init_from_env()
    if len(candidates) > 1 and dist.world > 1:
        raise InputError(
            None, "--fallback", f"with {dist.world} processes", "a single process (no torchrun)"
        )
    if not dist.is_main:
        dist.barrier()
    registry = Registry(store)
    bundle, base_info = load_backbone(registry, backbone)
    if dist.is_main:
        dist.barrier()
    parent_dir, parent_info = resolve_adapter(registry, from_) if from_ else (None, None)
    fingerprint = logs_fingerprint(logs)
    held = None
    retained: dict[str, Any] = {}
    if retain:
        held = retention_frames(
            open_logs(retain, candidates[0][0].data.source_settings()),
            bundle.model.cfg.image_size,
            retain_frames,
        )
        retained = {
            "retain_logs": [str(p.resolve()) for p in retain],
            "retain_fingerprint": logs_fingerprint(retain),
            "retain_frames": len(held),
        }
    rejected: list[dict[str, Any]] = []
    policies: list[Any] | None = None
    for i, (rec, rec_path) in enumerate(candidates):
        last = i == len(candidates) - 1
        logset = logsets[i]
        key_parts = [
            fingerprint, recipe_hash(rec), bundle.fingerprint, str(parent_dir), str(max_steps)
        ]  # fmt: skip
        if retained:
            key_parts += [retained["retain_fingerprint"], str(retained["retain_frames"])]
        key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:12]
        if workdir is not None:
            work = workdir / f"fallback-{i}" if i else workdir
        else:
            work = store.home / "runs" / "finetune" / f"{site}-{key}"
        total = rec.optim.max_steps
        lineage = {
            "base_version": base_info.version if base_info else None,
            "data_fingerprint": fingerprint,
            "parent_version": parent_info.version if parent_info else None,
            "parent_fingerprint": None,
            "logs": [str(p.resolve()) for p in logs],
            **retained,
            # Recipes whose adapters failed the audit before this one (--fallback).
            **({"fallback_rejected": list(rejected)} if rejected else {}),
        }
        if dry_run:
            res = run_finetune(
                bundle, logset, rec, work, site=site, parent=parent_dir, dry_run=True,
                max_steps=total, retain=held,
            )  # fmt: skip
            out = {
                "dry_run": True,
                "site": site,
                "anchors": res.anchors,
                "warnings": res.warnings,
                "initial": res.final,
                "backbone": bundle.fingerprint,
                "episodes": len(logset.episodes),
                "workdir": str(work),
            }
            if as_json:
                print_json(out)
            else:
                for w in res.warnings:
                    err_console().print(f"[yellow]warning:[/] {w}", highlight=False)
                console().print(
                    f"dry run ok: site {site}, {len(logset.episodes)} episodes, supervision "
                    f"{', '.join(k for k, v in res.anchors.items() if v) or 'none'}; "
                    f"initial loss {res.final['loss']:.4f}",
                    highlight=False,
                )
            return
        if not dist.is_main:
            run_finetune(
                bundle, logset, rec, work, site=site, parent=parent_dir, resume=resume,
                max_steps=total, lineage=lineage, retain=held,
            )  # fmt: skip
            return
        tags = {
            "site": site,
            "recipe": str(rec_path),
            "data_fingerprint": fingerprint,
            "base_fingerprint": bundle.fingerprint,
            "workdir": str(work),
        }
        # A run on this work folder whose process died (SIGKILL, power loss) is still RUNNING.
        for run_id in registry.reap_dead_runs(FINETUNE_EXPERIMENT, {"workdir": str(work)}):
            err_console().print(
                f"marked run {run_id} KILLED (its process is gone)", highlight=False
            )
        with registry.run(FINETUNE_EXPERIMENT, f"finetune-{site}", tags) as run:
            run.log_params(
                {
                    **recipe_params(rec),
                    "recipe_hash": recipe_hash(rec),
                    "max_steps": total,
                    "site": site,
                    "workdir": str(work),
                    "world_size": dist.world,
                }
            )
            run.log_dict(recipe_to_dict(rec), "recipe.resolved.json")
            keys = ("loss", "area", "distill_replay", "invariance", "replay_area")
            with logged_training(
                f"finetune {site}",
                total,
                run,
                rec.run.log_every,
                enabled=progress_enabled(as_json),
                keys=keys,
            ) as on_step:
                res = run_finetune(
                    bundle,
                    logset,
                    rec,
                    work,
                    site=site,
                    parent=parent_dir,
                    # A fallback resumes only where the killed run had got to.
                    resume=resume and (i == 0 or _has_checkpoint(work)),
                    max_steps=total,
                    lineage=lineage,
                    on_step=on_step,
                    retain=held,
                )
            for w in res.warnings:
                err_console().print(f"[yellow]warning:[/] {w}", highlight=False)
            assert res.adapter is not None
            if policies is None and (not last or fixed is None):
                # What the audits below hold the adapter to, resolved once per finetune.
                policies = audited_policies(registry, bundle, site)
                if not policies:
                    unused = []
                    if not last:
                        unused.append("--fallback: the first recipe's adapter is kept")
                    if fixed is None:
                        unused.append("--strength auto: the adapter keeps its full strength")
                    err_console().print(
                        f"[yellow]warning:[/] no policies pinned to site {site}; "
                        + "; ".join(unused),
                        highlight=False,
                    )
            trial = None
            if not last and policies:
                adapter = load_adapter(bundle, res.adapter)
                trial = audit_at(bundle, adapter, policies, budget=budget)
                if not trial.passed:
                    reason = "; ".join(trial.failed)
                    run.set_tags({"fallback_rejected": reason[:4000]})
                    rejected.append({"recipe": str(rec_path), "failed": trial.failed})
                    err_console().print(
                        f"recipe {rec_path.stem}: the audit fails at full strength ({reason}); "
                        f"training fallback {candidates[i + 1][1].stem}",
                        highlight=False,
                    )
                    continue
            fit, chosen = _apply_strength(
                bundle, res.adapter, fixed, budget, policies or [], first=trial
            )
            if fit is not None and not as_json:
                print_fit(fit)
            if fit is not None:
                run.log_dict(fit.to_dict(), "strength_fit.json")
            if chosen != 1.0:
                run.log_params({"strength": chosen, "strength_budget": budget})
                res.geometry = read_adapter_manifest(res.adapter)["geometry"]
            if rejected:
                run.log_dict({"rejected": rejected}, "fallback_rejected.json")
            run.log_metrics(total, {f"geometry.{k}": v for k, v in res.geometry.items()})
            info = register_adapter(registry, run, res.adapter)
            run.set_tags({"adapter_version": info.version})
        break
    out = {
        "adapter": info.to_dict(),
        "site": site,
        "steps": res.steps,
        "seconds": round(res.seconds, 2),
        "frames_per_second": round(res.frames_per_second, 1),
        "final": res.final,
        "geometry": res.geometry,
        "anchors": res.anchors,
        "strength": chosen,
        "strength_fit": fit.to_dict() if fit else None,
        "recipe": str(rec_path),
        "fallback_rejected": rejected,
        "warnings": res.warnings,
    }
    if as_json:
        print_json(out)
        return
    console().print(
        f"registered dynaflip-adapter version {info.version} for site {site}: {res.steps} steps in "
        f"{res.seconds:.0f} s ({res.frames_per_second:.0f} frames/s); replay CKA "
        f"{res.geometry.get('replay_cka', float('nan')):.3f}, "
        f"site CKA {res.geometry.get('site_cka', float('nan')):.3f}"
        + (f"; strength {chosen:.4f}" if chosen != 1.0 else ""),
        highlight=False,
    )


def _apply_strength(
    bundle: Any,
    folder: Path,
    fixed: float | None,
    budget: float,
    policies: list[Any],
    first: Any = None,
) -> tuple[Any, float]:
    """Scales the freshly trained adapter in `folder` in place: to `fixed`, or (None) to the
    largest strength `policies` pass the audit with (full strength when there are none; `first`:
    its audit at full strength, if already done). Returns (fit, strength)."""
    from dynaflip_adapt.models.adapter import load_adapter
    from dynaflip_adapt.strength import fit_strength, save_scaled

    if fixed == 1.0 or (fixed is None and not policies):
        return None, 1.0
    adapter = load_adapter(bundle, folder)
    fit = None
    if fixed is None:
        fit = fit_strength(bundle, adapter, policies, budget=budget, first=first)
        chosen = fit.strength
        if chosen == 0.0:
            err_console().print(
                "[yellow]warning:[/] --strength auto: no strength above 0 passes the audit; "
                "the registered adapter leaves the encoder as it was",
                highlight=False,
            )
    else:
        chosen = fixed
    if chosen != 1.0:
        save_scaled(bundle, adapter, chosen, folder, fit=fit)
    return fit, chosen


def _has_checkpoint(work: Path) -> bool:
    from dynaflip_adapt.train.common import CHECKPOINT, PREVIOUS

    return any((work / name).exists() for name in (CHECKPOINT, PREVIOUS))
