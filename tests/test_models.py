"""Encoders and bundles: timm naming, checkpoint loading, integrity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Backbone, BackboneConfig, load_bundle, save_bundle
from dynaflip_adapt.models.flow_encoder import FlowEncoder, flow_features
from dynaflip_adapt.models.text import HashedTextEncoder, embed_instructions, get_text_encoder
from dynaflip_adapt.models.vit import VisionTransformer, load_timm_checkpoint

TINY = BackboneConfig(
    image_size=32,
    patch_size=8,
    width=32,
    depth=2,
    heads=2,
    embed_dim=16,
    text_encoder="hashed",
    flow_points=16,
    flow_width=16,
)


def test_vit_parameter_names_follow_timm():
    vit = VisionTransformer(32, 8, 32, 2, 2, 4.0)
    keys = set(vit.state_dict())
    for k in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.1.norm1.weight",
              "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight", "blocks.0.norm2.bias",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "norm.weight"):  # fmt: skip
        assert k in keys, k
    x = torch.randn(3, 3, 32, 32)
    assert vit(x).shape == (3, 32)
    assert vit.patch_tokens(x).shape == (3, 32, 4, 4)
    maps = vit.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (3, 2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 2, 17))


def test_attention_matches_an_explicit_softmax():
    vit = VisionTransformer(16, 8, 16, 1, 2, 2.0).eval()
    blk = vit.blocks[0]
    x = torch.randn(2, 5, 16)
    attn = blk.attn(x, return_attention=True)  # (B, heads, N, N)
    qkv = blk.attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    v = qkv[2]
    manual = (attn @ v).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(blk.attn(x), blk.attn.proj(manual), rtol=1e-5, atol=1e-5)


def test_timm_checkpoint_loads_with_pos_embed_resize_and_ignored_heads(tmp_path):
    src = VisionTransformer(64, 8, 32, 2, 2, 4.0)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 32)
    p = tmp_path / "vit.safetensors"
    save_file(state, str(p))
    same = VisionTransformer(64, 8, 32, 2, 2, 4.0)
    assert load_timm_checkpoint(same, p) == ["head.weight"]
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(same(x), src(x))
    smaller = VisionTransformer(32, 8, 32, 2, 2, 4.0)  # 4x4 grid from an 8x8 one
    load_timm_checkpoint(smaller, p)
    torch.testing.assert_close(smaller.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(InputError, match="shape"):
        load_timm_checkpoint(VisionTransformer(64, 8, 48, 2, 2, 4.0), p)
    with pytest.raises(InputError, match="safetensors"):
        load_timm_checkpoint(same, tmp_path / "vit.pth")


def test_flow_encoder_ignores_masked_points_and_order():
    enc = FlowEncoder(16, 8).eval()
    pts, delta = torch.randn(2, 10, 3), torch.randn(2, 10, 3) * 0.01
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    f = flow_features(pts, delta, mask)
    out = enc(f, mask)
    pts2 = pts.clone()
    pts2[:, 7:] += 100.0  # garbage in masked slots
    out2 = enc(flow_features(pts2, delta, mask), mask)
    torch.testing.assert_close(out, out2)
    perm = torch.randperm(7)
    idx = torch.cat([perm, torch.arange(7, 10)])
    out3 = enc(flow_features(pts[:, idx], delta[:, idx], mask[:, idx]), mask[:, idx])
    torch.testing.assert_close(out, out3, rtol=1e-5, atol=1e-5)
    # Translation invariance (world frames differ between robots).
    out4 = enc(flow_features(pts + torch.tensor([5.0, -2.0, 1.0]), delta, mask), mask)
    torch.testing.assert_close(out, out4, rtol=1e-4, atol=1e-4)


def test_hashed_text_encoder_is_deterministic_and_cached():
    enc = HashedTextEncoder()
    a = enc.encode(["push the red cube", "push the red cube", "reach the green cylinder"])
    assert a.shape == (3, 384)
    torch.testing.assert_close(torch.from_numpy(a[0]), torch.from_numpy(a[1]))
    assert abs(float((a[0] * a[2]).sum())) < 0.9
    table = embed_instructions("hashed", ["b", "a", "b"])
    assert sorted(table) == ["a", "b"]
    with pytest.raises(InputError, match="hashed"):
        get_text_encoder("bert")


def test_bundle_round_trip_and_integrity(tmp_path):
    torch.manual_seed(0)
    model = Backbone(TINY).eval()
    replay = {"rgb0": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)}
    out = save_bundle(model, tmp_path / "b", replay=replay, replay_instructions=["x"] * 4)
    b = load_bundle(out)
    rgb = torch.randint(0, 255, (2, 3, 48, 48), dtype=torch.uint8)
    torch.testing.assert_close(b.model.features(rgb), model.features(rgb))
    assert b.fingerprint.startswith("sha256:") and torch.equal(b.replay["rgb0"], replay["rgb0"])
    assert b.manifest["preprocessing"]["channel_order"] == "RGB"
    # Tampered weights are refused.
    heads = out / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-5] ^= 0xFF
    heads.write_bytes(bytes(data))
    with pytest.raises(InputError, match="tampered"):
        load_bundle(out)


def test_bundle_fingerprint_depends_only_on_the_weights(tmp_path):
    # safetensors writes __metadata__ from a Rust HashMap whose order changes between calls:
    # the image file carries two metadata keys, so saving the same weights gave different
    # fingerprints (the shipped backbone's rerun did). Ten saves must give one fingerprint.
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = Backbone(TINY)
    prints = {load_bundle(save_bundle(model, tmp_path / f"b{i}")).fingerprint for i in range(10)}
    assert len(prints) == 1
    image = tmp_path / "b0" / "image_encoder.safetensors"
    with safe_open(str(image), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "naming": "timm-vit"}
    state = {k[len("image.") :]: v for k, v in model.state_dict().items() if k.startswith("image.")}
    loaded = load_file(str(image))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # The header stays a valid, 8-byte-aligned safetensors header.
    n = int.from_bytes(image.read_bytes()[:8], "little")
    assert n % 8 == 0


def test_bundle_refuses_path_traversal_and_truncation(tmp_path):
    out = save_bundle(Backbone(TINY), tmp_path / "b")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["../evil.safetensors"] = m["files"].pop("heads.safetensors")
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="outside the bundle"):
        load_bundle(out)
    out2 = save_bundle(Backbone(TINY), tmp_path / "c")
    img = out2 / "image_encoder.safetensors"
    img.write_bytes(img.read_bytes()[:100])
    with pytest.raises(InputError, match="tampered or truncated"):
        load_bundle(out2)


def test_pos_embed_resize_keeps_rows_as_rows(tmp_path):
    """A checkpoint whose position embedding encodes (row, column) in two channels, resized from
    an 8x8 to a 4x4 grid: channel 0 must still vary down the rows only and channel 1 across the
    columns only (a transposed resize swaps them; a square grid hides it from a shape check)."""
    src = VisionTransformer(64, 8, 32, 2, 2, 4.0)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    pos = state["pos_embed"].clone()
    pos[0, 1:, 0] = rows.reshape(-1)
    pos[0, 1:, 1] = cols.reshape(-1)
    state["pos_embed"] = pos
    p = tmp_path / "vit.safetensors"
    save_file(state, str(p))
    smaller = VisionTransformer(32, 8, 32, 2, 2, 4.0)
    load_timm_checkpoint(smaller, p)
    grid = smaller.pos_embed.detach()[0, 1:, :2].reshape(4, 4, 2)
    torch.testing.assert_close(grid[..., 0], grid[:, :1, 0].expand(4, 4))  # constant in a row
    torch.testing.assert_close(grid[..., 1], grid[:1, :, 1].expand(4, 4))  # constant in a column
    assert bool((grid[1:, 0, 0] > grid[:-1, 0, 0]).all())  # rows increase downwards
    assert bool((grid[0, 1:, 1] > grid[0, :-1, 1]).all())
    torch.testing.assert_close(smaller.pos_embed.detach()[0, 0], pos[0, 0])  # CLS kept


def test_minilm_encoder_of_the_shipped_backbone_embeds_meaning():
    """all-MiniLM-L6-v2 from its wheel (the shipped backbone's language anchor): unit vectors of
    384 dimensions, deterministic, and a paraphrase sits closer than another task on another
    object (which a hashed bag of words cannot do: the pairs below share no more words)."""
    enc = get_text_encoder("minilm")
    texts = [
        "push the red cube to the left",
        "slide the red block leftwards",
        "reach above the blue cylinder",
        "push the red cube to the left",
    ]
    e = enc.encode(texts)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e[0], e[3], atol=1e-6)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.1, (e[0] @ e[1], e[0] @ e[2])
