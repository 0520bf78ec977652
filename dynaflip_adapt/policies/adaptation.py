"""The pinned policies as an adaptation objective (``loss.policies``): the adapter is trained so
that the frozen heads of the policies pinned to a site, reading the adapted encoder, do what
their own training asked of them on demonstrations: the site's logs (the shift to undo) and the
retained logs (what must keep working). The heads never change; only the adapter does.

Why: the teacher terms hold base-site features in place and the anchors keep the geometry, but
neither tells the encoder what a head reads at the new site. On the simulator's warm_dim preset
adapters without this term left two object heads at the blind control's success (4-5 of 90);
with it, 51 and 46 of 90, base-site success within its interval, audit passed
(docs/results/2026-12-07-policy-objective.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dynaflip_adapt.policies.heads import ESTIMATE_COLUMNS, ESTIMATE_UNIT
from dynaflip_adapt.policies.policy import Policy, head_inputs
from dynaflip_adapt.policies.training import action_chunks, head_loss, normalized_targets

if TYPE_CHECKING:
    from dynaflip_adapt.train.distributed import Dist

# Frames of each demonstration set the policies read per step and process.
DEMO_FRAMES = 32
# Demonstration frames kept in memory per set (spread evenly over the episodes).
MAX_DEMO_FRAMES = 8192


@dataclass
class Demonstrations:
    """Demonstration frames (uint8 at the encoder's input size) with what the policies read
    beside them and what they were trained to output (`collect` of a log set)."""

    name: str  # "site" or "retained"
    rgb: torch.Tensor
    proprio: torch.Tensor
    actions: torch.Tensor
    episode: torch.Tensor
    language: torch.Tensor | None = None
    state: torch.Tensor | None = None  # the oracle's input (object heads' estimate target)
    target_index: torch.Tensor | None = None

    @classmethod
    def from_collected(cls, name: str, data: dict[str, torch.Tensor]) -> Demonstrations:
        return cls(
            name,
            data["rgb"],
            data["proprio"],
            data["actions"],
            data["episode"],
            data.get("language"),
            data.get("state"),
            data.get("target_index"),
        )


@dataclass
class _Target:
    """One policy's normalized targets on one demonstration set."""

    y: torch.Tensor
    bin_mask: torch.Tensor
    estimate: torch.Tensor | None


class PolicyObjective:
    """``loss.policies`` for `finetune`'s step objective: each step draws `per_step` frames of
    every demonstration set (`draw`, encoded by the student in the step's one forward pass),
    then `loss` is the mean over sets and policies of each frozen head's own training loss
    (`head_loss`) on the student's tokens or pooled feature."""

    name = "policies"

    def __init__(
        self,
        policies: list[tuple[str, Policy]],
        demos: list[Demonstrations],
        per_step: int = DEMO_FRAMES,
    ) -> None:
        if not policies or not demos:
            raise ValueError("the policy objective needs policies and demonstrations")
        self.policies = policies
        self.demos = demos
        self.per_step = per_step
        for _, pol in policies:
            pol.head.eval().requires_grad_(False)
        self.targets: dict[tuple[int, int], _Target] = {}
        for i, (_, pol) in enumerate(policies):
            for j, d in enumerate(demos):
                y, mask = normalized_targets(pol.stats, d.actions)
                spec = pol.spec.get("diffusion")
                if spec:
                    y = action_chunks(y, d.episode, int(spec["horizon"]))
                est = None
                if d.state is not None and d.target_index is not None:
                    est = d.state[:, list(ESTIMATE_COLUMNS)] * ESTIMATE_UNIT
                self.targets[i, j] = _Target(y, mask, est)
        self._drawn: list[torch.Tensor] = []

    @property
    def frames_per_step(self) -> int:
        return self.per_step * len(self.demos)

    def draw(self, dist: Dist, device: torch.device) -> torch.Tensor:
        """This step's frames of every set (drawn for the global batch from the global RNG,
        the same on every rank, then this rank's share), uint8 on `device`."""
        self._drawn = [
            dist.shard(torch.randint(0, len(d.rgb), (self.per_step,))) for d in self.demos
        ]
        return torch.cat([d.rgb[i] for d, i in zip(self.demos, self._drawn, strict=True)]).to(
            device
        )

    def loss(self, out: torch.Tensor) -> torch.Tensor:
        """The objective on the student's tokens (n, 1 + N, D), CLS first, for the drawn
        frames: token heads read the patch tokens, feature heads the pooled CLS."""
        dev = out.device
        total = out.new_zeros(())
        parts = out.split([len(i) for i in self._drawn])
        for j, (d, idx, tokens) in enumerate(zip(self.demos, self._drawn, parts, strict=True)):
            idx = idx.cpu()
            for i, (_, pol) in enumerate(self.policies):
                inputs = tokens[:, 1:] if pol.reads == "tokens" else tokens[:, 0]
                lang = (
                    d.language[idx].to(dev)
                    if pol.uses_language and d.language is not None
                    else None
                )
                stats = {k: v.to(dev) for k, v in pol.stats.items()}
                f, p = head_inputs(
                    stats, inputs, d.proprio[idx].to(dev), lang, pol.reads, pol.uses_proprio
                )
                t = self.targets[i, j]
                est = state = which = None
                if t.estimate is not None and d.state is not None and d.target_index is not None:
                    est, state = t.estimate[idx].to(dev), d.state[idx].to(dev)
                    which = d.target_index[idx].to(dev)
                y, mask = t.y[idx].to(dev), t.bin_mask.to(dev)
                head = pol.head.to(dev)
                total = total + head_loss(head, f.float(), p.float(), y, mask, est, state, which)
        return total / (len(self.demos) * len(self.policies))
