"""Helpers shared by the benchmarks: a matmul FLOP/s ceiling and FLOP counting."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def matmul_flops_per_s(n: int = 1024, reps: int = 20) -> float:
    """Measured fp32 matmul FLOP/s on this machine, now (the compute ceiling)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch dispatches while running `fn` (matmuls, convs, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def timed(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Seconds per call (mean over `reps` after `warmup`)."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


SIZES = ["tiny", "small", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224"]


def model_config(size: str):
    """A pretrain recipe's model (``tiny``, ``small``: the shipped size) or a timm ViT size at
    224 px (what `backbones import` registers)."""
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.models.backbone import BackboneConfig
    from dynaflip_adapt.models.vit import TIMM_ARCHS
    from dynaflip_adapt.train.pretrain import backbone_config

    if size in TIMM_ARCHS:
        patch, width, depth, heads = TIMM_ARCHS[size]
        return BackboneConfig(
            image_size=224, patch_size=patch, width=width, depth=depth, heads=heads
        )
    return backbone_config(load_recipe(f"pretrain/{size}")[0])
