"""LoRA adapters (PEFT) on the backbone's image encoder: build, save, load, merge.

An adapter folder holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, a probe
set (``probe.safetensors``: source-replay and site frames at input size, so audits need no logs)
and ``manifest.json`` with lineage and the sha256 of every file. Only the adapter is stored,
never the backbone.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Bundle, read_json_manifest, verify_files
from dynaflip_adapt.outputs import sha256_file

ADAPTER_VERSION = 1
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROBE_FILE = "probe.safetensors"
MANIFEST = "manifest.json"
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def target_regex(targets: list[str]) -> str:
    """PEFT target regex limited to the transformer blocks.

    ``proj`` alone would also match ``patch_embed.proj`` (a Conv2d); names are matched against
    the block layers ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``.

    Raises:
        InputError: A target that names no block layer.
    """
    chosen = []
    for t in targets:
        hits = [layer for layer in BLOCK_LAYERS if layer == t or layer.endswith("." + t)]
        if not hits:
            raise InputError(
                None,
                "lora.target_modules",
                repr(t),
                "one of qkv, proj, fc1, fc2 (or attn.qkv, ...)",
            )
        chosen += hits
    alt = "|".join(re.escape(x) for x in dict.fromkeys(chosen))
    return rf".*blocks\.\d+\.({alt})"


def wrap_lora(
    image: nn.Module, r: int, alpha: int, dropout: float, targets: list[str], use_dora: bool
) -> Any:
    """A PEFT model around a *copy* of the image encoder (the bundle's stays untouched)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_regex(targets),
        use_dora=use_dora,
        bias="none",
    )
    return get_peft_model(copy.deepcopy(image), cfg)


def lora_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """The adapter's trainable tensors (detached copies)."""
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


@dataclass
class Adapter:
    """A loaded adapter: the PEFT model on its backbone's image encoder, and its manifest."""

    path: Path
    manifest: dict[str, Any]
    peft_model: Any
    probe: dict[str, torch.Tensor]

    def merged(self) -> nn.Module:
        """A plain image encoder with the adapter merged in (a copy)."""
        return copy.deepcopy(self.peft_model).merge_and_unload()


def write_manifest(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Adds the sha256 of every file in `folder` to `data` and writes ``manifest.json``."""
    files = {
        p.name: "sha256:" + sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }
    manifest = {
        "kind": "dynaflip-adapter",
        "adapter_version": ADAPTER_VERSION,
        **data,
        "files": files,
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_adapter_manifest(folder: str | Path) -> dict[str, Any]:
    """Reads, checks and verifies an adapter folder (every file's sha256; no pickles, no links).

    Raises:
        InputError: Missing/unknown manifest, unexpected files, failed hashes.
    """
    folder = Path(folder)
    p = folder / MANIFEST
    manifest = read_json_manifest(
        p,
        "dynaflip-adapter",
        "adapter_version",
        ADAPTER_VERSION,
        "an adapter folder with manifest.json",
    )
    for name in PEFT_FILES:
        if name not in manifest.get("files", {}):
            raise InputError(
                p, "files", f"no {name}", "a PEFT adapter (adapter_config.json + safetensors)"
            )
    for f in folder.iterdir():
        if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle") or f.is_symlink():
            raise InputError(f, None, "a pickle file or a symlink", "safetensors and JSON only")
    verify_files(folder, manifest["files"])
    return dict(manifest)


def load_adapter(
    bundle: Bundle,
    folder: str | Path,
    *,
    check_base: bool = True,
    manifest: dict[str, Any] | None = None,
) -> Adapter:
    """Loads an adapter onto a copy of the bundle's image encoder.

    `manifest` is the folder's manifest when the caller has just read (and so verified) it with
    `read_adapter_manifest`; otherwise it is read and verified here.

    Raises:
        InputError: Integrity failures, or an adapter trained on another backbone (PEFT would
            silently load it onto any backbone of the same shape, so the weights' sha256 decides).
    """
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    if manifest is None:
        manifest = read_adapter_manifest(folder)
    want = manifest.get("lineage", {}).get("base_fingerprint")
    if check_base and want != bundle.fingerprint:
        raise InputError(
            folder,
            "lineage.base_fingerprint",
            f"{str(want)[:19]}...",
            f"the backbone's {bundle.fingerprint[:19]}... (adapter trained on another backbone)",
        )
    model = PeftModel.from_pretrained(copy.deepcopy(bundle.model.image), str(folder))
    model.eval()
    probe = load_file(str(folder / PROBE_FILE)) if PROBE_FILE in manifest["files"] else {}
    return Adapter(folder, manifest, model, probe)
