"""Backbones in the registry: register a trained bundle, bootstrap the shipped one, load by
version, alias or local folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaflip_adapt import activity
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Bundle, load_bundle, read_manifest, verify_bundle
from dynaflip_adapt.registry.client import (
    BACKBONE_MODEL,
    BASE_ALIAS,
    PRETRAIN_EXPERIMENT,
    Registry,
    RunHandle,
    VersionInfo,
)

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "backbone"
# MLflow's alias rule: letters, digits, '_' and '-'; 'latest' and 'v<N>' are reserved.
_ALIAS = re.compile(r"(?!latest$)(?![vV]\d+$)[A-Za-z0-9_-]{1,255}")


def backbone_tags(manifest: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Lineage tags of a backbone version, from its manifest."""
    prov = manifest.get("provenance", {})
    arch = manifest.get("architecture", {})
    tags = {
        "fingerprint": manifest["fingerprint"],
        "embed_dim": str(manifest.get("embed_dim")),
        "feature_dim": str(manifest.get("feature_dim")),
        "image_size": str(arch.get("image_size")),
        "text_encoder": str(arch.get("text_encoder")),
        "objective": str(prov.get("objective", "")),
        "recipe_hash": str(prov.get("recipe_hash", "")),
        "data_fingerprint": str(prov.get("data_fingerprint", "")),
    }
    return tags | (extra or {})


def register_backbone(
    registry: Registry,
    run: RunHandle,
    bundle_dir: Path,
    *,
    make_base: bool = False,
    extra_tags: dict[str, str] | None = None,
) -> VersionInfo:
    """Registers a bundle as a new backbone version (and the ``base`` alias if asked)."""
    manifest = read_manifest(bundle_dir)
    tags = backbone_tags(manifest, extra_tags)
    description = (
        f"{tags.get('source', 'pretrained')} backbone {tags['fingerprint'][:19]}: "
        f"{tags['image_size']} px input, {tags['feature_dim']}-d features"
    )
    info = registry.register(
        BACKBONE_MODEL, run, bundle_dir, "backbone", tags, description=description
    )
    if make_base:
        registry.set_alias(BACKBONE_MODEL, BASE_ALIAS, info.version)
    return info


def ensure_base(registry: Registry) -> VersionInfo:
    """The ``base`` backbone; on an empty registry, the shipped backbone is registered first."""
    versions = registry.versions(BACKBONE_MODEL)
    for v in versions:
        if BASE_ALIAS in v.aliases:
            return v
    if versions:
        registry.set_alias(BACKBONE_MODEL, BASE_ALIAS, versions[-1].version)
        return registry.resolve(BACKBONE_MODEL, BASE_ALIAS)
    if not (SHIPPED / "manifest.json").exists():
        raise InputError(
            SHIPPED, None, "no shipped backbone", "a bundle (reinstall, or pretrain one)"
        )
    with registry.lock:
        # Another process may have bootstrapped meanwhile.
        if registry.versions(BACKBONE_MODEL):
            return ensure_base(registry)
    with (
        activity.step("first use: registering the shipped backbone"),
        registry.run(
            PRETRAIN_EXPERIMENT, "bootstrap-shipped-backbone", {"source": "shipped"}
        ) as run,
    ):
        info = register_backbone(
            registry, run, SHIPPED, make_base=True, extra_tags={"source": "shipped"}
        )
    return registry.resolve(BACKBONE_MODEL, BASE_ALIAS) if info else info


def load_backbone(registry: Registry | None, ref: str | None) -> tuple[Bundle, VersionInfo | None]:
    """A backbone by registry version/alias (default ``base``), or a local bundle folder.

    Raises:
        InputError: Unknown reference, or a bundle whose files fail their sha256.
    """
    if ref is not None and Path(ref).is_dir():
        return load_bundle(ref), None
    if registry is None:
        raise InputError(None, "--backbone", repr(ref), "a bundle folder (no registry available)")
    info = (
        ensure_base(registry)
        if ref in (None, BASE_ALIAS)
        else registry.resolve(BACKBONE_MODEL, ref)
    )
    with activity.step(f"loading backbone v{info.version}"):
        folder = registry.download(info, "backbones", verify_bundle)
        return load_bundle(folder), info


# ------------------------------------------------------------------------------------ import

TIMM_MEAN = (0.5, 0.5, 0.5)  # timm's augreg ViTs; ImageNet-normalized checkpoints differ


@dataclass
class ImportResult:
    """What `import_checkpoint` registered."""

    info: VersionInfo
    arch: str
    image_size: int
    checkpoint_sha256: str
    ignored: list[str]
    untrained: list[str]  # what the bundle carries only as an initialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.info.to_dict(),
            "arch": self.arch,
            "image_size": self.image_size,
            "checkpoint_sha256": self.checkpoint_sha256,
            "ignored": self.ignored,
            "untrained": self.untrained,
        }


def import_checkpoint(
    registry: Registry,
    checkpoint: Path,
    arch: str,
    *,
    image_size: int | None = None,
    mean: tuple[float, float, float] = TIMM_MEAN,
    std: tuple[float, float, float] = TIMM_MEAN,
    alias: str | None = None,
    make_base: bool = False,
    seed: int = 0,
) -> ImportResult:
    """Registers a timm-named ViT checkpoint (safetensors) as a backbone version.

    The image encoder takes the checkpoint's weights; the DynaFLIP heads (transition, language,
    flow) are initialised from `seed` and marked untrained, so finetune runs on the teacher
    terms alone until `pretrain --from` trains them. Nothing is written when a check fails.

    Raises:
        InputError: Unknown arch, image size not a multiple of the patch, a bad alias, or a
            checkpoint that does not fit (see `load_timm_checkpoint`).
    """
    import tempfile

    import torch

    from dynaflip_adapt.models.backbone import (
        HEADS_UNTRAINED,
        Backbone,
        BackboneConfig,
        save_bundle,
    )
    from dynaflip_adapt.models.vit import TIMM_ARCHS, load_timm_checkpoint
    from dynaflip_adapt.outputs import sha256_file

    if arch not in TIMM_ARCHS:
        raise InputError(None, "--arch", repr(arch), " | ".join(TIMM_ARCHS))
    patch, width, depth, heads = TIMM_ARCHS[arch]
    size = image_size or 224
    if size < patch or size % patch:
        raise InputError(None, "--image-size", str(size), f"a multiple of the patch size {patch}")
    if alias is not None and (alias == BASE_ALIAS or not _ALIAS.fullmatch(alias)):
        raise InputError(
            None,
            "--name",
            repr(alias),
            "letters, digits, '_' or '-', not 'base' (--set-base), 'latest' or 'vN'",
        )
    for key, values in (("--mean", mean), ("--std", std)):
        if len(values) != 3 or (key == "--std" and min(values) <= 0):
            raise InputError(None, key, repr(list(values)), "three numbers (std > 0)")
    cfg = BackboneConfig(
        image_size=size,
        patch_size=patch,
        width=width,
        depth=depth,
        heads=heads,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Backbone(cfg)
    with activity.step(f"reading {checkpoint.name} as {arch}"):
        ignored = load_timm_checkpoint(model.image, checkpoint)
    digest = "sha256:" + sha256_file(checkpoint)
    untrained = [name for name, _ in model.named_children() if name != "image"]
    provenance = {
        "source": "imported",
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": digest,
        "arch": arch,
        "ignored": ignored,
        "heads_seed": seed,
    }
    tags = {
        "source": "imported",
        "arch": arch,
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": digest,
        "heads": HEADS_UNTRAINED,
    }
    # On an empty registry the shipped backbone stays `base` unless asked otherwise.
    ensure_base(registry)
    with tempfile.TemporaryDirectory(prefix="import-") as tmp:
        bundle = save_bundle(
            model.eval(), Path(tmp) / "bundle", provenance=provenance, heads=HEADS_UNTRAINED
        )
        with registry.run(PRETRAIN_EXPERIMENT, f"import-{arch}", tags) as run:
            run.log_params({"arch": arch, "image_size": size, "mean": cfg.mean, "std": cfg.std})
            info = register_backbone(registry, run, bundle, make_base=make_base, extra_tags=tags)
    if alias is not None:
        registry.set_alias(BACKBONE_MODEL, alias, info.version)
        info = registry.resolve(BACKBONE_MODEL, alias)
    return ImportResult(info, arch, size, digest, ignored, untrained)
