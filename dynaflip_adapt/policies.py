"""Downstream policies: the consumers of backbone features that an adapter must not break.

A policy folder holds ``policy.json`` (head type and sizes, input spec, action statistics, the
tolerance it declares, and its pin: backbone fingerprint + adapter) and ``policy.safetensors``.
The reference heads read frozen image features and proprio: behaviour cloning (an MLP that
predicts the action), a small diffusion policy (denoises an action chunk), and two controls, an
image-only and a proprio-only MLP. Any head can also be conditioned on the episode's instruction
(the backbone's own language embedding), as language-conditioned policies and VLAs are: then the
instruction says which object and task, and only the image says where things are.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
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
HEADS = ("bc", "image_only", "proprio_only", "diffusion")
IMAGE_HEADS = ("bc", "image_only", "diffusion")
PROPRIO_HEADS = ("bc", "proprio_only", "diffusion")
HORIZON = 4  # actions per diffusion chunk
CLIP = 5.0  # |normalized action| bound when sampling


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear + GELU layers through `dims`, a plain Linear last."""
    mods: list[nn.Module] = []
    for i, o in itertools.pairwise(dims[:-1]):
        mods += [nn.Linear(i, o), nn.GELU()]
    mods.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*mods)


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
        self.net = _mlp([feature_dim + proprio_dim] + [hidden] * layers + [action_dim])

    def forward(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, proprio], dim=-1))


class DiffusionHead(nn.Module):
    """A diffusion policy head (Chi et al. 2023, MLP denoiser): DDPM over an action chunk of
    `horizon` normalized actions, conditioned on features ++ proprio.

    Training predicts the noise at a random step of a cosine schedule. Inference runs
    deterministic DDIM (eta = 0) from one fixed latent stored with the weights, so a policy is a
    deterministic function of its inputs (audits compare its outputs before and after an
    adapter) and returns the chunk's first action.
    """

    def __init__(
        self,
        feature_dim: int,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 3,
        horizon: int = HORIZON,
        train_steps: int = 100,
        sample_steps: int = 10,
    ) -> None:
        super().__init__()
        self.action_dim, self.horizon = action_dim, horizon
        self.train_steps, self.sample_steps = train_steps, sample_steps
        self.time_dim = 32
        out = action_dim * horizon
        self.net = _mlp(
            [feature_dim + proprio_dim + out + self.time_dim] + [hidden] * layers + [out]
        )
        s = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
        f = torch.cos((s + 0.008) / 1.008 * torch.pi / 2) ** 2
        abar = (f[1:] / f[0]).clamp(1e-5, 1.0)
        self.alpha_bar: torch.Tensor
        self.latent: torch.Tensor
        self.register_buffer("alpha_bar", abar.float())
        self.register_buffer("latent", torch.randn(out, generator=torch.Generator().manual_seed(0)))

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-torch.arange(half, device=t.device) * (9.2 / half))
        ang = t.float()[:, None] * freqs[None] * (1000.0 / self.train_steps)
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def eps(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cond, x, self._time(t)], dim=-1))

    def loss(
        self,
        features: torch.Tensor,
        proprio: torch.Tensor,
        chunk: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise-prediction MSE for normalized action chunks (B, horizon, A)."""
        x0 = chunk.flatten(1)
        t = torch.randint(0, self.train_steps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        ab = self.alpha_bar[t][:, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = torch.cat([features, proprio], dim=-1)
        return ((self.eps(cond, xt, t) - noise) ** 2).mean()

    def sample(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from the stored latent: normalized chunks (B, horizon, A)."""
        cond = torch.cat([features, proprio], dim=-1)
        x = self.latent.expand(len(cond), -1)
        ts = torch.linspace(self.train_steps - 1, 0, self.sample_steps).round().long().tolist()
        for i, t in enumerate(ts):
            ab = self.alpha_bar[t]
            e = self.eps(cond, x, torch.full((len(x),), t, device=x.device))
            # Clipped like diffusers' clip_sample: at the noisiest steps 1 / sqrt(alpha_bar) is
            # large and an unclipped x0 estimate explodes. Actions are z-scored.
            x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-CLIP, CLIP)
            e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            if i + 1 == len(ts):
                x = x0
            else:
                ab_prev = self.alpha_bar[ts[i + 1]]
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
        return x.view(len(cond), self.horizon, self.action_dim)

    def forward(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.sample(features, proprio)[:, 0]


def build_head(spec: dict[str, Any], feature_dim: int, proprio_dim: int) -> nn.Module:
    """The head module a spec describes (input sizes after the spec's input selection)."""
    hidden, layers = spec.get("hidden", 256), spec.get("layers", 2)
    if spec["head"] == "diffusion":
        d = spec.get("diffusion", {})
        return DiffusionHead(
            feature_dim,
            proprio_dim,
            spec["action_dim"],
            hidden,
            layers,
            d.get("horizon", HORIZON),
            d.get("train_steps", 100),
            d.get("sample_steps", 10),
        )
    return MLPHead(feature_dim, proprio_dim, spec["action_dim"], hidden, layers)


@dataclass
class Policy:
    """A loaded policy: its spec and a callable head on raw (unnormalized) inputs."""

    path: Path | None
    spec: dict[str, Any]
    head: nn.Module
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def uses_image(self) -> bool:
        return self.spec["inputs"]["image"]

    @property
    def uses_proprio(self) -> bool:
        return self.spec["inputs"]["proprio"]

    @property
    def uses_language(self) -> bool:
        return bool(self.spec["inputs"].get("language", False))

    def act(
        self,
        features: torch.Tensor,
        proprio: torch.Tensor,
        language: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Actions (B, A) in the logs' units from image features (B, F), proprio (B, P) and, for
        a language-conditioned policy, instruction embeddings (B, L) (`instruction_embedder`)."""
        if self.uses_language and language is None:
            raise ValueError("this policy is language-conditioned: pass the instructions")
        s = self.stats
        f, p = _head_inputs(
            s,
            features,
            proprio,
            language if self.uses_language else None,
            self.uses_image,
            self.uses_proprio,
        )
        return self.head(f, p) * s["act_std"] + s["act_mean"]

    @property
    def action_scale(self) -> torch.Tensor:
        """Per-dimension action standard deviation (what relative deviation is measured in)."""
        return self.stats["act_std"]


def _head_inputs(
    stats: dict[str, torch.Tensor],
    features: torch.Tensor,
    proprio: torch.Tensor,
    language: torch.Tensor | None,
    use_image: bool,
    use_proprio: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a head reads, z-scored with the policy's stats: image features (or none) and
    proprio (or none) followed by the instruction embedding when `language` is given."""
    f = (features - stats["feat_mean"]) / stats["feat_std"] if use_image else features[:, :0]
    p = (proprio - stats["prop_mean"]) / stats["prop_std"] if use_proprio else proprio[:, :0]
    if language is not None:
        p = torch.cat([p, (language - stats["lang_mean"]) / stats["lang_std"]], dim=-1)
    return f, p


def save_policy(
    folder: Path, head: nn.Module, spec: dict[str, Any], stats: dict[str, torch.Tensor]
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
    p_in += spec.get("language_dim", 0) if spec["inputs"].get("language") else 0
    head = build_head(spec, f_in, p_in)
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


Embedder = Callable[[Sequence[str]], torch.Tensor]


def instruction_embedder(bundle: Any) -> Embedder:
    """Instructions -> the backbone's unit language embeddings (B, embed_dim): its frozen
    sentence encoder and projection, which adaptation never changes."""
    from dynaflip_adapt.models.text import embed_instructions

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        table = embed_instructions(bundle.model.cfg.text_encoder, texts)
        rows = torch.from_numpy(np.stack([table[t] for t in texts])).float()
        return bundle.model.embed_text(rows)

    return embed


def collect(
    logs: Any,
    reader: Any,
    image_size: int,
    max_frames: int | None = None,
    language: Embedder | None = None,
) -> dict[str, torch.Tensor]:
    """Frames (at input size), proprio and actions of every episode, with episode ids; with
    `language`, also each frame's instruction embedding (every episode needs an instruction).

    Raises:
        InputError: `language` given and an episode has no instruction.
    """
    from dynaflip_adapt.train.triplets import resize_uint8

    if language is not None:
        for ep in logs.episodes:
            if not ep.language:
                raise InputError(
                    ep.file,
                    f"{ep.group} language",
                    "no instruction",
                    "an instruction for every episode (the policy is language-conditioned; "
                    "train with --no-language otherwise)",
                )
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
    if language is not None:
        texts = [str(ep.language) for ep in logs.episodes]
        out["language"] = language(texts)[out["episode"]]
    if max_frames is not None and len(out["rgb"]) > max_frames:
        sel = torch.linspace(0, len(out["rgb"]) - 1, max_frames).round().long()
        out = {k: v[sel] for k, v in out.items()}
    return out


def action_chunks(actions: torch.Tensor, episode: torch.Tensor, horizon: int) -> torch.Tensor:
    """(N, horizon, A): actions t .. t + horizon - 1 of each frame's episode, the episode's last
    action repeated past its end (frames must be in episode order)."""
    n = len(actions)
    idx = torch.arange(n)[:, None] + torch.arange(horizon)[None]
    idx = idx.clamp(max=n - 1)
    # Past the episode's end: hold its last frame.
    last = torch.zeros(n, dtype=torch.long)
    for e in episode.unique():
        rows = (episode == e).nonzero().flatten()
        last[rows] = rows.max()
    idx = torch.minimum(idx, last[:, None])
    return actions[idx]


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
    episode: torch.Tensor | None = None,
    horizon: int = HORIZON,
    language: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor], float]:
    """Fits a head on z-scored inputs and actions; returns it, its stats and the final loss.
    With `language` (N, L) the head is also conditioned on the instruction embeddings;
    `on_step(step, loss)` is called after every optimizer step.

    Gaussian noise on the z-scored image features during training (and weight decay) keeps the
    head smooth: an unregularised head fitted to a few hundred frames turned a 5% feature change
    into a 0.9-std action change, failing every audit whatever the adapter. The diffusion head
    needs `episode` (frame -> episode id, frames in order) to cut action chunks.
    """
    torch.manual_seed(seed)
    eps = 1e-6
    stats = {
        "feat_mean": features.mean(0),
        "feat_std": _floored_std(features),
        "prop_mean": proprio.mean(0),
        "prop_std": proprio.std(0) + eps,
        "act_mean": actions.mean(0),
        "act_std": actions.std(0) + eps,
    }
    if language is not None:
        stats |= {"lang_mean": language.mean(0), "lang_std": _floored_std(language)}
    f, p = _head_inputs(
        stats, features, proprio, language, head in IMAGE_HEADS, head in PROPRIO_HEADS
    )
    y = (actions - stats["act_mean"]) / stats["act_std"]
    model: nn.Module
    if head == "diffusion":
        if episode is None:
            raise ValueError("the diffusion head needs the frames' episode ids")
        y = action_chunks(y, episode, horizon)
        model = DiffusionHead(f.shape[1], p.shape[1], y.shape[-1], hidden, 3, horizon)
    else:
        model = MLPHead(f.shape[1], p.shape[1], y.shape[1], hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g)
        fi = f[idx]
        if feature_noise > 0 and fi.shape[1] > 0:
            fi = fi + feature_noise * torch.randn(fi.shape, generator=g)
        if isinstance(model, DiffusionHead):
            loss = model.loss(fi, p[idx], y[idx], generator=g)
        else:
            loss = ((model(fi, p[idx]) - y[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
    model.eval()
    return model, stats, float(loss.detach())


def _floored_std(x: torch.Tensor) -> torch.Tensor:
    # A floor on the per-dimension std: z-scoring a nearly constant feature would turn a tiny
    # drift into a large input change, making the policy (and its audit) hypersensitive.
    std = x.std(0)
    return torch.maximum(std, 0.1 * std.median()) + 1e-6


def policy_spec(
    head: str,
    feature_dim: int,
    proprio_dim: int,
    action_dim: int,
    tolerance: float,
    pin: dict[str, Any],
    extra: dict[str, Any] | None = None,
    language_dim: int = 0,
) -> dict[str, Any]:
    """The JSON spec of a policy head (`language_dim` > 0: conditioned on instructions)."""
    return {
        "head": head,
        "inputs": {
            "image": head in IMAGE_HEADS,
            "proprio": head in PROPRIO_HEADS,
            "language": language_dim > 0,
        },
        "feature_dim": feature_dim,
        "proprio_dim": proprio_dim,
        "language_dim": language_dim,
        "action_dim": action_dim,
        "hidden": 256,
        "layers": 3 if head == "diffusion" else 2,
        "tolerance": tolerance,
        "pin": pin,
        "created": time.time(),
        **(
            {"diffusion": {"horizon": HORIZON, "train_steps": 100, "sample_steps": 10}}
            if head == "diffusion"
            else {}
        ),
        **(extra or {}),
    }


def fit_policy(
    encoder: nn.Module,
    preprocess: Any,
    data: dict[str, torch.Tensor],
    *,
    head: str,
    tolerance: float,
    pin: dict[str, Any],
    steps: int = 1500,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Policy, float]:
    """Trains a head on `encoder`'s features of `data` (from `collect`) -> an unsaved policy
    (spec, weights, stats incl. a 64-frame probe of its own frames) and its final train loss.
    The policy is language-conditioned when `data` carries instruction embeddings."""
    feats = encode_frames(encoder, preprocess, data["rgb"])
    language = data.get("language")
    model, stats, loss = train_head(
        feats,
        data["proprio"],
        data["actions"],
        head=head,
        steps=steps,
        seed=seed,
        episode=data["episode"],
        language=language,
        on_step=on_step,
    )
    sel = torch.linspace(0, len(data["rgb"]) - 1, min(64, len(data["rgb"]))).round().long()
    stats |= {"probe_rgb": data["rgb"][sel], "probe_proprio": data["proprio"][sel]}
    if language is not None:
        stats["probe_language"] = language[sel]
    spec = policy_spec(
        head,
        feats.shape[1],
        data["proprio"].shape[1],
        data["actions"].shape[1],
        tolerance,
        pin,
        {"train_loss": loss, "train_frames": len(feats), **(extra or {})},
        language_dim=0 if language is None else language.shape[1],
    )
    return Policy(None, spec, model, stats), loss
