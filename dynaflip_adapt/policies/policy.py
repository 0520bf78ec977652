"""A policy: its spec (what it reads, its pin and tolerance), its head, its input statistics.

A policy folder holds ``policy.json`` (head type and sizes, input spec, the tolerance it
declares, its pin: backbone fingerprint + adapter, how it was trained) and
``policy.safetensors`` (head weights and input/action statistics).

What a head reads (`HeadKind.reads`):

- ``features``: the backbone image encoder's pooled (CLS) features, frozen;
- ``tokens``: the backbone's patch tokens (B, N, D), frozen;
- ``state``: the simulator's true object state (the oracle; simulator only);
- ``pixels``: raw frames, through a CNN of its own trained from scratch (no backbone);
- ``none``: nothing but proprio (the blind control).

Heads that read the backbone (``features``, ``tokens``) are what adapters must not break: the
audit holds adapters to them. The others are references and controls.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import read_json_manifest, verify_files
from dynaflip_adapt.outputs import sha256_file, writing
from dynaflip_adapt.policies.heads import (
    HORIZON,
    DiffusionHead,
    MLPHead,
    ObjectHead,
    PixelHead,
    TokenHead,
)

POLICY_VERSION = 1
SPEC = "policy.json"
WEIGHTS = "policy.safetensors"


@dataclass(frozen=True)
class HeadKind:
    """A reference head: what it reads, its network, and its training defaults."""

    name: str
    reads: str  # features | tokens | state | pixels | none
    proprio: bool
    network: str  # mlp | diffusion | tokens | pixels | objects
    description: str
    hidden: int = 256
    layers: int = 2
    steps: int = 2000
    # Trained with its estimate of the objects held to the logged object state (`ObjectHead`):
    # needs logs that record it; reads only `reads` at run time.
    needs_state: bool = False


HEAD_KINDS: dict[str, HeadKind] = {
    k.name: k
    for k in (
        HeadKind("bc", "features", True, "mlp", "MLP on frozen backbone features + proprio"),
        HeadKind(
            "diffusion",
            "features",
            True,
            "diffusion",
            "diffusion policy over 4-action chunks on backbone features + proprio",
            layers=3,
        ),
        HeadKind(
            "tokens", "tokens", True, "tokens", "attention pooling over backbone patch tokens"
        ),
        HeadKind("image_only", "features", False, "mlp", "control: backbone features, no proprio"),
        HeadKind("proprio_only", "none", True, "mlp", "control: no image at all (blind)"),
        HeadKind(
            "cnn",
            "pixels",
            True,
            "pixels",
            "baseline: a CNN trained from scratch on the frames (spatial softmax, random shift)",
            steps=3000,
        ),
        HeadKind(
            "objects",
            "tokens",
            True,
            "objects",
            "backbone patch tokens -> where the instructed object and the plate are -> action "
            "(training needs logs with object state)",
            steps=4000,
            needs_state=True,
        ),
        HeadKind(
            "cnn_objects",
            "pixels",
            True,
            "objects",
            "baseline: the same estimate-then-act head on a CNN trained from scratch",
            steps=4000,
            needs_state=True,
        ),
        HeadKind(
            "oracle",
            "state",
            True,
            "mlp",
            "reference: the simulator's true object positions (simulator logs only)",
            hidden=512,
            layers=3,
            steps=10000,
        ),
    )
}
HEADS = tuple(HEAD_KINDS)
# Heads that read the backbone's image features: what the audit holds an adapter to.
IMAGE_HEADS = tuple(k for k, v in HEAD_KINDS.items() if v.reads in ("features", "tokens"))
# What a head reads that comes from the frames (through the backbone, or as pixels).
FRAME_READS = ("features", "tokens", "pixels")
FRAME_HEADS = tuple(k for k, v in HEAD_KINDS.items() if v.reads in FRAME_READS)
PROPRIO_HEADS = tuple(k for k, v in HEAD_KINDS.items() if v.proprio)


def build_head(spec: dict[str, Any], feature_dim: int, proprio_dim: int) -> nn.Module:
    """The head module a spec describes (input sizes after the spec's input selection)."""
    kind = HEAD_KINDS[spec["head"]]
    hidden, layers = spec.get("hidden", kind.hidden), spec.get("layers", kind.layers)
    if kind.network == "diffusion":
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
    if kind.network == "tokens":
        return TokenHead(feature_dim, proprio_dim, spec["action_dim"], hidden, layers)
    if kind.network == "pixels":
        return PixelHead(proprio_dim, spec["action_dim"], hidden, layers)
    if kind.network == "objects":
        lang = spec.get("language_dim", 0) if spec.get("inputs", {}).get("language") else 0
        return ObjectHead(
            kind.reads, feature_dim, proprio_dim, spec["action_dim"], hidden, layers, lang
        )
    return MLPHead(feature_dim, proprio_dim, spec["action_dim"], hidden, layers)


def reads_of(spec: dict[str, Any]) -> str:
    """What a spec's head reads (specs written before `reads` existed read CLS features)."""
    inputs = spec["inputs"]
    if "reads" in inputs:
        return str(inputs["reads"])
    return "features" if inputs.get("image") else "none"


@dataclass
class Policy:
    """A loaded policy: its spec and a callable head on raw (unnormalized) inputs."""

    path: Path | None
    spec: dict[str, Any]
    head: nn.Module
    stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def reads(self) -> str:
        """What the head reads: features, tokens, state, pixels or none."""
        return reads_of(self.spec)

    @property
    def uses_image(self) -> bool:
        """Reads the backbone's image features (so adapters are audited against it)."""
        return self.reads in ("features", "tokens")

    @property
    def uses_proprio(self) -> bool:
        return bool(self.spec["inputs"]["proprio"])

    @property
    def uses_language(self) -> bool:
        return bool(self.spec["inputs"].get("language", False))

    @property
    def image_size(self) -> int | None:
        """Input size of a pixel head's frames (None for other heads)."""
        size = self.spec.get("image_size")
        return int(size) if size else None

    def act(
        self,
        inputs: torch.Tensor,
        proprio: torch.Tensor,
        language: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Actions (B, A) in the logs' units.

        Args:
            inputs: What the head reads: backbone features (B, F) or tokens (B, N, D), oracle
                features (`oracle_features`), uint8 frames (B, 3, S, S), or anything (B, ...)
                for a blind head.
            proprio: (B, P).
            language: Instruction embeddings (B, L) (`instruction_embedder`), for a
                language-conditioned policy.
        """
        if self.uses_language and language is None:
            raise ValueError("this policy is language-conditioned: pass the instructions")
        s = self.stats
        f, p = head_inputs(
            s, inputs, proprio, language if self.uses_language else None, self.reads,
            self.uses_proprio,
        )  # fmt: skip
        return decode_actions(s, self.head(f, p))

    @property
    def action_scale(self) -> torch.Tensor:
        """Per-dimension action standard deviation (what relative deviation is measured in)."""
        return self.stats["act_std"]


def decode_actions(stats: dict[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Head outputs (B, A) -> actions in the logs' units. Binary dimensions (a gripper's
    open/close) are trained as logits: their action is the expected value between the two
    values (continuous, so audits measure how far a decision moved, not only whether it
    flipped)."""
    a = out * stats["act_std"] + stats["act_mean"]
    if "bin_mask" in stats:
        m = stats["bin_mask"].bool()
        lo, hi = stats["bin_lo"], stats["bin_hi"]
        a = torch.where(m, lo + (hi - lo) * torch.sigmoid(out), a)
    return a


def head_inputs(
    stats: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    proprio: torch.Tensor,
    language: torch.Tensor | None,
    reads: str,
    use_proprio: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a head reads, normalized with the policy's stats: its image/state input (z-scored
    features, per-channel z-scored tokens, raw pixels, or nothing) and proprio (or nothing)
    followed by the instruction embedding when `language` is given."""
    if reads in ("features", "state", "tokens"):
        f = (inputs - stats["feat_mean"]) / stats["feat_std"]
    elif reads == "pixels":
        f = inputs
    else:
        f = inputs.reshape(len(inputs), -1)[:, :0]
    p = (proprio - stats["prop_mean"]) / stats["prop_std"] if use_proprio else proprio[:, :0]
    if language is not None:
        p = torch.cat([p, (language - stats["lang_mean"]) / stats["lang_std"]], dim=-1)
    return f, p


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
    kind = HEAD_KINDS[head]
    return {
        "head": head,
        "inputs": {
            "image": kind.reads in ("features", "tokens"),
            "reads": kind.reads,
            "proprio": kind.proprio,
            "language": language_dim > 0,
        },
        "feature_dim": feature_dim,
        "proprio_dim": proprio_dim,
        "language_dim": language_dim,
        "action_dim": action_dim,
        "hidden": kind.hidden,
        "layers": kind.layers,
        "tolerance": tolerance,
        "pin": pin,
        **(
            {"diffusion": {"horizon": HORIZON, "train_steps": 100, "sample_steps": 10}}
            if kind.network == "diffusion"
            else {}
        ),
        **(extra or {}),
    }


def save_policy(
    folder: Path, head: nn.Module, spec: dict[str, Any], stats: dict[str, torch.Tensor]
) -> Path:
    """Writes a policy folder (weights + stats in safetensors, spec with sha256s in JSON)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tensors |= {f"stats.{k}": v.detach().cpu().contiguous() for k, v in stats.items()}
    spec = {**spec, "kind": "dynaflip-policy", "policy_version": POLICY_VERSION}
    tmp = folder / f".{SPEC}.tmp"
    with writing(folder, "the policy"):
        save_file(tensors, str(folder / WEIGHTS))
        spec["files"] = {WEIGHTS: "sha256:" + sha256_file(folder / WEIGHTS)}
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


def head_dims(spec: dict[str, Any]) -> tuple[int, int]:
    """(input width, conditioning width) of a spec's head, as `build_head` takes them."""
    reads = reads_of(spec)
    f_in = spec["feature_dim"] if reads in ("features", "tokens", "state") else 0
    p_in = spec["proprio_dim"] if spec["inputs"]["proprio"] else 0
    p_in += spec.get("language_dim", 0) if spec["inputs"].get("language") else 0
    return f_in, p_in


def load_policy(folder: str | Path) -> Policy:
    """Loads a verified policy folder (safetensors + JSON only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    spec = read_policy_spec(folder)
    t = load_file(str(folder / WEIGHTS))
    head = build_head(spec, *head_dims(spec))
    try:
        head.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("head.")})
    except RuntimeError as exc:
        first = str(exc).split("\n\t")[1] if "\n\t" in str(exc) else str(exc)
        raise InputError(
            folder / WEIGHTS, "head", f"weights that do not fit {SPEC} ({first.strip()})",
            f"the weights of the head {SPEC} describes",
        ) from None  # fmt: skip
    head.eval()
    stats = {k[6:]: v for k, v in t.items() if k.startswith("stats.")}
    return Policy(folder, spec, head, stats)
