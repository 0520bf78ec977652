"""Attention rollout against a hand computation, and the inspect command's PNG."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.inspect_attention import HEADER, attention_rollout, overlay
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
    rgb = np.zeros((20, 30, 3), np.uint8)
    out = overlay(rgb, np.ones((4, 4)), alpha=0.5)
    assert out.shape == (20, 30, 3) and out.max() > 0


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
