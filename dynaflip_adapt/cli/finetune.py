"""``dynaflip-adapt finetune``: adapt the backbone to a site with a LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynaflip_adapt.cli.common import (
    BudgetOpt,
    CameraOpt,
    DepthScaleOpt,
    DeviceOpt,
    JsonOpt,
    LanguageOpt,
    LayoutOpt,
    LogsArg,
    MaxStepsHidden,
    OrientationOpt,
    PrecisionOpt,
    StrengthOpt,
    one_steps,
)
from dynaflip_adapt.cli.output import (
    console,
    err_console,
    print_fit,
    print_json,
    state,
)
from dynaflip_adapt.workflows.adapt import RETAIN_FRAMES


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
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
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
    ] = RETAIN_FRAMES,
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
    from dynaflip_adapt.cli.progress import training_monitor
    from dynaflip_adapt.workflows.adapt import AdaptRequest, DryRunResult, adapt_site

    request = AdaptRequest(
        logs=tuple(logs),
        site=site,
        recipe=recipe,
        overrides=tuple(set_ or []),
        backbone=backbone,
        parent=from_,
        steps=one_steps(steps, max_steps),
        seed=seed,
        device=device,
        precision=precision,
        workdir=workdir,
        resume=resume,
        dry_run=dry_run,
        layout=layout,
        camera=camera,
        orientation=orientation,
        depth_scale=depth_scale,
        language=language,
        retain=tuple(retain or []),
        retain_frames=retain_frames,
        fallback=tuple(fallback or []),
        strength=strength,
        budget=budget,
    )

    def notify(level: str, message: str) -> None:
        prefix = "[yellow]warning:[/] " if level == "warning" else ""
        err_console().print(prefix + message, highlight=False)

    result = adapt_site(
        request,
        tracking_uri=state(ctx).tracking_uri,
        monitor=training_monitor(as_json),
        notify=notify,
    )
    if result is None:  # a non-main process under torchrun: rank 0 reports
        return
    if isinstance(result, DryRunResult):
        if as_json:
            print_json(result.to_dict())
            return
        for w in result.warnings:
            notify("warning", w)
        console().print(
            f"dry run ok: site {result.site}, {result.episodes} episodes, supervision "
            f"{', '.join(k for k, v in result.anchors.items() if v) or 'none'}; "
            f"initial loss {result.initial['loss']:.4f}",
            highlight=False,
        )
        return
    if as_json:
        print_json(result.to_dict())
        return
    if result.strength_fit is not None:
        print_fit(result.strength_fit)
    geo = result.geometry
    cka = ", ".join(
        f"{part} CKA {geo[key]:.3f}"
        for part, key in (("replay", "replay_cka"), ("site", "site_cka"))
        if key in geo
    )
    console().print(
        f"registered dynaflip-adapter version {result.adapter.version} for site {result.site}: "
        f"{result.steps} steps in {result.seconds:.0f} s ({result.frames_per_second:.0f} "
        f"frames/s)"
        + (f"; {cka}" if cka else "")
        + (f"; strength {result.strength:.4f}" if result.strength != 1.0 else ""),
        highlight=False,
    )
