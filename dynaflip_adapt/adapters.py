"""Adapters in the registry: register, resolve (version, alias or folder), load onto their base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.adapter import Adapter, load_adapter, read_adapter_manifest
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.registry import Registry, RunHandle, VersionInfo

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
    }
    for k in ("replay_cka", "site_cka", "replay_relative_mse", "site_mean_area"):
        if k in geo:
            tags[f"geometry.{k}"] = f"{geo[k]:.6f}"
    return tags | (extra or {})


def register_adapter(registry: Registry, run: RunHandle, folder: Path) -> VersionInfo:
    """Registers an adapter folder as a new version (checked first: only sound folders land)."""
    manifest = read_adapter_manifest(folder)
    return registry.register(ADAPTER_MODEL, run, folder, "adapter", adapter_tags(manifest))


def resolve_adapter(registry: Registry | None, ref: str) -> tuple[Path, VersionInfo | None]:
    """A local, verified folder for an adapter version, alias or folder path.

    Raises:
        InputError: Unknown reference or a folder that fails its checks.
    """
    if Path(ref).is_dir():
        read_adapter_manifest(ref)
        return Path(ref), None
    if registry is None:
        raise InputError(None, "--adapter", repr(ref), "an adapter folder (no registry available)")
    info = registry.resolve(ADAPTER_MODEL, ref)
    folder = registry.download(info, "adapters")
    read_adapter_manifest(folder)
    return folder, info


def load_registered_adapter(
    registry: Registry | None, ref: str, bundle: Bundle
) -> tuple[Adapter, VersionInfo | None]:
    """Loads an adapter (by reference) onto its base backbone, checking the base's sha256."""
    folder, info = resolve_adapter(registry, ref)
    return load_adapter(bundle, folder), info
