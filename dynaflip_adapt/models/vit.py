"""A plain-PyTorch Vision Transformer named like timm's `VisionTransformer`.

Parameter names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.norm2``, ``blocks.N.mlp.fc1/fc2``,
``norm``) match timm, so a local timm / DINOv2 / CLIP-style ViT checkpoint (safetensors) loads
without timm, and PEFT can target the Linear layers by name.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# This module imports only torch: `export` copies it verbatim next to exported weights so that a
# consumer can rebuild the encoder without dynaflip-adapt installed.


class PatchEmbed(nn.Module):
    """Image (B, 3, H, W) -> patch tokens (B, N, width)."""

    def __init__(self, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear and an output ``proj`` Linear."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, C / heads)
        if return_attention:
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            return attn.softmax(dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT image encoder: normalized image (B, 3, S, S) -> CLS features (B, width).

    Args:
        image_size: Input size S (square).
        patch_size: Patch size; divides S.
        width: Token width.
        depth: Number of blocks.
        heads: Attention heads; divide width.
        mlp_ratio: MLP hidden size / width.
    """

    def __init__(
        self, image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.patch_embed = PatchEmbed(image_size, patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens (B, 1 + N, width), CLS first."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, all_tokens: bool = False) -> torch.Tensor:
        """CLS features (B, width): what downstream policies consume; with ``all_tokens`` every
        output token (B, 1 + N, width), CLS first (one forward for training code that reads both
        through a PEFT or DDP wrapper, which pass keyword arguments on)."""
        t = self.tokens(x)
        return t if all_tokens else t[:, 0]

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens as a spatial map (B, width, grid, grid)."""
        t = self.tokens(x)[:, 1:]
        g = self.patch_embed.grid
        return t.transpose(1, 2).reshape(t.shape[0], self.width, g, g)

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-block attention probabilities (B, heads, 1 + N, 1 + N), for rollout."""
        maps = []
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        for blk in self.blocks:
            assert isinstance(blk, Block)
            maps.append(blk.attn(blk.norm1(h), return_attention=True))
            h = blk(h)
        return maps


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# timm's plain ViTs (patch 16, 224 px, MLP ratio 4): name -> (patch_size, width, depth, heads).
TIMM_ARCHS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
}
# Keys a timm checkpoint may carry that this encoder does without: classifier heads and pooling
# heads (the CLS feature is the output), the mask token of masked pretraining, and extra tokens
# (registers, DeiT's distillation token) that are dropped, so the sequence is [CLS, patches].
IGNORABLE = ("head.", "head_dist.", "attn_pool.", "mask_token", "reg_token", "dist_token")
# Layers some ViT families add inside the computation this encoder keeps: loading around them
# would give different features silently, so such checkpoints are refused.
UNSUPPORTED = {
    ".ls1.": "LayerScale (DeiT-III / DINOv2)",
    ".ls2.": "LayerScale (DeiT-III / DINOv2)",
    "norm_pre.": "a pre-norm before the blocks (CLIP-style)",
    ".q_norm.": "query/key normalization",
    ".k_norm.": "query/key normalization",
    "patch_embed.norm.": "a norm after the patch embedding",
    "fc_norm.": "average pooling with fc_norm instead of the CLS token",
}
# open_clip's visual tower (alone, or under ``visual.`` in a full CLIP checkpoint).
OPEN_CLIP_PREFIXES = ("visual.", "transformer.resblocks.", "class_embedding", "conv1.", "ln_pre.")


def load_timm_checkpoint(model: VisionTransformer, path: str | Path) -> list[str]:
    """Initialises from a local timm-named ViT checkpoint (safetensors), without timm.

    ``pos_embed`` is resized bicubically when the patch grid differs (a prefix of extra tokens
    is dropped); classifier heads, registers and other tokens this model lacks are ignored and
    returned. Layers that would change the kept computation are refused, never skipped.

    Raises:
        InputError: Not safetensors, unreadable, open_clip naming, layers this ViT lacks, or
            shapes that cannot be mapped (other width, depth or patch size).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from dynaflip_adapt.errors import InputError

    p = Path(path)
    if p.suffix != ".safetensors":
        raise InputError(
            p, None, f"a {p.suffix or 'suffix-less'} file", "a .safetensors checkpoint"
        )
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            p, None, f"an unreadable file ({exc})", "a safetensors checkpoint"
        ) from None
    clip = next((k for k in state if k.startswith(OPEN_CLIP_PREFIXES)), None)
    if clip is not None:
        raise InputError(
            p,
            clip,
            "open_clip naming (its ln_pre has no counterpart here)",
            "timm ViT names (cls_token, pos_embed, patch_embed.proj, blocks.N...)",
        )
    own = model.state_dict()
    loaded, ignored = {}, []
    extra_tokens = sum(int(state[k].shape[1]) for k in ("reg_token", "dist_token") if k in state)
    for k, v in sorted(state.items()):
        for marker, what in UNSUPPORTED.items():
            if marker in k:
                raise InputError(p, k, what, "a plain timm ViT (no layers this encoder lacks)")
        if k not in own:
            if k.startswith(IGNORABLE):
                ignored.append(k)
                continue
            raise InputError(p, k, "a weight this ViT does not have", _shape_hint(model))
        if k == "pos_embed" and v.shape != own[k].shape and v.shape[-1] == own[k].shape[-1]:
            v = _map_pos_embed(v, own[k].shape[1] - 1, extra_tokens)
        if v.shape != own[k].shape:
            raise InputError(p, k, f"shape {tuple(v.shape)}", f"shape {tuple(own[k].shape)}")
        loaded[k] = v
    missing = [k for k in own if k not in loaded]
    if missing:
        raise InputError(p, missing[0], "missing", f"all ViT weights ({len(missing)} missing)")
    model.load_state_dict(loaded)
    return ignored


def _shape_hint(model: VisionTransformer) -> str:
    return (
        f"a ViT of depth {len(model.blocks)}, width {model.width}, patch {model.patch_size}"
        " (check --arch)"
    )


def _map_pos_embed(pos: torch.Tensor, num_patches: int, extra_tokens: int) -> torch.Tensor:
    """A checkpoint's position embedding -> (1, 1 + num_patches, width), CLS first.

    timm lays it out as [CLS, extra tokens..., patches] or, with ``no_embed_class``, as patches
    only (the prefix tokens get no position embedding: a zero CLS entry is the same sum).
    """
    n = pos.shape[1]
    if math.isqrt(n) ** 2 == n:
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    elif extra_tokens and math.isqrt(n - 1 - extra_tokens) ** 2 == n - 1 - extra_tokens:
        pos = torch.cat([pos[:, :1], pos[:, 1 + extra_tokens :]], dim=1)
    if pos.shape[1] - 1 != num_patches and math.isqrt(pos.shape[1] - 1) ** 2 == pos.shape[1] - 1:
        pos = _resize_pos_embed(pos, num_patches)
    return pos


def _resize_pos_embed(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    cls, grid = pos[:, :1], pos[:, 1:]
    old = math.isqrt(grid.shape[1])
    new = math.isqrt(num_patches)
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)
