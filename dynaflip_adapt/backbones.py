"""Backbones in the registry: register a trained bundle, bootstrap the shipped one, load by
version, alias or local folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaflip_adapt import activity
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Bundle, load_bundle, read_manifest
from dynaflip_adapt.registry import (
    BACKBONE_MODEL,
    BASE_ALIAS,
    PRETRAIN_EXPERIMENT,
    Registry,
    RunHandle,
    VersionInfo,
)

SHIPPED = Path(__file__).resolve().parent / "assets" / "backbone"


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
        folder = registry.download(info, "backbones")
        return load_bundle(folder), info
