"""``dynaflip-adapt pretrain``: train a base backbone on triplets and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynaflip_adapt.cli.common import (
    DeviceOpt,
    JsonOpt,
    LogsArg,
    MaxStepsHidden,
    OverwriteOpt,
    PrecisionOpt,
    one_steps,
)
from dynaflip_adapt.cli.output import console, print_json, state


def pretrain(
    ctx: typer.Context,
    logs: LogsArg,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe name or YAML path.")
    ] = "pretrain/small",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Dotted override KEY=VALUE (repeatable).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Checkpoints and bundle (default: under $DYNAFLIP_HOME/runs, keyed by logs,"
            " recipe and --init-image).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a killed run from its work folder's checkpoint."),
    ] = False,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Optimizer steps (overrides optim.max_steps)."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Override run.seed.")] = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    init_image: Annotated[
        Path | None,
        typer.Option(
            "--init-image", help="Start the ViT from a timm-named .safetensors checkpoint."
        ),
    ] = None,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from",
            help="Continue from a registered backbone (version, alias or bundle folder): its "
            "encoder, architecture and preprocessing; its heads when they were trained.",
        ),
    ] = None,
    set_base: Annotated[
        bool, typer.Option("--set-base", help="Make the new version the registry's base backbone.")
    ] = False,
    export_bundle: Annotated[
        Path | None,
        typer.Option(
            "--export-bundle",
            help="Also copy the bundle here: a new or empty folder, or a previous bundle with "
            "--overwrite (only its files are replaced).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    max_steps: MaxStepsHidden = None,
) -> None:
    """Pretrain a DynaFLIP backbone and register it.

    Trains on (transition, language, 3D flow) triplets from site logs that carry flow, logs the
    run to MLflow and registers the bundle as a new backbone version.
    """
    from dynaflip_adapt.cli.progress import training_monitor
    from dynaflip_adapt.workflows.pretrain import PretrainRequest, pretrain_backbone

    request = PretrainRequest(
        logs=tuple(logs),
        recipe=recipe,
        overrides=tuple(set_ or []),
        workdir=workdir,
        resume=resume,
        steps=one_steps(steps, max_steps),
        seed=seed,
        device=device,
        precision=precision,
        init_image=init_image,
        parent=from_,
        set_base=set_base,
        export_bundle=export_bundle,
        overwrite=overwrite,
    )

    result = pretrain_backbone(
        request, tracking_uri=state(ctx).tracking_uri, monitor=training_monitor(as_json)
    )
    if result is None:  # a non-main process under torchrun: rank 0 reports
        return
    info = result.backbone
    out = result.to_dict()
    if as_json:
        print_json(out)
        return
    console().print(
        f"registered {info.name} version {info.version} "
        f"({info.tags['fingerprint'][:19]}...){' as base' if set_base else ''}; "
        f"{result.steps} steps in {result.seconds:.0f} s "
        f"({result.triplets_per_second:.0f} triplets/s)",
        highlight=False,
    )
