"""Adapters in the registry: register, resolve (version, alias or folder), load onto their base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.adapter import Adapter, load_adapter, read_adapter_manifest
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.registry.client import Registry, RunHandle, VersionInfo

ADAPTER_MODEL = "dynaflip-adapter"
FINETUNE_EXPERIMENT = "dynaflip-finetune"


def adapter_tags(manifest: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    """Lineage tags of an adapter version, from its manifest."""
    lin = manifest.get("lineage", {})
    geo = manifest.get("geometry", {})
    tags = {
        "site": str(manifest.get("site", "")),
        "base_fingerprint": str(lin.get("base_fingerprint", "")),
        "base_version": str(lin.get("base_version", "")),
        "data_fingerprint": str(lin.get("data_fingerprint", "")),
        "recipe_hash": str(lin.get("recipe_hash", "")),
        "parent_version": str(lin.get("parent_version", "") or ""),
        "peft": str(lin.get("peft", "")),
        "torch": str(lin.get("torch", "")),
        "anchors": ",".join(k for k, v in manifest.get("anchors", {}).items() if v),
        # A rescaled copy must not look like a trained adapter: 1 = as trained.
        "strength": f"{float(lin.get('strength', 1.0)):g}",
        # What the folder holds (every file's sha256): the same adapter registered twice shares it.
        "content": content_digest(manifest),
    }
    for k in ("replay_cka", "site_cka", "replay_relative_mse", "site_mean_area"):
        if k in geo:
            tags[f"geometry.{k}"] = f"{geo[k]:.6f}"
    return tags | (extra or {})


def content_digest(manifest: dict[str, Any]) -> str:
    """sha256 over an adapter folder's file digests (its manifest's ``files``): equal for two
    folders holding the same weights, config and lineage."""
    files = json.dumps(manifest.get("files", {}), sort_keys=True)
    return "sha256:" + hashlib.sha256(files.encode()).hexdigest()


def registered_copy(registry: Registry, folder: Path) -> VersionInfo | None:
    """The newest version already registered from a folder with this content and site (a
    resumed job whose training had finished), or None."""
    manifest = read_adapter_manifest(folder)
    digest, site = content_digest(manifest), str(manifest.get("site", ""))
    for info in registry.versions(ADAPTER_MODEL):
        if info.tags.get("content") == digest and info.tags.get("site") == site:
            return info
    return None


def register_adapter(
    registry: Registry, run: RunHandle, folder: Path, parent: VersionInfo | None = None
) -> VersionInfo:
    """Registers an adapter folder as a new version (checked first: only sound folders land);
    continued from `parent`, its ``ancestors`` tag lists the chain (parent first)."""
    manifest = read_adapter_manifest(folder)
    strength = float(manifest.get("lineage", {}).get("strength", 1.0))
    what = "LoRA adapter" if strength == 1.0 else f"LoRA adapter rescaled to strength {strength:g}"
    description = f"{what} for site {manifest.get('site')!r}"
    extra = {}
    if parent is not None:
        extra["ancestors"] = ",".join(v.version for v in adapter_chain(registry, parent))
    tags = adapter_tags(manifest, extra)
    return registry.register(ADAPTER_MODEL, run, folder, "adapter", tags, description=description)


def adapter_chain(registry: Registry, info: VersionInfo, limit: int = 100) -> list[VersionInfo]:
    """`info` and the adapters it was continued from (``finetune --from``), newest first: the
    parent, the grandparent... up to one trained from the backbone alone.

    Raises:
        InputError: A parent version that is no longer in the registry, or a loop.
    """
    chain = [info]
    seen = {info.version}
    while parent := chain[-1].tags.get("parent_version", ""):
        if parent in seen or len(chain) >= limit:
            raise InputError(
                None, "parent_version", f"a loop at v{parent}", "a chain that ends at a backbone"
            )
        seen.add(parent)
        chain.append(registry.resolve(ADAPTER_MODEL, parent))
    return chain


def _locate(registry: Registry | None, ref: str) -> tuple[Path, VersionInfo | None]:
    """The local folder of an adapter version, alias or path (not verified yet)."""
    if Path(ref).is_dir():
        return Path(ref), None
    if registry is None:
        raise InputError(None, "--adapter", repr(ref), "an adapter folder (no registry available)")
    info = registry.resolve(ADAPTER_MODEL, ref)
    return registry.download(info, "adapters", read_adapter_manifest), info


def resolve_adapter(registry: Registry | None, ref: str) -> tuple[Path, VersionInfo | None]:
    """A local, verified folder for an adapter version, alias or folder path.

    Raises:
        InputError: Unknown reference or a folder that fails its checks.
    """
    folder, info = _locate(registry, ref)
    read_adapter_manifest(folder)
    return folder, info


def load_registered_adapter(
    registry: Registry | None, ref: str, bundle: Bundle
) -> tuple[Adapter, VersionInfo | None]:
    """Loads an adapter (by reference) onto `bundle`, checking the base's sha256."""
    folder, info = _locate(registry, ref)
    return load_adapter(bundle, folder), info


def open_adapter(registry: Registry, ref: str) -> tuple[Bundle, Adapter, VersionInfo | None]:
    """An adapter on its own base backbone, which is found by the weights' sha256 recorded in
    the adapter's lineage (files are verified once).

    Raises:
        InputError: Unknown reference, failed integrity checks, or no registered backbone with
            those weights.
    """
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import BACKBONE_MODEL

    folder, info = _locate(registry, ref)
    manifest = read_adapter_manifest(folder)
    base_fp = manifest.get("lineage", {}).get("base_fingerprint")
    match = [v for v in registry.versions(BACKBONE_MODEL) if v.tags.get("fingerprint") == base_fp]
    if not match:
        raise InputError(
            folder,
            "lineage.base_fingerprint",
            f"{str(base_fp)[:19]}...",
            "a registered backbone with these weights",
        )
    bundle, _ = load_backbone(registry, match[0].version)
    return bundle, load_adapter(bundle, folder, manifest=manifest), info
