"""The DynaFLIP backbone: the deployable image encoder plus what adaptation needs as anchors.

A bundle is a folder of safetensors files and a ``manifest.json`` with the architecture, the
preprocessing (image size, normalization, channel order) and the sha256 of every file; loading
verifies every hash. The backbone's identity (its *fingerprint*) is the sha256 of the image
encoder's weights file, not a name.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.flow_encoder import FlowEncoder
from dynaflip_adapt.models.text import TEXT_DIM
from dynaflip_adapt.models.vit import VisionTransformer
from dynaflip_adapt.outputs import sha256_file, writing

BUNDLE_VERSION = 1
# A backbone's preprocessing: uint8 frames (B, 3, H, W) -> its normalized input (B, 3, S, S).
Preprocess = Callable[[torch.Tensor], torch.Tensor]
IMAGE_FILE = "image_encoder.safetensors"
HEADS_FILE = "heads.safetensors"
REPLAY_FILE = "replay.safetensors"
MANIFEST = "manifest.json"
HEADS_TRAINED, HEADS_UNTRAINED = "trained", "untrained"


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture and preprocessing."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    embed_dim: int = 128
    text_encoder: str = "minilm"
    flow_points: int = 256
    flow_width: int = 128
    # Per-point heads on patch tokens (position and motion of tracked points): trained by the
    # point_* pretraining terms; bundles without them load as before.
    point_heads: bool = False
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def preprocessing(self) -> dict[str, Any]:
        """What a consumer must do to raw frames (recorded in manifests and exports)."""
        return {
            "image_size": self.image_size,
            "resize": "bilinear, antialias",
            "input": "uint8 RGB, (B, 3, H, W)",
            "scale": 1 / 255,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
        }


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.GELU(), nn.Linear(h, o))


class Backbone(nn.Module):
    """Image encoder ``image`` (deployable) and the heads used for training and as anchors.

    Attributes:
        image: ViT f: frames -> CLS features (B, width).
        transition: g: f(I_t+k) - f(I_t) -> transition embedding (before normalization).
        frame: h: f(I) -> single-frame embedding.
        text_proj: frozen sentence embedding (384) -> shared space.
        flow: 3D-flow encoder -> shared space.
        flow_pred: one-step flow prediction from f(I_t) and a point position.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, d = cfg.width, cfg.embed_dim
        self.image = VisionTransformer(
            cfg.image_size, cfg.patch_size, cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio
        )
        # f(I_t+k) - f(I_t) is small next to the biases at init, so without the LayerNorm every
        # transition embeds to the same direction and the contrastive term starts with no signal.
        self.transition = nn.Sequential(nn.LayerNorm(w), _mlp(w, w, d))
        self.frame = _mlp(w, w, d)
        self.text_proj = _mlp(TEXT_DIM, 2 * d, d)
        self.flow = FlowEncoder(cfg.flow_width, d)
        self.flow_pred = _mlp(w + 3, w, 3)
        if cfg.point_heads:
            self.point_position = _mlp(w, w, 3)
            self.point_motion = _mlp(2 * w, w, 3)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.temporal_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalized float (B, 3, S, S)."""
        x = rgb.float() / 255.0
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return (x - mean) / std

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """The deployable encoder: uint8 frames -> (B, width)."""
        return self.image(self.preprocess(rgb))

    def embed_transition(self, f0: torch.Tensor, f1: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.transition(f1 - f0).float(), dim=-1)

    def embed_frame(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.frame(f).float(), dim=-1)

    def embed_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_emb).float(), dim=-1)

    def embed_flow(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.flow(feats, mask).float(), dim=-1)

    def predict_flow(self, f0: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """Displacements (B, P, 3) of centred points (B, P, 3) predicted from f(I_t)."""
        ctx = f0.unsqueeze(1).expand(-1, points.shape[1], -1)
        return self.flow_pred(torch.cat([ctx, points], dim=-1))

    def point_tokens(self, tokens: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, 1 + N, D) sampled bilinearly at image points uv (B, P, 2) in
        normalized coordinates ([-1, 1], pixel centres) -> (B, P, D)."""
        B, n, D = tokens.shape
        g = round((n - 1) ** 0.5)
        grid = tokens[:, 1:].transpose(1, 2).reshape(B, D, g, g)
        out = F.grid_sample(grid, uv[:, :, None, :], mode="bilinear", align_corners=False)
        return out[..., 0].transpose(1, 2)

    def head_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("image.")}


# ------------------------------------------------------------------------------------------
# Bundles


def canonical_safetensors(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """A safetensors file whose bytes depend only on the tensors and metadata.

    safetensors serialises ``__metadata__`` from a Rust HashMap, whose order changes from call to
    call: with two or more keys the same weights gave different files, hence different sha256
    fingerprints. The header is rewritten with the metadata keys sorted (tensor entries keep
    the library's own, deterministic order) and space-padded to 8 bytes as the library does.
    """
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    text = json.dumps({**ordered, **header}, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path, "the backbone bundle", after="nothing was registered"):
            tmp.write_bytes(canonical_safetensors(tensors, metadata))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Bundle:
    """A loaded backbone bundle."""

    path: Path
    model: Backbone
    manifest: dict[str, Any]
    replay: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["fingerprint"])

    @property
    def instructions(self) -> list[str]:
        return list(self.manifest.get("replay_instructions", []))

    @property
    def has_heads(self) -> bool:
        """The transition/language/flow heads were trained (False for an imported vision tower:
        its heads are a random initialisation, so the tri-modal anchors mean nothing)."""
        return self.manifest.get("heads", HEADS_TRAINED) == HEADS_TRAINED


def save_bundle(
    model: Backbone,
    out: str | Path,
    *,
    replay: dict[str, torch.Tensor] | None = None,
    replay_instructions: list[str] | None = None,
    provenance: dict[str, Any] | None = None,
    heads: str = HEADS_TRAINED,
) -> Path:
    """Writes a bundle folder: image encoder, heads, replay set and manifest (sha256 of each).

    ``heads`` = ``"untrained"`` marks heads that are only an initialisation (an imported
    encoder); the manifest of a trained bundle does not carry the key.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_state = {
        k[len("image.") :]: v for k, v in model.state_dict().items() if k.startswith("image.")
    }
    _atomic_save(image_state, out / IMAGE_FILE, {"format": "pt", "naming": "timm-vit"})
    _atomic_save(model.head_state(), out / HEADS_FILE)
    files = [IMAGE_FILE, HEADS_FILE]
    if replay:
        _atomic_save(replay, out / REPLAY_FILE)
        files.append(REPLAY_FILE)
    hashes = {name: sha256_file(out / name) for name in files}
    manifest = {
        "kind": "dynaflip-backbone",
        "bundle_version": BUNDLE_VERSION,
        "architecture": asdict(model.cfg),
        "embed_dim": model.cfg.embed_dim,
        "feature_dim": model.cfg.width,
        "preprocessing": model.cfg.preprocessing(),
        "fingerprint": "sha256:" + hashes[IMAGE_FILE],
        "files": {k: "sha256:" + v for k, v in hashes.items()},
        "replay_instructions": replay_instructions or [],
        "provenance": provenance or {},
    }
    if heads != HEADS_TRAINED:
        manifest["heads"] = heads
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, out / MANIFEST)
    return out


def read_json_manifest(
    path: Path, kind: str, version_key: str, version: int, what: str
) -> dict[str, Any]:
    """Reads a JSON manifest and checks its ``kind`` and format version.

    Args:
        path: The JSON file.
        kind: Expected value of ``kind``.
        version_key: Key holding the format version.
        version: Expected format version.
        what: What the folder should be, for the error message.

    Raises:
        InputError: Missing or unreadable file, wrong kind or version.
    """
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, None, f"no {path.name}", what) from None
    except (OSError, ValueError) as exc:
        raise InputError(path, None, f"an unreadable {path.name} ({exc})", "JSON") from None
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = repr(data.get("kind")) if isinstance(data, dict) else type(data).__name__
        raise InputError(path, "kind", found, repr(kind))
    if data.get(version_key) != version:
        raise InputError(path, version_key, repr(data.get(version_key)), str(version))
    return data


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks a bundle manifest.

    Raises:
        InputError: Missing/unreadable manifest or wrong kind/version.
    """
    return read_json_manifest(
        Path(path) / MANIFEST,
        "dynaflip-backbone",
        "bundle_version",
        BUNDLE_VERSION,
        "a backbone bundle folder with manifest.json",
    )


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Checks each file's sha256 against the manifest.

    Raises:
        InputError: A missing, tampered or truncated file.
    """
    for name, want in files.items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise InputError(folder, name, "a path outside the bundle", "a plain file name")
        f = folder / name
        if not f.is_file() or f.is_symlink():
            raise InputError(f, None, "missing (or a symlink)", f"a file with {want}")
        got = "sha256:" + sha256_file(f)
        if got != want:
            raise InputError(f, None, f"{got[:19]}... (tampered or truncated)", f"{want[:19]}...")


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Reads a bundle's manifest and checks every file's sha256; returns the manifest.

    Raises:
        InputError: A missing or unreadable manifest, or a missing, tampered or truncated file.
    """
    manifest = read_manifest(path)
    verify_files(Path(path), manifest["files"])
    return manifest


def load_bundle(path: str | Path, *, with_replay: bool = True, map_location: str = "cpu") -> Bundle:
    """Loads a bundle after verifying every file's sha256 (safetensors and JSON only).

    Raises:
        InputError: Anything missing, tampered or inconsistent.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    manifest = verify_bundle(folder)
    cfg = BackboneConfig.from_dict(manifest["architecture"])
    model = Backbone(cfg)
    image = load_file(str(folder / IMAGE_FILE), device=map_location)
    heads = load_file(str(folder / HEADS_FILE), device=map_location)
    state = {f"image.{k}": v for k, v in image.items()} | heads
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[-1].strip()
        raise InputError(
            folder, None, f"weights that do not fit ({msg})", "the manifest's architecture"
        ) from None
    if missing or unexpected:
        raise InputError(
            folder, (missing or unexpected)[0], "a weight mismatch", "the manifest's architecture"
        )
    replay = {}
    if with_replay and REPLAY_FILE in manifest["files"]:
        replay = load_file(str(folder / REPLAY_FILE), device=map_location)
    model.eval()
    return Bundle(folder, model, manifest, replay)
