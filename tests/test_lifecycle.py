"""Policies, audit, promote / rollback / history and export, through the CLI on a real registry."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from tests.builders import expected_verdict

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs the sim extra"),
    pytest.mark.shared_home,
    pytest.mark.slow,  # one registry with trained policies and adapters for the module
]
runner = CliRunner()
FAST = ["--set", "data.num_workers=0", "--set", "optim.batch_size=8"]


def ok(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, (args, r.output)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry with a tiny base backbone, a policy at site 'lab', a gentle and a wild adapter."""
    import os

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("DYNAFLIP_HOME")
    os.environ["DYNAFLIP_HOME"] = str(home)
    d = tmp_path_factory.mktemp("logs")
    r = runner.invoke(
        app,
        [
            "sim",
            "generate",
            str(d / "lab.h5"),
            "-n",
            "4",
            "--frames",
            "16",
            "--size",
            "32",
            "--workers",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    logs = str(d / "lab.h5")
    ok(["pretrain", logs, "-r", "pretrain/tiny", "--set", "data.num_workers=0", "--set-base"])
    policy = ok(
        ["policies", "train", logs, "--site", "lab", "--steps", "200", "--tolerance", "0.2"]
    )
    gentle = ok(
        ["finetune", logs, "--site", "lab", "--max-steps", "2", *FAST, "--set", "optim.lr=1e-9"]
    )
    wild = ok(["finetune", logs, "--site", "lab", "--max-steps", "25", *FAST, "--set", "optim.lr=0.2",
               "--set", "loss.distill_replay=0", "--set", "ema.enabled=false", "--set", "optim.warmup_steps=0"])  # fmt: skip
    yield {"logs": logs, "policy": policy["policy"]["version"], "gentle": gentle["adapter"]["version"],
           "wild": wild["adapter"]["version"]}  # fmt: skip
    if old is None:
        os.environ.pop("DYNAFLIP_HOME", None)
    else:
        os.environ["DYNAFLIP_HOME"] = old


def test_policy_is_registered_with_its_pin(fleet):
    pols = ok(["policies", "list", "--site", "lab"])
    assert (
        len(pols) == 1 and pols[0]["tags"]["head"] == "bc" and pols[0]["tags"]["tolerance"] == "0.2"
    )
    shown = ok(["policies", "show", fleet["policy"]])
    spec = shown["spec"]
    assert json.loads((Path(shown["path"]) / "policy.json").read_text()) == spec  # the local copy
    backbones = ok(["backbones", "list"])
    assert spec["pin"]["backbone_fingerprint"] == backbones[0]["tags"]["fingerprint"]
    # Simulator logs carry instructions: the policy is language-conditioned by default.
    assert spec["inputs"] == {"image": True, "reads": "features", "proprio": True, "language": True}
    assert spec["language_dim"] == 32  # pretrain/tiny's embed_dim: the backbone's own embedding


def test_audit_separates_a_gentle_adapter_from_a_wild_one(fleet):
    g = ok(["audit", "--adapter", fleet["gentle"]])
    assert g["verdict"] == "compatible", g
    checks = {c["name"]: c for c in g["policies"][0]["checks"]}
    assert checks["action_deviation.policy_probe"]["value"] < 1e-3
    assert g["dynamic"]["site_cka"] > 0.999 and all(c["passed"] for c in g["static"])
    r = runner.invoke(app, ["audit", "--adapter", fleet["wild"], "--json"])
    assert r.exit_code == 1, r.output
    w = json.loads(r.stdout)
    assert w["verdict"] == "incompatible"
    dev = {c["name"]: c for c in w["policies"][0]["checks"]}["action_deviation.policy_probe"]
    assert not dev["passed"] and dev["value"] > dev["limit"] == 0.2
    assert w["mlflow_run"]


def test_audit_deviation_is_the_policys_own_output_change(fleet, tmp_path):
    """Recompute the gentle/wild deviation independently from the loaded pieces."""
    from dynaflip_adapt.models.adapter import load_adapter
    from dynaflip_adapt.registry.adapters import resolve_adapter
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL, load_policy_version
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    bundle, _ = load_backbone(reg, None)
    pol = load_policy_version(reg, reg.resolve(POLICY_MODEL, fleet["policy"]))
    folder, _ = resolve_adapter(reg, fleet["wild"])
    ad = load_adapter(bundle, folder)
    rgb, prop = pol.stats["probe_rgb"], pol.stats["probe_proprio"]
    lang = pol.stats["probe_language"]
    with torch.no_grad():
        x = bundle.model.preprocess(rgb)
        old = pol.act(bundle.model.image(x), prop, lang)
        new = pol.act(ad.peft_model(x), prop, lang)
    expected = float(((new - old).abs() / pol.action_scale).mean())
    report = json.loads(runner.invoke(app, ["audit", "--adapter", fleet["wild"], "--json"]).stdout)
    got = {c["name"]: c for c in report["policies"][0]["checks"]}["action_deviation.policy_probe"][
        "value"
    ]
    assert abs(got - expected) < 1e-4


def test_promote_is_gated_forced_with_reason_rolled_back_and_remembered(fleet):
    r = runner.invoke(app, ["promote", fleet["wild"], "--site", "lab"])
    assert r.exit_code == 1 and "not promoted" in r.stderr
    r = runner.invoke(app, ["promote", fleet["wild"], "--site", "lab", "--force"])
    assert r.exit_code == 2 and "--reason" in r.stderr
    ok(["promote", fleet["gentle"], "--site", "lab"])
    ok(["promote", fleet["wild"], "--site", "lab", "--force", "--reason", "field trial"])
    h = ok(["history", "--site", "lab"])
    assert h["current"] == fleet["wild"] and h["rollback_to"] == fleet["gentle"]
    assert [(e["action"], e["version"], e["forced"]) for e in h["events"]] == [
        ("promote", fleet["gentle"], False), ("promote", fleet["wild"], True)]  # fmt: skip
    assert h["events"][1]["reason"] == "field trial" and h["events"][1]["audit"] == "incompatible"
    ev = ok(["rollback", "--site", "lab", "--reason", "drops cubes"])["event"]
    assert ev["version"] == fleet["gentle"] and ev["previous"] == fleet["wild"]
    assert ok(["history", "--site", "lab"])["rollback_to"] is None  # what `rollback` refuses
    r = runner.invoke(app, ["rollback", "--site", "lab"])
    assert r.exit_code == 2 and "roll back to" in r.stderr
    ok(["rollback", "--site", "lab", "--to", fleet["wild"]])
    h = ok(["history", "--site", "lab"])
    assert h["current"] == fleet["wild"] and len(h["events"]) == 4
    for args in (
        ["rollback", "--site", "nowhere"],
        ["promote", "99", "--site", "lab"],
        ["rollback", "--site", "lab", "--to", "99"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
    # Registry write of the alias really moved: MLflow agrees with our history.
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    assert reg.resolve(ADAPTER_MODEL, "prod-lab").version == fleet["wild"]


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_export_is_standalone_and_matches_the_unmerged_adapter(fleet, tmp_path, fmt):
    out = ok(["export", fleet["wild"], "--out", str(tmp_path / fmt), "--format", fmt])
    assert out["merged_vs_unmerged_max_abs"] < 1e-4 and out["export_vs_merged_max_abs"] < 1e-5
    files = set(out["files"])
    assert {"manifest.json", "preprocessing.json"} <= files
    man = json.loads((Path(out["folder"]) / "manifest.json").read_text())
    assert man["adapter"]["site"] == "lab" and man["format"] == fmt
    # Independent of the product's own difference figures: the exported file, loaded here, gives
    # the features of W0 + (alpha / r) * B @ A computed by hand from the adapter's PEFT tensors.
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = _hand_merged(fleet["wild"])(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(Path(out["folder"]) / "encoder.ts"))(x)
        else:
            import importlib.util as iu

            spec = iu.spec_from_file_location("exported_model", Path(out["folder"]) / "model.py")
            mod = iu.module_from_spec(spec)
            spec.loader.exec_module(mod)
            got = mod.load(out["folder"])(x)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())


def _hand_merged(version: str) -> torch.nn.Module:
    """The base image encoder with the adapter's LoRA update added by hand (no PEFT merge)."""
    import copy

    from safetensors.torch import load_file

    from dynaflip_adapt.registry.adapters import resolve_adapter
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store(None))
    folder, _ = resolve_adapter(reg, version)
    bundle, _ = load_backbone(reg, None)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    lora = load_file(str(folder / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    model = copy.deepcopy(bundle.model.image).eval()
    state = model.state_dict()
    updated = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        layer = key.split("base_model.model.", 1)[1].split(".lora_A.", 1)[0]
        state[f"{layer}.weight"] = state[f"{layer}.weight"] + scale * (b @ a)
        updated += 1
    assert updated >= 4 and float(sum(v.abs().sum() for v in lora.values())) > 0
    model.load_state_dict(state)
    return model


def test_export_onnx_when_available(fleet, tmp_path):
    if importlib.util.find_spec("onnx") is None:
        r = runner.invoke(
            app, ["export", fleet["wild"], "--out", str(tmp_path / "o"), "--format", "onnx"]
        )
        assert r.exit_code == 2 and "pip install onnx" in r.stderr
        return
    out = ok(["export", fleet["wild"], "--out", str(tmp_path / "o"), "--format", "onnx"])
    assert "encoder.onnx" in out["files"]
    # The product checks the file with onnxruntime when it is there (else the figure is NaN);
    # here ONNX's own pure-numpy reference evaluator runs the graph against the hand merge.
    import math

    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    has_ort = importlib.util.find_spec("onnxruntime") is not None
    assert math.isnan(out["export_vs_merged_max_abs"]) != has_ort
    if has_ort:
        assert out["export_vs_merged_max_abs"] < 1e-4
    graph = onnx.load(str(tmp_path / "o" / "encoder.onnx"))
    onnx.checker.check_model(graph)
    x = torch.randn(2, 3, 32, 32)
    (got,) = ReferenceEvaluator(graph).run(None, {graph.graph.input[0].name: x.numpy()})
    with torch.no_grad():
        want = _hand_merged(fleet["wild"])(x).numpy()
    assert float(np.abs(got - want).max()) < 1e-4 * float(np.abs(want).max())


def _promote_worker(args):
    home, version, site, i = args
    import os

    os.environ["DYNAFLIP_HOME"] = home
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import promote, rollback
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    seqs = [promote(reg, version, site, audit_verdict="compatible", reason=f"worker {i}")["seq"]]
    if i % 2 == 1:  # half of the workers also roll back (there is always an earlier promotion)
        seqs.append(rollback(reg, site, reason=f"worker {i}")["seq"])
    return seqs


def test_concurrent_promotions_and_rollbacks_leave_a_consistent_alias_and_history(fleet):
    import multiprocessing as mp
    import os

    home = os.environ["DYNAFLIP_HOME"]
    versions = [fleet["gentle"], fleet["wild"]]
    ok(["promote", versions[0], "--site", "race", "--force", "--reason", "seed the stack"])
    jobs = [(home, versions[i % 2], "race", i) for i in range(8)]
    with mp.get_context("spawn").Pool(8) as pool:
        seqs = [s for w in pool.map(_promote_worker, jobs) for s in w]
    assert sorted(seqs) == list(range(2, 14))  # 8 promotions + 4 rollbacks: none lost
    h = ok(["history", "--site", "race"])
    assert len(h["events"]) == 13
    assert sorted(e["action"] for e in h["events"][1:]) == ["promote"] * 8 + ["rollback"] * 4
    last = h["events"][-1]
    assert h["current"] == last["version"]  # the alias agrees with the last recorded event
    # Every event's "previous" is the version the event before it set: a consistent chain.
    for before, after in itertools.pairwise(h["events"]):
        assert after["previous"] == before["version"]


def _hostile(kind: str, folder: Path) -> None:
    m = folder / "manifest.json"
    data = json.loads(m.read_text())
    if kind == "traversal":
        data["files"]["../../etc/passwd"] = data["files"].pop("adapter_config.json")
        m.write_text(json.dumps(data))
    elif kind == "symlink":
        w = folder / "adapter_model.safetensors"
        target = folder.parent / "elsewhere.safetensors"
        w.rename(target)
        w.symlink_to(target)
    elif kind == "pickle":
        torch.save({"x": 1}, folder / "adapter_model.bin")
    elif kind == "checksum":
        w = folder / "adapter_model.safetensors"
        raw = bytearray(w.read_bytes())
        raw[-1] ^= 0xFF
        w.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", ["traversal", "symlink", "pickle", "checksum"])
def test_hostile_adapter_folders_are_refused(fleet, tmp_path, kind):
    import shutil

    info = ok(["adapters", "show", fleet["gentle"]])
    folder = tmp_path / "adapter"
    shutil.copytree(info["path"], folder)
    _hostile(kind, folder)
    for cmd in (["adapters", "show", str(folder)], ["audit", "--adapter", str(folder)],
                ["export", str(folder), "--out", str(tmp_path / "x")]):  # fmt: skip
        r = runner.invoke(app, cmd)
        assert r.exit_code == 2, (kind, cmd, r.output)
        line = r.stderr.strip().splitlines()[0]
        assert "found" in line and "expected" in line, line
        assert not (tmp_path / "x").exists()


def test_eval_logs_compares_base_and_adapter_on_held_out_logs(fleet):
    logs = fleet["logs"]
    args = ["eval", "logs", logs, "--base-logs", logs, "--paired-logs", logs]
    gentle = ok([*args, "--adapter", fleet["gentle"]])
    base, adapted = gentle["encoders"]
    assert base["encoder"] == "base" and set(base["shifted"]) == set(gentle["reduction"])
    # Paired logs = the shifted logs themselves: the base encoder's drift is exactly 0, and a
    # near-untrained adapter (lr 1e-9) changes neither features nor errors.
    assert base["paired_drift"] == 0.0 and adapted["paired_drift"] < 1e-3
    assert all(abs(r) < 1e-3 for r in gentle["reduction"].values())
    for p, (lo, hi) in gentle["base_change_ci95"].items():
        assert lo <= gentle["base_change"][p] <= hi and hi - lo < 1e-2
    wild = ok([*args, "--adapter", fleet["wild"]])
    for p, r in wild["reduction"].items():
        b, a = (e["shifted"][p]["mse"] for e in wild["encoders"])
        assert r == pytest.approx(1 - a / b)
        lo, hi = wild["reduction_ci95"][p]
        assert lo <= r <= hi and hi > lo  # the logs hold several episodes
        assert len(wild["encoders"][0]["shifted"][p]["per_dim"]) == 4  # dx, dy, dz, grip
    assert wild["encoders"][1]["paired_drift"] > 0.01
    assert wild["audit"] in ("compatible", "warning", "incompatible")
    # A site whose only policy reads no image: nothing to audit, shown as such (the text
    # output's colour table once lacked `unaudited` and crashed here).
    ok(["policies", "train", logs, "--site", "blind", "--head", "proprio_only", "--steps", "20"])
    r = runner.invoke(app, [*args, "--adapter", fleet["gentle"], "--site", "blind"])
    assert r.exit_code == 0 and "audit: unaudited" in r.stdout, r.output


# ---------------------------------------------------------------------------- adapter strength


def _lora_b(reg, version):
    """The stored PEFT tensors of an adapter version."""
    from safetensors.torch import load_file

    from dynaflip_adapt.registry.adapters import resolve_adapter

    folder, _ = resolve_adapter(reg, version)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_scaled_adapter_is_the_weight_interpolation(fleet):
    """W0 + s * delta W, computed independently from the base and fully merged weights."""
    from dynaflip_adapt.eval.strength import scaled_encoder
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    bundle, ad, _ = open_adapter(Registry(resolve_store()), fleet["wild"])
    w0 = dict(bundle.model.image.state_dict())
    w1 = dict(ad.merged().state_dict())
    moved = [k for k in w0 if not torch.equal(w0[k], w1[k])]
    assert moved and all(".blocks." in f".{k}" for k in moved)  # only the LoRA targets change
    for s in (0.0, 0.3, 1.0):
        ws = scaled_encoder(ad.peft_model, s).state_dict()
        for k in w0:
            torch.testing.assert_close(ws[k], w0[k] + s * (w1[k] - w0[k]), atol=2e-6, rtol=1e-5)


# Trained without the teacher at a moderate rate: fails the audit at full strength (the tiny
# test policy's own-frame deviation is ~3 against a 0.2 tolerance) and passes near s = 0.03.
MEDIUM = ["--max-steps", "25", *FAST, "--set", "optim.lr=0.003", "--set", "loss.distill_replay=0",
          "--set", "ema.enabled=false", "--set", "optim.warmup_steps=0"]  # fmt: skip


def test_rescale_auto_registers_the_largest_passing_strength(fleet):
    """An adapter that fails the audit; `adapters rescale --strength auto` registers a scaled
    copy that passes, at a strength whose next bisection step up fails."""
    from dynaflip_adapt.eval.audit import policy_deviation
    from dynaflip_adapt.eval.strength import scaled_encoder
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL, load_policy_version
    from dynaflip_adapt.registry.store import resolve_store

    medium = ok(["finetune", fleet["logs"], "--site", "lab", *MEDIUM])["adapter"]["version"]
    assert runner.invoke(app, ["audit", "--adapter", medium]).exit_code == 1
    before = ok(["adapters", "list"])
    out = ok(["adapters", "rescale", medium, "--strength", "auto"])
    s = out["strength"]
    assert 0 < s < 1 and out["fit"]["trials"][0]["strength"] == 1.0
    assert not out["fit"]["trials"][0]["passed"]
    new = out["registered"]["version"]
    assert len(ok(["adapters", "list"])) == len(before) + 1
    manifest = ok(["adapters", "show", new])["manifest"]
    assert manifest["lineage"]["strength"] == s
    assert manifest["lineage"]["parent_version"] == medium
    rep = ok(["audit", "--adapter", new])
    assert rep["verdict"] == expected_verdict(rep) and rep["verdict"] in ("compatible", "warning")
    # The stored weights: lora_B scaled by s, lora_A unchanged.
    reg = Registry(resolve_store())
    old_w, new_w = _lora_b(reg, medium), _lora_b(reg, new)
    for k, v in old_w.items():
        torch.testing.assert_close(new_w[k], v * s if "lora_B" in k else v)
    # The boundary: the strength one bisection step (1/64) above s was tried and failed; the
    # recorded own-frame deviations agree with an independent recomputation, and at s it is
    # within the policy's tolerance (0.2).
    trials = {t["strength"]: t for t in out["fit"]["trials"]}
    assert trials[s]["passed"] and not trials[s + 1 / 64]["passed"]
    bundle, ad, _ = open_adapter(reg, medium)
    pol = load_policy_version(reg, reg.resolve(POLICY_MODEL, fleet["policy"]))
    for x in (s, s + 1 / 64):
        enc = scaled_encoder(ad.peft_model, x)
        dev = policy_deviation(pol, bundle, bundle.model.image, enc, {})["policy_probe_mean"]
        (recorded,) = trials[x]["own_deviation"].values()
        assert abs(dev - recorded) < 1e-4
    assert next(iter(trials[s]["own_deviation"].values())) <= 0.2


def test_rescale_fixed_strength_bad_input_and_nothing_to_do(fleet):
    out = ok(["adapters", "rescale", fleet["wild"], "--strength", "0.5"])
    assert out["fit"] is None and out["strength"] == 0.5
    manifest = ok(["adapters", "show", out["registered"]["version"]])["manifest"]
    assert manifest["lineage"]["strength"] == 0.5
    n = len(ok(["adapters", "list"]))
    for bad in ("2", "-0.1", "nan", "strong"):
        r = runner.invoke(app, ["adapters", "rescale", fleet["wild"], "--strength", bad])
        assert r.exit_code == 2 and "--strength" in r.stderr, (bad, r.output)
    r = runner.invoke(app, ["adapters", "rescale", fleet["wild"], "--site", "nowhere"])
    assert r.exit_code == 2 and "no policies pinned" in r.stderr, r.output
    # The gentle adapter passes at full strength: nothing to register.
    assert ok(["adapters", "rescale", fleet["gentle"]])["registered"] is None
    # A tolerance nothing meets: no strength above 0 passes -> exit 1, nothing registered.
    r = runner.invoke(app, ["adapters", "rescale", fleet["wild"], "--budget", "1e-9", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["strength"] == 0.0, r.output
    assert len(ok(["adapters", "list"])) == n


def test_finetune_strength_auto_registers_an_adapter_that_passes(fleet):
    out = ok(["finetune", fleet["logs"], "--site", "lab", *MEDIUM, "--strength", "auto"])
    # The same training as the medium adapter (which fails), scaled until it passes.
    assert 0 < out["strength"] < 1 and not out["strength_fit"]["trials"][0]["passed"]
    v = out["adapter"]["version"]
    rep = ok(["audit", "--adapter", v])
    assert rep["verdict"] == expected_verdict(rep) and rep["verdict"] in ("compatible", "warning")
    assert ok(["adapters", "show", v])["manifest"]["lineage"]["strength"] == out["strength"]
    # DoRA cannot be scaled: refused before any training, nothing registered.
    n = len(ok(["adapters", "list"]))
    r = runner.invoke(app, ["finetune", fleet["logs"], "--site", "lab", *MEDIUM, "--set",
                            "lora.use_dora=true", "--strength", "auto"])  # fmt: skip
    assert r.exit_code == 2 and "use_dora" in r.stderr, r.output
    assert len(ok(["adapters", "list"])) == n


def test_audit_table_is_complete_when_piped(fleet, monkeypatch):
    """Written to a pipe (CI logs), the audit table keeps every value and limit whole."""
    monkeypatch.delenv("COLUMNS", raising=False)
    r = runner.invoke(app, ["audit", "--adapter", fleet["wild"]])
    assert r.exit_code == 1
    assert "…" not in r.stdout, r.stdout
    assert "action_deviation.policy_probe" in r.stdout and "0.2000" in r.stdout


def _recipe_file(path: Path, **changes: dict) -> str:
    """recipes/finetune/default.yaml with some sections changed, written to `path`."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    rec = yaml.safe_load((root / "recipes" / "finetune" / "default.yaml").read_text())
    for section, values in changes.items():
        rec[section] = {**rec.get(section, {}), **values}
    path.write_text(yaml.safe_dump(rec))
    return str(path)


def test_finetune_fallback_trains_the_next_recipe_when_the_audit_fails(fleet, tmp_path):
    """`--fallback`: the first recipe's adapter fails the audit at full strength, so it is set
    aside (its run tagged, nothing registered) and the fallback's adapter, which passes, is
    registered with the rejection in its lineage. A first recipe that passes trains alone."""
    from mlflow import MlflowClient

    from dynaflip_adapt.registry.adapters import FINETUNE_EXPERIMENT
    from dynaflip_adapt.registry.store import resolve_store

    fast = {"data": {"num_workers": 0}}
    medium = _recipe_file(tmp_path / "medium.yaml", **fast, optim={"lr": 0.003, "batch_size": 8,
                          "warmup_steps": 0}, loss={"distill_replay": 0.0}, ema={"enabled": False})  # fmt: skip
    gentle = _recipe_file(tmp_path / "gentle.yaml", **fast, optim={"lr": 1e-9, "batch_size": 8})
    n = len(ok(["adapters", "list"]))
    r = runner.invoke(app, ["finetune", fleet["logs"], "--site", "lab", "-r", medium,
                            "--fallback", "finetune/nope"])  # fmt: skip
    assert r.exit_code == 2 and "nope" in r.stderr, r.output
    assert len(ok(["adapters", "list"])) == n
    args = ["finetune", fleet["logs"], "--site", "lab", "--max-steps", "25"]
    out = ok([*args, "-r", medium, "--fallback", gentle])
    assert Path(out["recipe"]).name == "gentle.yaml" and out["strength"] == 1.0
    (rej,) = out["fallback_rejected"]
    assert Path(rej["recipe"]).name == "medium.yaml"
    assert "bc (v1): action_deviation.policy_probe" in " ".join(rej["failed"]), rej
    v = out["adapter"]["version"]
    assert len(ok(["adapters", "list"])) == n + 1
    rep = ok(["audit", "--adapter", v])
    assert rep["verdict"] == expected_verdict(rep) and rep["verdict"] in ("compatible", "warning")
    assert ok(["adapters", "show", v])["manifest"]["lineage"]["fallback_rejected"] == [rej]
    client = MlflowClient(resolve_store().tracking_uri)
    exp = client.get_experiment_by_name(FINETUNE_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "tags.fallback_rejected != ''")
    assert len(runs) == 1 and "adapter_version" not in runs[0].data.tags
    # The first recipe passes: the fallback never trains.
    out = ok([*args, "-r", gentle, "--fallback", medium])
    assert Path(out["recipe"]).name == "gentle.yaml" and out["fallback_rejected"] == []
    assert len(ok(["adapters", "list"])) == n + 2


def test_strength_fit_hints_the_replay_area_recipe_only_for_that_failure():
    from dynaflip_adapt.eval.strength import StrengthFit, Trial

    def fit(*failed: str) -> StrengthFit:
        first = Trial(1.0, not failed, "incompatible" if failed else "warning", {}, list(failed))
        return StrengthFit(0.5 if failed else 1.0, 1.0, [first, Trial(0.5, True, "warning", {})])

    area = fit("bc (v1): trimodal_area.replay", "diffusion (v2): trimodal_area.replay")
    assert "--fallback finetune/replay_area" in area.hint
    assert area.to_dict()["hint"] == area.hint
    assert (
        fit("bc (v1): trimodal_area.replay", "bc (v1): action_deviation.policy_probe").hint is None
    )
    assert fit().hint is None


def test_token_readers_names_the_site_policies_that_read_the_token_map():
    """`finetune` warns when a site's policies read the token map and the recipe's teacher holds
    the CLS only: which policies read tokens comes from their registered `head` tag."""
    from dynaflip_adapt.registry.client import VersionInfo
    from dynaflip_adapt.workflows.adapt import token_readers

    def version(n, name, head, site="lab", **tags):
        t = {"name": name, "head": head, "site": site, **tags}
        return VersionInfo("dynaflip-policy", str(n), "", None, t, [], 0)

    class Registry:
        def versions(self, _model):
            return [
                version(5, "grasp", "objects"),
                version(4, "old", "tokens", retired="true"),
                version(3, "arm", "bc"),
                version(2, "mine", "my_custom_head"),
                version(1, "elsewhere", "objects", site="night"),
            ]

    assert token_readers(Registry(), "lab") == ["grasp (v5)"]
    assert token_readers(Registry(), "night") == ["elsewhere (v1)"]
    assert token_readers(Registry(), "nowhere") == []


def test_a_chain_of_adaptations_is_shown_back_to_the_backbone(fleet, tmp_path):
    """`finetune --from V` twice: the newest adapter's `adapters show` lists itself, its parent
    and grandparent (each with the logs it was trained on) and the backbone; the first step's
    adapter has no chain beyond itself; the child trained on from its parent's weights."""
    from safetensors.torch import load_file

    logs = fleet["logs"]
    step = ["--max-steps", "2", *FAST, "--set", "ema.enabled=false"]
    first = ok(["finetune", logs, "--site", "chain", *step])["adapter"]["version"]
    second = ok(["finetune", logs, "--site", "chain", "--from", first, *step,
                 "--set", "run.seed=1"])["adapter"]["version"]  # fmt: skip
    third = ok(["finetune", logs, "--site", "chain", "--from", second, *step,
                "--set", "run.seed=2"])["adapter"]["version"]  # fmt: skip
    shown = ok(["adapters", "show", third])
    chain = [x["version"] for x in shown["chain"]]
    assert chain == [third, second, first]
    base = ok(["backbones", "list"])[0]["version"]
    assert {x["base_version"] for x in shown["chain"]} == {base}
    assert all(x["data_fingerprint"].startswith("sha256:") for x in shown["chain"])
    assert [x["version"] for x in ok(["adapters", "show", first])["chain"]] == [first]
    # The MLflow tag says the same without walking the registry.
    assert shown["version"]["tags"]["ancestors"] == f"{second},{first}"
    # history: each promoted adapter with what it continues.
    ok(["promote", third, "--site", "chain", "--force", "--reason", "test", "--allow-unaudited"])
    h = ok(["history", "--site", "chain"])
    assert h["events"][-1]["version"] == third and h["chains"][third] == [second, first]
    table = runner.invoke(app, ["history", "--site", "chain"]).output
    assert f"v{second} <- v{first}" in " ".join(table.split())
    text = runner.invoke(app, ["adapters", "show", third]).output
    assert f"v{third}" in text and f"<- v{second}" in text and f"<- v{first}" in text
    assert f"<- backbone v{base}" in text

    def weights(version: str) -> dict[str, torch.Tensor]:
        folder = Path(ok(["adapters", "show", version])["path"])
        return load_file(folder / "adapter_model.safetensors")

    w1, w2 = weights(first), weights(second)
    assert w1.keys() == w2.keys()
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)
    # A scaled link is scaled between its parent (0) and itself (1), not between the backbone
    # and itself: W0 + 0.3 delta W_parent + 0.7 delta W_link, checked on merged weights.
    from dynaflip_adapt.models.adapter import load_adapter
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    r = runner.invoke(app, ["finetune", logs, "--site", "chain", "--from", third, *step,
                            "--set", "run.seed=3", "--strength", "0.7", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    fourth = json.loads(r.stdout)
    assert "runs from the parent" in " ".join(r.stderr.split())
    bundle, scaled, _ = open_adapter(Registry(resolve_store()), fourth["adapter"]["version"])
    assert scaled.manifest["lineage"]["strength_from"] == "parent"
    trained = load_adapter(bundle, Path(fourth["folder"]).with_name("adapter"))
    parent = open_adapter(Registry(resolve_store()), third)[1]
    w0 = bundle.model.image.state_dict()
    wp, wl = parent.merged().state_dict(), trained.merged().state_dict()
    ws = scaled.merged().state_dict()
    # The parent's update is far above the tolerance: scaling from the backbone would fail.
    assert max(float((wp[k] - w0[k]).abs().max()) for k in w0) > 1e-4
    assert any(not torch.equal(wp[k], wl[k]) for k in w0)
    for k in w0:
        want = w0[k] + 0.3 * (wp[k] - w0[k]) + 0.7 * (wl[k] - w0[k])
        torch.testing.assert_close(ws[k], want, atol=2e-6, rtol=1e-5)


def test_the_gate_from_python_fails_closed_as_the_cli_does(fleet):
    """The Python API (no CLI): another site's adapter is refused before any audit, an
    incompatible one with its audit, and neither changes the site; a compatible one moves the
    alias with the CLI's audit numbers, and rolls back."""
    from dynaflip_adapt import (
        AuditRequest,
        PromoteRequest,
        audit_adapter,
        promote_adapter,
        rollback_site,
    )
    from dynaflip_adapt.errors import InputError

    before = ok(["history", "--site", "lab"])
    elsewhere = promote_adapter(PromoteRequest(fleet["gentle"], "elsewhere"))
    assert not elsewhere.promoted and elsewhere.audit is None and "'lab'" in elsewhere.refused
    wild = promote_adapter(PromoteRequest(fleet["wild"], "lab"))
    assert not wild.promoted and wild.audit is not None and wild.audit.verdict == "incompatible"
    assert wild.to_dict()["refused"] == wild.refused and "event" not in wild.to_dict()
    assert ok(["history", "--site", "lab"])["events"] == before["events"]  # nothing moved
    assert ok(["history", "--site", "elsewhere"])["events"] == []
    with pytest.raises(InputError, match="--reason"):
        PromoteRequest(fleet["wild"], "lab", force=True)  # refused before a registry opens
    audit = audit_adapter(AuditRequest(fleet["gentle"]))
    cli = ok(["audit", fleet["gentle"]])
    assert audit.passed and audit.report.verdict == cli["verdict"] == "compatible"
    assert [c["value"] for c in audit.to_dict()["policies"][0]["checks"]] == [
        c["value"] for c in cli["policies"][0]["checks"]
    ]
    gentle = promote_adapter(PromoteRequest(fleet["gentle"], "lab"))
    assert gentle.promoted and gentle.event is not None
    assert gentle.event["version"] == fleet["gentle"]
    assert gentle.event["previous"] == before["current"]
    assert ok(["history", "--site", "lab"])["current"] == fleet["gentle"]
    back = rollback_site("lab", reason="api test")
    assert back["version"] == before["current"] and back["previous"] == fleet["gentle"]
