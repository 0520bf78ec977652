"""``loss.policies``: the pinned policies' frozen heads as an adaptation objective."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None, reason="needs the sim extra"
)
runner = CliRunner()
FT = ["--set", "data.num_workers=0", "--set", "optim.batch_size=8", "--set", "optim.lr=3e-3",
      "--set", "optim.warmup_steps=3", "--set", "ema.enabled=false"]  # fmt: skip


def ok(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, (args, r.output)
    return json.loads(r.stdout)


def _gen(path: Path, site: str, seed: int) -> str:
    ok(["sim", "generate", str(path), "--site", site, "-n", "6", "--frames", "16", "--size", "32",
        "--workers", "1", "--seed", str(seed), "--overwrite"])  # fmt: skip
    return str(path)


def _error(policy, encoder, bundle, data) -> float:
    """Action error (action-std units; binary dimensions as the probability of the logged
    value's complement) of `policy` through `encoder` on collected demonstrations, computed
    from `Policy.act` (decoded actions), not from the objective's code."""
    from dynaflip_adapt.policies import encode_frames

    x = encode_frames(encoder, bundle.model.preprocess, data["rgb"], view=policy.reads)
    with torch.no_grad():
        a = policy.act(x, data["proprio"], data.get("language"))
    st = policy.stats
    err = ((a - data["actions"]) / st["act_std"]) ** 2
    if "bin_mask" in st:
        m = st["bin_mask"].bool()
        prob = ((a - st["bin_lo"]) / (st["bin_hi"] - st["bin_lo"])).clamp(1e-6, 1 - 1e-6)
        hit = data["actions"] == st["bin_hi"]
        bce = -torch.where(hit, prob.log(), (1 - prob).log())
        err = torch.where(m, bce, err)
    return float(err.mean())


def test_the_objective_is_each_heads_own_loss_and_the_adapter_learns_what_they_read(tmp_path):
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.models.adapter import load_adapter, read_adapter_manifest
    from dynaflip_adapt.models.backbone import load_bundle
    from dynaflip_adapt.policies import collect, instruction_embedder, load_policy
    from dynaflip_adapt.policies.adaptation import Demonstrations, PolicyObjective
    from dynaflip_adapt.train.distributed import init_from_env

    base = _gen(tmp_path / "base.h5", "base", 0)
    night = _gen(tmp_path / "night.h5", "night_shift", 5)
    ok(["pretrain", base, "-r", "pretrain/tiny", "--set", "data.num_workers=0", "--set",
        "optim.max_steps=40", "--set-base"])  # fmt: skip
    bc = ok(["policies", "train", base, "--site", "night", "--steps", "150", "--name", "bc"])
    obj = ok(["policies", "train", base, "--site", "night", "--head", "objects", "--steps", "150",
              "--name", "obj"])  # fmt: skip
    ok(["policies", "train", base, "--site", "night", "--head", "proprio_only", "--steps", "20"])
    pols = {
        name: load_policy(ok(["policies", "show", out["policy"]["version"]])["path"])
        for name, out in (("bc", bc), ("obj", obj))
    }
    bundle = load_bundle(ok(["backbones", "show"])["path"])
    size = bundle.model.cfg.image_size
    embed = instruction_embedder(bundle)
    data = collect(open_logs(night), EpisodeReader(), size, None, embed, True, True)

    # 1. With the base encoder, the objective on drawn frames is the mean of each head's own loss,
    # the same as the error computed independently from its decoded actions (bc).
    only_bc = PolicyObjective(
        [("bc", pols["bc"])], [Demonstrations.from_collected("site", data)], 64
    )
    torch.manual_seed(0)
    frames = only_bc.draw(init_from_env(), torch.device("cpu"))
    drawn = only_bc._drawn[0]
    enc = bundle.model.image.eval()
    with torch.no_grad():
        value = float(only_bc.loss(enc(bundle.model.preprocess(frames), all_tokens=True)))
    sub = {k: v[drawn] for k, v in data.items()}
    assert value == pytest.approx(_error(pols["bc"], enc, bundle, sub), rel=1e-4)

    # 2. Through the CLI: the adapter trained with the term lowers a pinned head's error on the
    # site's demonstrations, more than the same recipe without it; the lineage names the heads.
    runs = {}
    for weight in (0, 1):
        out = ok(["finetune", night, "--site", "night", "--retain", base, "--steps", "80", *FT,
                  "--set", f"loss.policies={weight}", "--set", "loss.distill_tokens=true",
                  "--strength", "1"])  # fmt: skip
        manifest = read_adapter_manifest(out["folder"])
        runs[weight] = (out, manifest, load_adapter(bundle, out["folder"]).merged().eval())
    lineage = runs[1][1]["lineage"]
    assert sorted(lineage["policies_held"]) == sorted(
        f"{name} (v{o['policy']['version']}) on site, retained demonstrations"
        for name, o in (("bc", bc), ("obj", obj))
    )  # the blind control reads no image: not held
    assert "policies_held" not in runs[0][1]["lineage"]
    assert runs[1][1]["active_losses"]["policies"] == 1 and runs[1][0]["final"]["policies"] > 0
    # (The tiny object head barely reads its 32-px frames; the bc head does.)
    before = _error(pols["bc"], enc, bundle, data)
    without, with_term = (_error(pols["bc"], runs[w][2], bundle, data) for w in (0, 1))
    assert with_term < 0.9 * min(before, without), (before, without, with_term)


def test_without_pinned_image_policies_the_term_is_off_with_a_warning(tmp_path):
    base = _gen(tmp_path / "base.h5", "base", 0)
    ok(["pretrain", base, "-r", "pretrain/tiny", "--set", "data.num_workers=0", "--set",
        "optim.max_steps=5", "--set-base"])  # fmt: skip
    out = ok(["finetune", base, "--site", "lab", "--steps", "2", *FT, "--set", "loss.policies=1",
              "--dry-run"])  # fmt: skip
    assert any("loss.policies" in w for w in out["warnings"])
