"""Downstream policies: the consumers of backbone features that an adapter must not break, and
the reference heads and controls the evaluation holds them to.

- `policy`: a policy's spec, loading and saving, and the catalogue of heads (`HEAD_KINDS`).
- `heads`: the networks (MLP, diffusion, token attention pooling, from-scratch CNN).
- `training`: collecting inputs from logs and fitting a head with a held-out split.
"""

from dynaflip_adapt.policies.heads import HORIZON, DiffusionHead, MLPHead, PixelHead, TokenHead
from dynaflip_adapt.policies.policy import (
    FRAME_HEADS,
    HEAD_KINDS,
    HEADS,
    IMAGE_HEADS,
    PROPRIO_HEADS,
    SPEC,
    WEIGHTS,
    HeadKind,
    Policy,
    build_head,
    load_policy,
    policy_spec,
    read_policy_spec,
    save_policy,
)
from dynaflip_adapt.policies.training import (
    Embedder,
    HeadFit,
    action_chunks,
    actions_on_frames,
    collect,
    encode_frames,
    fit_head,
    fit_policy,
    head_input,
    instruction_embedder,
    oracle_features,
    policy_input,
    train_head,
)

__all__ = [
    "FRAME_HEADS",
    "HEADS",
    "HEAD_KINDS",
    "HORIZON",
    "IMAGE_HEADS",
    "PROPRIO_HEADS",
    "SPEC",
    "WEIGHTS",
    "DiffusionHead",
    "Embedder",
    "HeadFit",
    "HeadKind",
    "MLPHead",
    "PixelHead",
    "Policy",
    "TokenHead",
    "action_chunks",
    "actions_on_frames",
    "build_head",
    "collect",
    "encode_frames",
    "fit_head",
    "fit_policy",
    "head_input",
    "instruction_embedder",
    "load_policy",
    "oracle_features",
    "policy_input",
    "policy_spec",
    "read_policy_spec",
    "save_policy",
    "train_head",
]
