"""Bring your own backbone: timm-named ViT checkpoints imported, adapted, audited and exported."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.vit import TIMM_ARCHS, VisionTransformer, load_timm_checkpoint
from tests.builders import expected_verdict, write_native

runner = CliRunner()
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def timm_state(vit: VisionTransformer, classes: int = 10) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's names, plus a classifier head as timm ships it."""
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    state["head.weight"] = torch.randn(classes, vit.width)
    state["head.bias"] = torch.zeros(classes)
    return state


def small_vit(depth: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(32, 8, 32, depth, 2, 4.0)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"blocks.0.ls1.gamma": torch.ones(32)}), "LayerScale"),
        (lambda s: s.update({"norm_pre.weight": torch.ones(32)}), "pre-norm"),
        (lambda s: s.update({"fc_norm.weight": torch.ones(32)}), "average pooling"),
        (lambda s: s.update({"blocks.2.norm1.weight": torch.ones(32)}), "blocks.2.norm1"),
        (lambda s: s.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
        (lambda s: s.update({"visual.ln_pre.weight": torch.ones(32)}), "open_clip"),
    ],
)
def test_checkpoints_that_would_change_the_features_are_refused(tmp_path, edit, message):
    state = timm_state(small_vit())
    edit(state)
    p = tmp_path / "vit.safetensors"
    save_file(state, str(p))
    target = small_vit()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(InputError, match=message):
        load_timm_checkpoint(target, p)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded half-way


def test_unreadable_and_pickled_checkpoints_are_refused(tmp_path):
    bad = tmp_path / "vit.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(InputError, match="unreadable"):
        load_timm_checkpoint(small_vit(), bad)
    with pytest.raises(InputError, match="safetensors"):
        load_timm_checkpoint(small_vit(), tmp_path / "vit.pth")


def test_register_tokens_and_class_free_position_embeddings_map_exactly(tmp_path):
    src = small_vit()
    patches = src.pos_embed.detach()[:, 1:]
    # timm's register layout: [CLS, 4 registers, patches]; the registers are dropped.
    state = timm_state(src)
    regs = torch.randn(1, 4, 32)
    state["reg_token"] = torch.randn(1, 4, 32)
    state["pos_embed"] = torch.cat([src.pos_embed.detach()[:, :1], regs, patches], dim=1)
    save_file(state, str(tmp_path / "reg.safetensors"))
    got = small_vit(depth=2)
    torch.nn.init.normal_(got.pos_embed)
    ignored = load_timm_checkpoint(got, tmp_path / "reg.safetensors")
    assert ignored == ["head.bias", "head.weight", "reg_token"]
    torch.testing.assert_close(got.pos_embed.detach(), src.pos_embed.detach())
    # no_embed_class: the file holds patch positions only and CLS gets none, which is the same
    # sum as a zero CLS position.
    state = timm_state(src)
    state["pos_embed"] = patches.clone()
    save_file(state, str(tmp_path / "noclass.safetensors"))
    load_timm_checkpoint(got, tmp_path / "noclass.safetensors")
    torch.testing.assert_close(got.pos_embed.detach()[:, 1:], patches)
    assert float(got.pos_embed.detach()[:, 0].abs().max()) == 0.0


def ok(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, (args, r.output)
    return json.loads(r.stdout)


def hand_merged(image: VisionTransformer, adapter: Path) -> VisionTransformer:
    """The encoder with W0 + (alpha / r) * B @ A added by hand from the adapter's PEFT files."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    model = copy.deepcopy(image).eval()
    state = model.state_dict()
    for key, a in lora.items():
        if ".lora_A." in key:
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            layer = key.split("base_model.model.", 1)[1].split(".lora_A.", 1)[0]
            state[f"{layer}.weight"] = state[f"{layer}.weight"] + cfg["lora_alpha"] / cfg["r"] * (
                b @ a
            )
    model.load_state_dict(state)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_small_patch16_224"])
def test_imported_vit_at_224_is_finetuned_audited_and_exported(tmp_path, arch):
    """import -> (refused without frames to hold) -> policy -> finetune -> audit -> export, at
    the real size of timm's ViT-T/16 and ViT-S/16."""
    patch, width, depth, heads = TIMM_ARCHS[arch]
    torch.manual_seed(1)
    src = VisionTransformer(224, patch, width, depth, heads, 4.0)
    ckpt = tmp_path / f"{arch}.safetensors"
    save_file(timm_state(src, classes=1000), str(ckpt))
    logs, _ = write_native(tmp_path / "base.h5", n=3, varied_language=True, T=8)
    site, _ = write_native(tmp_path / "site.h5", n=2, varied_language=True, T=8)

    mean, std = ",".join(map(str, IMAGENET_MEAN)), ",".join(map(str, IMAGENET_STD))
    imp = ok(["backbones", "import", str(ckpt), "--arch", arch, "--name", "mine",
              "--mean", mean, "--std", std])  # fmt: skip
    assert imp["ignored"] == ["head.bias", "head.weight"]
    version = imp["backbone"]["version"]
    assert "mine" in imp["backbone"]["aliases"] and imp["backbone"]["tags"]["source"] == "imported"
    from dynaflip_adapt.outputs import sha256_file

    assert imp["checkpoint_sha256"] == "sha256:" + sha256_file(ckpt)
    shown = ok(["backbones", "show", "--backbone", "mine"])
    man = shown["manifest"]
    assert man["heads"] == "untrained" and man["architecture"]["width"] == width
    assert man["preprocessing"]["mean"] == list(IMAGENET_MEAN)
    # The registered encoder computes what the checkpoint computes.
    from dynaflip_adapt.models.backbone import load_bundle

    bundle = load_bundle(shown["path"])
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.image(x), src(x))
    base = [v for v in ok(["backbones", "list"]) if "base" in v["aliases"]]
    assert [v["tags"]["source"] for v in base] == ["shipped"]  # the shipped one stays base

    # An imported tower holds no replay frames and its heads are untrained: without --retain
    # nothing would anchor the adapter, so finetune refuses and registers nothing.
    fast = ["--set", "data.num_workers=0", "--set", "optim.batch_size=4", "--set", "data.gap=1"]
    r = runner.invoke(app, ["finetune", str(site), "--site", "lab", "-b", "mine",
                            "--max-steps", "2", *fast])  # fmt: skip
    assert r.exit_code == 2 and "--retain" in r.output, r.output
    assert ok(["adapters", "list"]) == []

    pol = ok(["policies", "train", str(logs), "--site", "lab", "-b", "mine", "--steps", "20",
              "--tolerance", "0.5"])  # fmt: skip
    assert pol["policy"]["tags"]["backbone_fingerprint"] == imp["backbone"]["tags"]["fingerprint"]
    ft = ok(["finetune", str(site), "--site", "lab", "-b", "mine", "--retain", str(logs),
             "--max-steps", "2", *fast])  # fmt: skip
    assert any("untrained" in w for w in ft["warnings"])
    assert set(ft["final"]) >= {"distill_replay", "invariance"}
    assert not {"area", "contrastive", "cosine", "single_frame"} & set(ft["final"])
    adapter = ft["adapter"]["version"]
    report = ok(["audit", adapter, "--site", "lab"])
    assert [p["policy"] for p in report["policies"]] == [f"lab-bc (v{pol['policy']['version']})"]
    assert report["verdict"] == expected_verdict(report)

    out = ok(["export", adapter, "--out", str(tmp_path / "export")])
    assert out["merged_vs_unmerged_max_abs"] < 1e-4
    import importlib.util

    spec = importlib.util.spec_from_file_location("exported", Path(out["folder"]) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from dynaflip_adapt.registry.adapters import resolve_adapter
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    folder, _ = resolve_adapter(Registry(resolve_store(None)), adapter)
    with torch.no_grad():
        want = hand_merged(src, folder)(x)
        got = mod.load(out["folder"])(x)
        assert float((want - src(x)).abs().max()) > 0  # the adapter changed something
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert version != "1"


@pytest.mark.slow
def test_pretrain_from_an_imported_tower_keeps_its_encoder_and_preprocessing(tmp_path):
    patch, width, depth, heads = TIMM_ARCHS["vit_tiny_patch16_224"]
    torch.manual_seed(2)
    src = VisionTransformer(224, patch, width, depth, heads, 4.0)
    ckpt = tmp_path / "vit.safetensors"
    save_file(timm_state(src), str(ckpt))
    logs, _ = write_native(tmp_path / "base.h5", n=4, varied_language=True, T=8)
    imp = ok(["backbones", "import", str(ckpt), "--arch", "vit_tiny_patch16_224",
              "--mean", ",".join(map(str, IMAGENET_MEAN))])  # fmt: skip
    res = ok(["pretrain", str(logs), "-r", "pretrain/tiny", "--from", imp["backbone"]["version"],
              "--steps", "2", "--set", "data.gap=1", "--set", "optim.lr=1e-12",
              "--set", "optim.batch_size=4"])  # fmt: skip
    tags = res["backbone"]["tags"]
    assert tags["parent_backbone"] == imp["backbone"]["tags"]["fingerprint"]
    assert tags["image_size"] == "224" and tags["feature_dim"] == str(width)
    from dynaflip_adapt.models.backbone import load_bundle

    new = load_bundle(res["bundle"])
    assert new.has_heads and new.model.cfg.mean == IMAGENET_MEAN
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(new.model.image(x), src(x), atol=1e-4, rtol=1e-4)
    # A recipe of another shape cannot silently replace the encoder's architecture: --from wins.
    assert (
        json.loads(Path(res["bundle"], "manifest.json").read_text())["architecture"]["depth"] == 12
    )
    r = runner.invoke(app, ["pretrain", str(logs), "--from", "1", "--init-image", str(ckpt)])
    assert r.exit_code == 2 and "--init-image" in r.output


def test_import_bad_options_exit_2_and_register_nothing(tmp_path):
    ckpt = tmp_path / "vit.safetensors"
    save_file(timm_state(small_vit()), str(ckpt))
    cases = [
        (["--arch", "vit_huge_patch14_224"], "vit_tiny_patch16_224"),
        (["--arch", "vit_tiny_patch16_224", "--image-size", "100"], "multiple of the patch"),
        (["--arch", "vit_tiny_patch16_224", "--name", "v3"], "--name"),
        (["--arch", "vit_tiny_patch16_224", "--name", "base"], "--set-base"),
        (["--arch", "vit_tiny_patch16_224", "--mean", "0.5,0.5"], "--mean"),
        (["--arch", "vit_tiny_patch16_224"], "shape"),  # width 32 is not ViT-T's 192
    ]
    for args, message in cases:
        r = runner.invoke(app, ["backbones", "import", str(ckpt), *args])
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    listed = ok(["backbones", "list"])
    assert [v["tags"].get("source") for v in listed] == ["shipped"]
