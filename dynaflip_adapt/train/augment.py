"""kornia augmentation of uint8 frames, shared by pretraining and site adaptation."""

from __future__ import annotations

from typing import Any

import torch

from dynaflip_adapt.config import AugmentSection


def build_augment(cfg: AugmentSection, size: int, *, crop: bool = True) -> Any:
    """The kornia pipeline for site frames (float in [0, 1], B x 3 x S x S), or None.

    Photometric shifts (colour, white balance, shadows, gamma, noise) stand for lighting and
    texture changes; a mild resized crop for small camera moves (``crop=False``: photometric
    only).
    """
    import kornia.augmentation as K

    if not cfg.enabled:
        return None
    geometric = [K.RandomResizedCrop((size, size), scale=cfg.crop_scale, ratio=(0.95, 1.05), p=1.0)]
    return K.AugmentationSequential(
        *(geometric if crop else []),
        K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=0.8),
        K.RandomPlanckianJitter(mode="blackbody", p=cfg.planckian_p),
        K.RandomPlasmaShadow(roughness=(0.1, 0.7), shade_intensity=(-0.5, 0.0), p=cfg.shadow_p),
        K.RandomGamma(gamma=(0.7, 1.4), p=cfg.gamma_p),
        K.RandomGaussianNoise(std=max(cfg.noise_std, 1e-6), p=0.5 if cfg.noise_std > 0 else 0.0),
    )


def augment_pair(
    aug: Any, rgb0: torch.Tensor, rgb1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same augmentation draw for both frames of each transition; uint8 in, uint8 out."""
    if aug is None:
        return rgb0, rgb1
    x0 = aug_frames(aug, rgb0)  # draws the parameters frame 1 reuses
    return x0, _to_uint8(aug(rgb1.float() / 255.0, params=aug._params))


def aug_frames(aug: Any, rgb: torch.Tensor) -> torch.Tensor:
    """Single frames through the augmentation (a fresh draw); uint8 in, uint8 out."""
    return _to_uint8(aug(rgb.float() / 255.0))


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 (kornia can leave [0, 1]: clamp)."""
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def site_style(
    frames: torch.Tensor,
    style: torch.Tensor,
    band: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Frames restyled with another site's appearance (Fourier domain adaptation, Yang & Soatto
    2020): each frame keeps its phase (where edges and objects are) and takes the amplitude of
    its lowest spatial frequencies (lighting, colour cast, shading, texture statistics) from a
    random frame of ``style``. uint8 (N, 3, H, W) in and out; ``style`` (M, 3, H, W), same size.

    ``band`` is the half-width of the swapped square of frequencies as a fraction of the image
    side: 0 swaps only each channel's mean (its DC term), larger values more of the appearance.
    """
    if frames.shape[1:] != style.shape[1:]:
        raise ValueError(f"style frames {tuple(style.shape[1:])} != {tuple(frames.shape[1:])}")
    if len(frames) == 0 or len(style) == 0:
        return frames
    pick = torch.randint(0, len(style), (len(frames),), generator=generator, device=style.device)
    src = torch.fft.fft2(frames.float())
    amp = torch.fft.fft2(style[pick].float()).abs()
    h, w = frames.shape[-2:]
    b = max(0, round(band * min(h, w)))
    # Circular frequency index: k and size - k are the same |frequency| in fft2's layout.
    fh = torch.arange(h, device=frames.device)
    fw = torch.arange(w, device=frames.device)
    low = (torch.minimum(fh, h - fh)[:, None] <= b) & (torch.minimum(fw, w - fw)[None, :] <= b)
    mixed = torch.polar(torch.where(low, amp, src.abs()), src.angle())
    return torch.fft.ifft2(mixed).real.clamp(0, 255).round().to(torch.uint8)


def appearance_views(
    rgb: torch.Tensor,
    styles: torch.Tensor | None,
    *,
    seed: int,
    band: float = 0.06,
    chunk: int = 1024,
) -> torch.Tensor:
    """One appearance-shifted copy of uint8 frames (N, 3, H, W), same geometry: half the frames
    first take the look of a random ``styles`` frame (`site_style`: e.g. the backbone's replay
    frames from its pretraining sites), then every frame gets the default photometric draw
    (colour, white balance, shadows, gamma, noise; no crop). Deterministic in ``seed``; the
    global RNG is left as it was."""
    from dynaflip_adapt.config import AugmentSection

    size = int(rgb.shape[-1])
    aug = build_augment(AugmentSection(), size, crop=False)
    if styles is not None and tuple(styles.shape[-2:]) != tuple(rgb.shape[-2:]):
        from dynaflip_adapt.data.frames import resize_uint8

        styles = resize_uint8(styles, size)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(rgb)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(rgb), chunk):
            x = rgb[i : i + chunk]
            if styles is not None and len(styles):
                pick = torch.rand(len(x), generator=g) < 0.5
                x = x.clone()
                x[pick] = site_style(x[pick], styles, band, g)
            out[i : i + chunk] = aug_frames(aug, x)
    return out
