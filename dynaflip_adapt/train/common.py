"""Pieces shared by the training loops: devices, seeds, schedules, resumable sampling and
crash-safe checkpoints."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from dynaflip_adapt.config import OptimSection
from dynaflip_adapt.errors import InputError, RuntimeFailure
from dynaflip_adapt.outputs import writing


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else Apple's MPS when present, else CPU.

    Raises:
        InputError: ``cuda`` or ``mps`` asked for on a machine without it.
    """
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if (name == "cuda" and not torch.cuda.is_available()) or (name == "mps" and not has_mps):
        raise InputError(None, "run.device", f"{name!r} on a machine without it", "auto or cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str = "auto") -> Any:
    """The autocast context of a training step: ``bf16`` (the default on CUDA) runs matmuls in
    bfloat16 (losses are cast back to fp32), ``fp32`` (the default elsewhere) runs everything in
    float32."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not bf16:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on `device` (other values unchanged)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `floor`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class ResumableSampler(Sampler[int]):
    """An endless stream of indices: a fresh seeded permutation per epoch.

    ``start`` skips the samples already consumed, so a resumed run sees exactly the batches an
    uninterrupted run would have seen. With ``groups`` (a group id per index, e.g. the log file
    of each pair) and ``chunk``, each epoch is a shuffled sequence of chunks of ``chunk``
    indices drawn from one group each, so a batch of ``k * chunk`` holds ``k`` groups.
    """

    def __init__(
        self, n: int, seed: int, start: int = 0, groups: Any = None, chunk: int = 0
    ) -> None:
        self.n, self.seed, self.start = n, seed, start
        self.groups = None if groups is None or chunk <= 0 else torch.as_tensor(groups)
        self.chunk = chunk

    def _epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.groups is None:
            return perm.tolist()
        chunks: list[list[int]] = []
        members = self.groups[perm]
        for gid in torch.unique(self.groups).tolist():
            mine = perm[members == gid].tolist()
            chunks += [mine[i : i + self.chunk] for i in range(0, len(mine), self.chunk)]
        order = torch.randperm(len(chunks), generator=g).tolist()
        return [i for k in order for i in chunks[k]]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)
        while True:
            yield from self._epoch(epoch)[offset:]
            offset = 0
            epoch += 1


CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def save_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Writes a checkpoint atomically (temp file + rename), keeping the previous one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT
    tmp = folder / f".{CHECKPOINT}.{os.getpid()}.tmp"
    try:
        with writing(path, "the checkpoint", after="the previous one is kept"):
            torch.save(state, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if path.exists():
                os.replace(path, folder / PREVIOUS)
            os.replace(tmp, path)
    except OSError as exc:
        raise RuntimeFailure(
            f"{path}: could not write checkpoint ({exc.strerror or exc})"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)  # gone already once renamed into place
    return path


def load_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint (falls back to the previous one if the newest is
    truncated or corrupt); ``None`` when there is none."""
    for name in (CHECKPOINT, PREVIOUS):
        p = folder / name
        if not p.exists():
            continue
        try:
            return dict(torch.load(p, map_location="cpu", weights_only=True))
        except Exception:
            continue
    return None


def rng_state() -> dict[str, Any]:
    """The torch RNG state (the loops draw randomness from torch only; per-item sampling is
    seeded by index)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------- the step, shared by loops


def optimizer(
    params: list[torch.nn.Parameter], o: OptimSection, total: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` with the recipe's linear warm-up and cosine decay over `total` steps."""
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=o.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, o.warmup_steps, total)
    )
    return opt, sched


def update(
    loss: torch.Tensor,
    step: int,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: list[torch.nn.Parameter],
    grad_clip: float,
) -> None:
    """One optimizer step on `loss`: refuses a non-finite loss (one line naming the step),
    then backward, gradient-norm clipping, the step and the schedule."""
    if not torch.isfinite(loss):
        raise RuntimeFailure(
            f"step {step}: loss is {float(loss.detach())}; lower optim.lr or check the logs"
        )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()


def checkpoint_due(step: int, every: int, total: int, is_main: bool) -> bool:
    """Whether the loop checkpoints after `step` (0-based) steps: every `every` steps on the
    main process, never at the last (the run's output is written then)."""
    return is_main and (step + 1) % every == 0 and step + 1 < total
