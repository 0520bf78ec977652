"""Data parallelism under ``torchrun`` (torch.distributed: gloo on CPU, nccl on CUDA).

Outside torchrun (no ``WORLD_SIZE`` in the environment) everything here is a no-op with
world size 1. Under torchrun every rank runs the same recipe; each takes an equal, disjoint
slice of every global batch, so a run with N processes follows the same trajectory as one
process with the same global batch (up to float reduction order).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from dynaflip_adapt.errors import InputError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of a global batch along dim 0."""
        if not self.enabled:
            return x
        n = x.shape[0] // self.world
        return x[self.rank * n : (self.rank + 1) * n]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's `x` in rank order, with gradients flowing back to each
        rank's own slice (for in-batch negatives over the global batch)."""
        if not self.enabled:
            return x
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)

    def wrap(self, module: torch.nn.Module, device: torch.device, find_unused: bool = False) -> Any:
        """The module wrapped in DistributedDataParallel (gradients averaged over ranks);
        `find_unused` when some trainable parameters may get no gradient in a step."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)


def init_from_env() -> Dist:
    """Joins the torchrun job described by the environment (once); world 1 outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank, world, local)


def check_batch(dist: Dist, batch_size: int, replay: int) -> None:
    """Global batches must split evenly over the ranks.

    Raises:
        InputError: A batch (or replay share) not divisible by the world size.
    """
    for key, n in (("optim.batch_size", batch_size), ("replay share of the batch", replay)):
        if n % dist.world:
            raise InputError(
                None, key, f"{n} with {dist.world} processes", f"a multiple of {dist.world}"
            )


class ShardedBatches(Sampler[list[int]]):
    """Global batches of `batch` consecutive indices from `order`; yields this rank's slice (a
    last, short batch of a finite order is split evenly too)."""

    def __init__(self, order: Any, batch: int, dist: Dist) -> None:
        self.order, self.batch, self.dist = order, batch, dist

    def __iter__(self) -> Iterator[list[int]]:
        n = self.batch // self.dist.world
        buf: list[int] = []
        for i in self.order:
            buf.append(int(i))
            if len(buf) == self.batch:
                yield buf[self.dist.rank * n : (self.dist.rank + 1) * n]
                buf = []
        if buf:
            n = len(buf) // self.dist.world
            if n:
                yield buf[self.dist.rank * n : (self.dist.rank + 1) * n]
