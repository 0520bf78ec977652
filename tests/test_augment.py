"""`site_style`: restyling source frames with a site's appearance (Fourier domain adaptation),
checked against closed forms and an independent numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaflip_adapt.train.augment import site_style


def _frames(seed: int, n: int, lo: int, hi: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_band_zero_swaps_only_each_channels_mean():
    """With band 0 only the DC term moves: out = src - mean(src) + mean(style) per channel
    (the DC phase of a non-negative image is 0), which no clamp touches in these ranges."""
    src, style = _frames(0, 4, 100, 150), _frames(1, 1, 60, 90)
    out = site_style(src, style, 0.0).double()
    want = (
        src.double()
        - src.double().mean((2, 3), keepdim=True)
        + style.double().mean((2, 3), keepdim=True)
    )
    assert (out - want).abs().max() <= 0.5 + 1e-9


def test_matches_an_independent_numpy_fda():
    """Amplitude of |k_h|, |k_w| <= round(band * side) from the style frame, phase kept, against
    numpy's FFT with the square of low frequencies built by explicit loops."""
    src, style = _frames(2, 3, 0, 256), _frames(3, 1, 0, 256)
    band = 0.13
    out = site_style(src, style, band).numpy().astype(np.int64)
    size = src.shape[-1]
    b = round(band * size)
    s = np.fft.fft2(src.numpy().astype(np.float64))
    a = np.abs(np.fft.fft2(style.numpy().astype(np.float64)))[0]
    amp = np.abs(s).copy()
    for i in range(size):
        for j in range(size):
            if min(i, size - i) <= b and min(j, size - j) <= b:
                amp[:, :, i, j] = a[:, i, j]
    want = np.clip(np.round(np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(s))))), 0, 255)
    assert np.abs(out - want).max() <= 1


def test_full_band_keeps_the_phase_and_takes_the_style_amplitude():
    """Band 0.5 swaps every frequency: the result is the style frame's amplitude under the
    source's phase, so a source equal to the style comes back unchanged, and a shifted copy of
    the style (same amplitude, other phase) stays the shifted copy."""
    style = _frames(4, 1, 0, 256)
    assert torch.equal(site_style(style, style, 0.5), style)
    shifted = torch.roll(style, shifts=(3, 5), dims=(2, 3))
    assert torch.equal(site_style(shifted, style, 0.5), shifted)


def test_each_frame_draws_its_style_from_the_pool():
    """Two style frames of different means: with band 0 every output channel mean is one of
    theirs, and over 64 frames both are drawn."""
    src = _frames(5, 64, 100, 150)
    style = torch.stack([torch.full((3, 16, 16), 40, dtype=torch.uint8),
                         torch.full((3, 16, 16), 200, dtype=torch.uint8)])  # fmt: skip
    means = site_style(src, style, 0.0, torch.Generator().manual_seed(0)).double().mean((1, 2, 3))
    near = torch.minimum((means - 40).abs(), (means - 200).abs())
    assert float(near.max()) < 1.0
    assert bool((means < 120).any()) and bool((means > 120).any())


def test_size_mismatch_is_refused():
    with pytest.raises(ValueError, match="style frames"):
        site_style(_frames(0, 1, 0, 9, 16), _frames(0, 1, 0, 9, 8), 0.1)
