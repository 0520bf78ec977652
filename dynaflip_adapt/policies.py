"""Downstream policies: the consumers of backbone features that an adapter must not break.

A policy folder holds ``policy.json`` (head type and sizes, input spec, action statistics, the
tolerance it declares, and its pin: backbone fingerprint + adapter) and ``policy.safetensors``.
The reference head is behaviour cloning: an MLP over frozen image features and proprio that
predicts the action, trained on site logs.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import read_json_manifest, sha256_file, verify_files

POLICY_VERSION = 1
SPEC = "policy.json"
WEIGHTS = "policy.safetensors"
HEADS = ("bc", "image_only", "proprio_only")


class MLPHead(nn.Module):
    """features (B, F) ++ proprio (B, P) -> normalized action (B, A)."""

    def __init__(
        self,
        feature_dim: int,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
    ) -> None:
        super().__init__()
        dims = [feature_dim + proprio_dim] + [hidden] * layers
        mods: list[nn.Module] = []
        for i, o in itertools.pairwise(dims):
            mods += [nn.Linear(i, o), nn.GELU()]
        mods.append(nn.Linear(dims[-1], action_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, proprio], dim=-1))


@dataclass
class Policy:
    """A loaded policy: its spec and a callable head on raw (unnormalized) inputs."""

    path: Path
    spec: dict[str, Any]
    head: MLPHead
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def uses_image(self) -> bool:
        return self.spec["inputs"]["image"]

    @property
    def uses_proprio(self) -> bool:
        return self.spec["inputs"]["proprio"]

    def act(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """Actions (B, A) in the logs' units from image features (B, F) and proprio (B, P)."""
        s = self.stats
        f = (features - s["feat_mean"]) / s["feat_std"] if self.uses_image else features[:, :0]
        p = (proprio - s["prop_mean"]) / s["prop_std"] if self.uses_proprio else proprio[:, :0]
        return self.head(f, p) * s["act_std"] + s["act_mean"]

    @property
    def action_scale(self) -> torch.Tensor:
        """Per-dimension action standard deviation (what relative deviation is measured in)."""
        return self.stats["act_std"]


def save_policy(
    folder: Path, head: MLPHead, spec: dict[str, Any], stats: dict[str, torch.Tensor]
) -> Path:
    """Writes a policy folder (weights + stats in safetensors, spec with sha256s in JSON)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tensors |= {f"stats.{k}": v.detach().cpu().contiguous() for k, v in stats.items()}
    save_file(tensors, str(folder / WEIGHTS))
    spec = {**spec, "kind": "dynaflip-policy", "policy_version": POLICY_VERSION}
    spec["files"] = {WEIGHTS: "sha256:" + sha256_file(folder / WEIGHTS)}
    tmp = folder / f".{SPEC}.tmp"
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True))
    os.replace(tmp, folder / SPEC)
    return folder


def read_policy_spec(folder: str | Path) -> dict[str, Any]:
    """Reads and checks a policy spec (and its files' sha256).

    Raises:
        InputError: Missing or malformed spec, unknown head, failed hashes.
    """
    folder = Path(folder)
    p = folder / SPEC
    spec = read_json_manifest(
        p,
        "dynaflip-policy",
        "policy_version",
        POLICY_VERSION,
        "a policy folder (policy.json + policy.safetensors)",
    )
    for key in ("head", "inputs", "feature_dim", "proprio_dim", "action_dim", "tolerance", "pin"):
        if key not in spec:
            raise InputError(p, key, "missing", "a complete policy spec")
    if spec["head"] not in HEADS:
        raise InputError(p, "head", repr(spec["head"]), "one of " + ", ".join(HEADS))
    tol = spec["tolerance"]
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise InputError(
            p, "tolerance", repr(tol), "a positive number (max relative action deviation)"
        )
    verify_files(folder, spec.get("files", {WEIGHTS: ""}))
    return dict(spec)


def load_policy(folder: str | Path) -> Policy:
    """Loads a verified policy folder (safetensors + JSON only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_policy_spec(folder)
    t = load_file(str(folder / WEIGHTS))
    f_in = spec["feature_dim"] if spec["inputs"]["image"] else 0
    p_in = spec["proprio_dim"] if spec["inputs"]["proprio"] else 0
    head = MLPHead(f_in, p_in, spec["action_dim"], spec.get("hidden", 256), spec.get("layers", 2))
    head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
    head.eval()
    stats = {k[6:]: v for k, v in t.items() if k.startswith("stats.")}
    return Policy(folder, spec, head, stats)


# ------------------------------------------------------------------------------------------
# Training the reference head


@torch.no_grad()
def encode_frames(
    encoder: nn.Module, preprocess: Any, rgb: torch.Tensor, batch: int = 128
) -> torch.Tensor:
    """Features (N, F) of uint8 frames (N, 3, H, W) through a frozen encoder."""
    out = [encoder(preprocess(rgb[i : i + batch])) for i in range(0, len(rgb), batch)]
    return torch.cat(out) if out else torch.zeros(0)


def collect(
    logs: Any, reader: Any, image_size: int, max_frames: int | None = None
) -> dict[str, torch.Tensor]:
    """Frames (at input size), proprio and actions of every episode, with episode ids."""
    from dynaflip_adapt.train.triplets import resize_uint8

    rgb, prop, act, epi = [], [], [], []
    for i, ep in enumerate(logs.episodes):
        frames = torch.from_numpy(
            np.ascontiguousarray(reader.rgb(ep, slice(0, ep.length)).transpose(0, 3, 1, 2))
        )
        rgb.append(resize_uint8(frames, image_size))
        prop.append(torch.from_numpy(np.stack([reader.proprio(ep, t) for t in range(ep.length)])))
        act.append(torch.from_numpy(reader.actions(ep, slice(0, ep.length))))
        epi.append(torch.full((ep.length,), i))
    out = {
        "rgb": torch.cat(rgb),
        "proprio": torch.cat(prop),
        "actions": torch.cat(act),
        "episode": torch.cat(epi),
    }
    if max_frames is not None and len(out["rgb"]) > max_frames:
        sel = torch.linspace(0, len(out["rgb"]) - 1, max_frames).round().long()
        out = {k: v[sel] for k, v in out.items()}
    return out


def train_head(
    features: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    *,
    head: str = "bc",
    steps: int = 1500,
    lr: float = 1e-3,
    batch: int = 256,
    hidden: int = 256,
    seed: int = 0,
    feature_noise: float = 0.1,
    weight_decay: float = 1e-2,
) -> tuple[MLPHead, dict[str, torch.Tensor], float]:
    """Fits an MLP head on z-scored inputs and actions; returns it, its stats and the final MSE.

    Gaussian noise on the z-scored image features during training (and weight decay) keeps the
    head smooth: an unregularised head fitted to a few hundred frames turned a 5% feature change
    into a 0.9-std action change, failing every audit whatever the adapter.
    """
    torch.manual_seed(seed)
    eps = 1e-6
    # A floor on the per-dimension std: z-scoring a nearly constant feature would turn a tiny
    # drift into a large input change, making the policy (and its audit) hypersensitive.
    feat_std = features.std(0)
    feat_std = torch.maximum(feat_std, 0.1 * feat_std.median()) + eps
    stats = {
        "feat_mean": features.mean(0),
        "feat_std": feat_std,
        "prop_mean": proprio.mean(0),
        "prop_std": proprio.std(0) + eps,
        "act_mean": actions.mean(0),
        "act_std": actions.std(0) + eps,
    }
    use_img, use_prop = head in ("bc", "image_only"), head in ("bc", "proprio_only")
    f = (features - stats["feat_mean"]) / stats["feat_std"] if use_img else features[:, :0]
    p = (proprio - stats["prop_mean"]) / stats["prop_std"] if use_prop else proprio[:, :0]
    y = (actions - stats["act_mean"]) / stats["act_std"]
    model = MLPHead(f.shape[1], p.shape[1], y.shape[1], hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        fi = f[idx]
        if feature_noise > 0 and fi.shape[1] > 0:
            fi = fi + feature_noise * torch.randn(fi.shape, generator=g)
        loss = ((model(fi, p[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, stats, float(loss.detach())


def policy_spec(
    head: str,
    feature_dim: int,
    proprio_dim: int,
    action_dim: int,
    tolerance: float,
    pin: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON spec of a policy head."""
    return {
        "head": head,
        "inputs": {
            "image": head in ("bc", "image_only"),
            "proprio": head in ("bc", "proprio_only"),
        },
        "feature_dim": feature_dim,
        "proprio_dim": proprio_dim,
        "action_dim": action_dim,
        "hidden": 256,
        "layers": 2,
        "tolerance": tolerance,
        "pin": pin,
        "created": time.time(),
        **(extra or {}),
    }
