"""Attention rollout against a hand computation, and the inspect command's PNG."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.eval.attention import HEADER, attention_rollout, overlay
from dynaflip_adapt.models.vit import VisionTransformer
from tests.builders import write_native


def test_rollout_of_one_block_is_its_mixed_cls_row():
    torch.manual_seed(0)
    vit = VisionTransformer(16, 8, 16, 1, 2, 2.0).eval()
    x = torch.randn(2, 3, 16, 16)
    a = vit.attention_maps(x)[0].mean(dim=1)  # (B, 5, 5)
    mixed = 0.5 * a + 0.5 * torch.eye(5)
    mixed = mixed / mixed.sum(-1, keepdim=True)
    cls = mixed[:, 0, 1:]
    expected = (cls - cls.amin(1, keepdim=True)) / (
        cls.amax(1, keepdim=True) - cls.amin(1, keepdim=True)
    )
    got = attention_rollout(vit, x)
    assert got.shape == (2, 2, 2)
    torch.testing.assert_close(got.reshape(2, 4), expected)


def test_overlay_keeps_size_and_blends():
    """alpha * jet(heat) + (1 - alpha) * frame, per pixel: a constant heat of 1 is jet's dark
    red (128, 0, 0) in RGB; blended at 0.25 over a grey frame each channel sits a quarter of the
    way from the frame to it (not the heat map alone, not the frame alone)."""
    rgb = np.full((20, 30, 3), 100, np.uint8)
    rgb[:, :15] = 200
    out = overlay(rgb, np.ones((4, 4)), alpha=0.25)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    jet_top = np.array([128, 0, 0], np.float64)
    expected = np.round(0.25 * jet_top + 0.75 * rgb.astype(np.float64))
    np.testing.assert_allclose(out, expected, atol=1)
    assert not np.array_equal(out[:, :15], out[:, 15:])  # the frame shows through
    np.testing.assert_array_equal(overlay(rgb, np.ones((4, 4)), alpha=0.0), rgb)


def test_rollout_of_two_blocks_multiplies_later_blocks_on_the_left():
    """Abnar & Zuidema: R = A_L ... A_2 A_1 (each A mixed with the identity, rows normalised).
    A reversed product only differs with two or more blocks; computed here by hand."""
    torch.manual_seed(1)
    vit = VisionTransformer(16, 8, 16, 2, 2, 2.0).eval()
    x = torch.randn(3, 3, 16, 16)
    mixed = []
    for a in vit.attention_maps(x):
        m = 0.5 * a.mean(dim=1) + 0.5 * torch.eye(5)
        mixed.append(m / m.sum(-1, keepdim=True))
    cls = (mixed[1] @ mixed[0])[:, 0, 1:]
    expected = (cls - cls.amin(1, keepdim=True)) / (
        cls.amax(1, keepdim=True) - cls.amin(1, keepdim=True)
    )
    reversed_cls = (mixed[0] @ mixed[1])[:, 0, 1:]
    assert not torch.allclose(cls, reversed_cls, atol=1e-4)  # the check can tell them apart
    torch.testing.assert_close(attention_rollout(vit, x).reshape(3, 4), expected)


def test_inspect_writes_a_png(tmp_path):
    import cv2

    p, _ = write_native(tmp_path / "s.h5", n=2)
    from dynaflip_adapt.models.backbone import Backbone, BackboneConfig, save_bundle

    b = save_bundle(
        Backbone(BackboneConfig(32, 8, 32, 2, 2, 2.0, 16, "hashed", 8, 16)), tmp_path / "bb"
    )
    r = CliRunner().invoke(
        app,
        [
            "inspect",
            str(p),
            "--backbone",
            str(b),
            "--out",
            str(tmp_path / "a.png"),
            "-n",
            "3",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    img = cv2.imread(out["png"])
    # A label strip, then 3 rows x (frame | base), upscaled x3.
    assert img.shape == (HEADER + 3 * 32 * 3, 2 * 32 * 3, 3)
