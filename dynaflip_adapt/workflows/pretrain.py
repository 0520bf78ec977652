"""Pretraining a backbone and registering it: the job behind ``dynaflip-adapt pretrain``.

`pretrain_backbone` takes a `PretrainRequest` and returns a `PretrainJobResult`: it checks the
export folder and the options, resolves the recipe (every shortcut, ``--steps``, ``--seed``,
``--from``'s architecture, is a recipe override, so the recipe logged with the run is the run
that happened), trains in an MLflow run, registers the bundle as a new backbone version and,
when asked, installs a copy of the bundle in a folder of the user's::

    from dynaflip_adapt import PretrainRequest, pretrain_backbone

    result = pretrain_backbone(PretrainRequest(logs=("logs/",), recipe="pretrain/small"))
    print(result.backbone.version, result.final["loss"])
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaflip_adapt.workflows.adapt import Monitor, mlflow_steps

if TYPE_CHECKING:
    from dynaflip_adapt.registry.client import VersionInfo

# Losses shown live while a backbone trains (the rest are logged to MLflow).
LIVE_KEYS = ("loss", "area", "contrastive")


@dataclass(frozen=True)
class PretrainRequest:
    """What to pretrain on, and how.

    Attributes:
        logs: HDF5 files or folders of them, with language and 3D flow.
        recipe: Pretrain recipe name or YAML path.
        overrides: Dotted recipe overrides ``KEY=VALUE``.
        workdir: Checkpoints and bundle (default: under the store's ``runs/pretrain``, keyed
            by logs, recipe and starting point).
        resume: Continue a killed run from its checkpoint.
        steps: A recipe override of ``optim.max_steps``.
        seed: A recipe override of ``run.seed``.
        device: A recipe override of ``run.device``.
        precision: A recipe override of ``run.precision``.
        init_image: Start the ViT from a timm-named ``.safetensors`` checkpoint.
        parent: Continue from a registered backbone (version, alias or bundle folder): its
            encoder, architecture and preprocessing; its heads when they were trained.
        set_base: Make the new version the registry's base backbone.
        export_bundle: Also install a copy of the bundle here (a new or empty folder, or a
            previous bundle with `overwrite`: only its files are replaced).
        overwrite: Allow `export_bundle` to be a previous bundle.
    """

    logs: tuple[Path, ...]
    recipe: str = "pretrain/small"
    overrides: tuple[str, ...] = ()
    workdir: Path | None = None
    resume: bool = False
    steps: int | None = None
    seed: int | None = None
    device: str | None = None
    precision: str | None = None
    init_image: Path | None = None
    parent: str | None = None
    set_base: bool = False
    export_bundle: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "logs", tuple(Path(p) for p in self.logs))
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclass
class PretrainJobResult:
    """The registered backbone and how it trained."""

    backbone: VersionInfo
    bundle: Path
    steps: int
    seconds: float
    triplets_per_second: float
    final: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.to_dict(),
            "bundle": str(self.bundle),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "triplets_per_second": round(self.triplets_per_second, 1),
            "final": self.final,
        }


def pretrain_backbone(
    request: PretrainRequest,
    *,
    tracking_uri: str | None = None,
    monitor: Monitor = mlflow_steps,
) -> PretrainJobResult | None:
    """Pretrains and registers a backbone (see the module docstring).

    Args:
        request: What to train on, and how.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else the embedded one).
        monitor: Wraps the training; yields the per-step callback (progress, metrics).

    Returns:
        The registered backbone, or None on a non-main process under torchrun (rank 0
        registers).

    Raises:
        InputError: Bad logs, recipe, options or export folder (before anything trains).
    """
    from dynaflip_adapt.config import (
        ModelSection,
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
    from dynaflip_adapt.registry.backbones import load_backbone, register_backbone
    from dynaflip_adapt.registry.client import PRETRAIN_EXPERIMENT, Registry
    from dynaflip_adapt.registry.store import resolve_store
    from dynaflip_adapt.train.distributed import init_from_env
    from dynaflip_adapt.train.pretrain import pretrain as run_pretrain

    req = request
    # Checked before anything trains; a previous bundle's files only with `overwrite`.
    target = None
    if req.export_bundle is not None:
        target = check_export_folder(
            req.export_bundle,
            overwrite=req.overwrite,
            kind="dynaflip-backbone",
            option="--export-bundle",
        )
    if req.parent is not None and req.init_image is not None:
        raise InputError(
            None, "--from", repr(req.parent), "either --from or --init-image, not both"
        )
    store = resolve_store(tracking_uri)
    # Under torchrun every rank trains; rank 0 alone opens the store first (and downloads the
    # parent), logs to MLflow and registers.
    dist = init_from_env()
    if not dist.is_main:
        dist.barrier()
    registry = Registry(store)
    overrides = list(req.overrides)
    start: Any = req.init_image
    parent: dict[str, str] = {}
    heads_trained = False
    if req.parent is not None:
        from dataclasses import asdict

        bundle, src = load_backbone(registry, req.parent)
        heads_trained = bundle.has_heads
        arch = asdict(bundle.model.cfg)
        # The architecture is the parent's, recorded as overrides so that the recipe logged
        # with the run is the one that ran.
        overrides += [f"model.{k}={arch[k]}" for k in ModelSection.model_fields if k in arch]
        start = bundle.model
        parent = {
            "parent_backbone": bundle.fingerprint,
            "parent_version": src.version if src else str(bundle.path),
        }
    if req.seed is not None:
        overrides.append(f"run.seed={req.seed}")
    overrides += device_overrides(req.device, req.precision)
    if req.steps is not None:
        # An override like any other, so the recipe recorded with the bundle is what ran.
        overrides.append(f"optim.max_steps={req.steps}")
    rec, rec_path = load_recipe(req.recipe, overrides, kind="pretrain")
    assert isinstance(rec, PretrainRecipe)
    logs = list(req.logs)
    logset = open_logs(logs, rec.data.source_settings())
    fingerprint = logs_fingerprint(logs)
    # Like finetune: a default work folder keyed by what the run reads, so a resume finds a
    # killed run's checkpoint and nothing is left behind in the system's temp folder.
    init_image = req.init_image
    init = sha256_file(init_image) if init_image and init_image.is_file() else str(init_image)
    init = parent.get("parent_backbone", init)
    key = hashlib.sha256(f"{fingerprint}|{recipe_hash(rec)}|{init}".encode()).hexdigest()[:12]
    work = req.workdir or store.home / "runs" / "pretrain" / f"{rec_path.stem}-{key}"
    total = rec.optim.max_steps
    provenance = {"data_fingerprint": fingerprint, "logs": [str(p) for p in logs], **parent}
    if dist.is_main:
        dist.barrier()
    else:
        run_pretrain(logset, rec, work, resume=req.resume, max_steps=total, init_image=start,
                     init_heads=heads_trained, provenance=provenance)  # fmt: skip
        return None
    tags = {"recipe": str(rec_path), "data_fingerprint": fingerprint, **parent}
    with registry.run(PRETRAIN_EXPERIMENT, f"pretrain-{rec_path.stem}", tags) as run:
        run.log_params({"recipe_hash": recipe_hash(rec), "max_steps": total,
                        "world_size": dist.world, **recipe_params(rec)})  # fmt: skip
        run.log_dict(recipe_to_dict(rec), "recipe.resolved.json")
        with monitor("pretrain", total, run, rec.run.log_every, LIVE_KEYS) as on_step:
            result = run_pretrain(
                logset,
                rec,
                work,
                resume=req.resume,
                max_steps=total,
                init_image=start,
                init_heads=heads_trained,
                provenance=provenance,
                on_step=on_step,
            )
        assert result.bundle is not None  # rank 0
        info = register_backbone(
            registry, run, result.bundle, make_base=req.set_base, extra_tags=parent
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
    return PretrainJobResult(
        backbone=info,
        bundle=result.bundle,
        steps=result.steps,
        seconds=result.seconds,
        triplets_per_second=result.triplets_per_second,
        final=result.final,
    )
