"""``dynaflip-adapt pretrain``: train a base backbone on triplets and register it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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
from dynaflip_adapt.cli.output import console, print_json, progress_enabled, state


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
    import hashlib
    import shutil
    import tempfile

    from dynaflip_adapt.cli.progress import logged_training
    from dynaflip_adapt.config import (
        PretrainRecipe,
        device_overrides,
        load_recipe,
        recipe_hash,
        recipe_params,
        recipe_to_dict,
    )
    from dynaflip_adapt.data.fingerprint import logs_fingerprint
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.outputs import check_export_folder, install_export, sha256_file
    from dynaflip_adapt.registry.backbones import register_backbone
    from dynaflip_adapt.registry.client import PRETRAIN_EXPERIMENT, Registry
    from dynaflip_adapt.registry.store import resolve_store
    from dynaflip_adapt.train.distributed import init_from_env
    from dynaflip_adapt.train.pretrain import pretrain as run_pretrain

    # Checked before anything trains; a previous bundle's files only with --overwrite.
    target = None
    if export_bundle is not None:
        target = check_export_folder(
            export_bundle, overwrite=overwrite, kind="dynaflip-backbone", option="--export-bundle"
        )
    if from_ is not None and init_image is not None:
        raise InputError(None, "--from", repr(from_), "either --from or --init-image, not both")
    store = resolve_store(state(ctx).tracking_uri)
    # Under torchrun every rank trains; rank 0 alone opens the store first (and downloads
    # --from), logs to MLflow and registers.
    dist = init_from_env()
    if not dist.is_main:
        dist.barrier()
    registry = Registry(store)
    overrides = list(set_ or [])
    start: Any = init_image
    parent: dict[str, str] = {}
    heads_trained = False
    if from_ is not None:
        from dataclasses import asdict

        from dynaflip_adapt.config import ModelSection
        from dynaflip_adapt.registry.backbones import load_backbone

        bundle, src = load_backbone(registry, from_)
        heads_trained = bundle.has_heads
        arch = asdict(bundle.model.cfg)
        # The architecture is the backbone's, recorded as overrides so that the recipe logged
        # with the run is the one that ran.
        overrides += [f"model.{k}={arch[k]}" for k in ModelSection.model_fields if k in arch]
        start = bundle.model
        parent = {
            "parent_backbone": bundle.fingerprint,
            "parent_version": src.version if src else str(bundle.path),
        }
    if seed is not None:
        overrides.append(f"run.seed={seed}")
    overrides += device_overrides(device, precision)
    max_steps = one_steps(steps, max_steps)
    if max_steps is not None:
        # An override like any other, so the recipe recorded with the bundle is what ran.
        overrides.append(f"optim.max_steps={max_steps}")
    rec, rec_path = load_recipe(recipe, overrides, kind="pretrain")
    assert isinstance(rec, PretrainRecipe)
    logset = open_logs(logs, rec.data.source_settings())
    fingerprint = logs_fingerprint(logs)
    # Like finetune: a default work folder keyed by what the run reads, so `--resume` finds a
    # killed run's checkpoint and nothing is left behind in the system's temp folder.
    init = sha256_file(init_image) if init_image and init_image.is_file() else str(init_image)
    init = parent.get("parent_backbone", init)
    key = hashlib.sha256(f"{fingerprint}|{recipe_hash(rec)}|{init}".encode()).hexdigest()[:12]
    work = workdir or store.home / "runs" / "pretrain" / f"{rec_path.stem}-{key}"
    total = rec.optim.max_steps
    provenance = {"data_fingerprint": fingerprint, "logs": [str(p) for p in logs], **parent}
    if dist.is_main:
        dist.barrier()
    else:
        run_pretrain(logset, rec, work, resume=resume, max_steps=total, init_image=start,
                     init_heads=heads_trained, provenance=provenance)  # fmt: skip
        return
    tags = {"recipe": str(rec_path), "data_fingerprint": fingerprint, **parent}
    with registry.run(PRETRAIN_EXPERIMENT, f"pretrain-{rec_path.stem}", tags) as run:
        run.log_params({"recipe_hash": recipe_hash(rec), "max_steps": total,
                        "world_size": dist.world, **recipe_params(rec)})  # fmt: skip
        run.log_dict(recipe_to_dict(rec), "recipe.resolved.json")

        keys = ("loss", "area", "contrastive")
        with logged_training(
            "pretrain", total, run, rec.run.log_every, enabled=progress_enabled(as_json), keys=keys
        ) as on_step:
            result = run_pretrain(
                logset,
                rec,
                work,
                resume=resume,
                max_steps=total,
                init_image=start,
                init_heads=heads_trained,
                provenance=provenance,
                on_step=on_step,
            )
        assert result.bundle is not None  # rank 0
        info = register_backbone(
            registry, run, result.bundle, make_base=set_base, extra_tags=parent
        )
        run.set_tags({"backbone_version": info.version})
    if target is not None:
        # Staged beside the target, then installed as exports are: only a previous bundle's
        # files are replaced, never anything else in the folder.
        target.path.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=target.path.parent, prefix=".bundle-"))
        try:
            shutil.copytree(result.bundle, staged, dirs_exist_ok=True)
            install_export(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    out = {
        "backbone": info.to_dict(),
        "bundle": str(result.bundle),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "triplets_per_second": round(result.triplets_per_second, 1),
        "final": result.final,
    }
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
