"""The OOD evaluation: metrics against closed forms, the diffusion head, the ablation modes of
finetune, and the benchmark end to end on a tiny backbone."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.eval.ablations import ABLATIONS, ablation_recipe
from dynaflip_adapt.eval.offline import action_error, paired_drift, relative_change
from dynaflip_adapt.eval.summary import summarize
from dynaflip_adapt.losses import variance_floor
from dynaflip_adapt.policies import (
    DiffusionHead,
    MLPHead,
    Policy,
    action_chunks,
    load_policy,
    policy_spec,
    save_policy,
    train_head,
)

needs_sim = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None, reason="needs the sim extra"
)


def test_paired_drift_is_zero_when_invariant_and_one_for_unrelated_frames():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(10, 6, generator=g)
    assert paired_drift(ref, ref) == 0.0
    # Shifted features equal to the base features of the frame N/2 away: exactly as far as the
    # normaliser's unrelated pairs.
    assert paired_drift(ref.roll(5, dims=0), ref) == pytest.approx(1.0, abs=1e-6)
    # Hand computation on two frames.
    ref2 = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    new2 = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    assert paired_drift(new2, ref2) == pytest.approx(0.5 / 5.0)


def test_action_error_is_in_units_of_the_policys_action_std():
    head = MLPHead(0, 0, 2)
    for p in head.parameters():
        torch.nn.init.zeros_(p)  # predicts the normalized action 0 = the action mean
    stats = {
        "feat_mean": torch.zeros(3),
        "feat_std": torch.ones(3),
        "prop_mean": torch.zeros(1),
        "prop_std": torch.ones(1),
        "act_mean": torch.tensor([1.0, -1.0]),
        "act_std": torch.tensor([2.0, 0.5]),
    }
    spec = policy_spec("proprio_only", 3, 1, 2, 0.1, {})
    spec["inputs"] = {"image": False, "proprio": False}
    pol = Policy(None, spec, head, stats)
    actions = torch.tensor([[3.0, -1.0], [1.0, 0.0]])
    e = action_error(pol, torch.zeros(2, 3), torch.zeros(2, 1), actions)
    # dim 0: ((3-1)/2)^2 = 1, 0 -> 0.5; dim 1: 0, ((0+1)/0.5)^2 = 4 -> 2
    assert e["per_dim"] == pytest.approx([0.5, 2.0])
    assert e["mse"] == pytest.approx(1.25)


def test_relative_change_and_its_episode_bootstrap_interval():
    # Point estimate: ratio of sums - 1 (here 10 / 8 - 1).
    before, after = np.array([1.0, 3.0, 2.0, 2.0]), np.array([2.0, 3.0, 1.0, 4.0])
    c, lo, hi = relative_change(before, after, np.array([0, 0, 1, 1]))
    assert c == pytest.approx(0.25) and lo <= c <= hi
    # Every episode changes by the same factor: every resample gives it, a zero-width interval.
    b = np.arange(1.0, 13.0)
    assert relative_change(b, 0.8 * b, np.repeat(np.arange(4), 3)) == pytest.approx((-0.2,) * 3)
    # One episode: nothing to resample.
    assert relative_change(before, after, np.zeros(4)) == pytest.approx((0.25, 0.25, 0.25))
    # Paired: episodes that differ a lot in difficulty but change alike give a narrow interval
    # (what they share cancels), and the interval covers the true change about 95% of the time.
    rng = np.random.default_rng(1)
    covered, paired, unpaired = 0, [], []
    for _ in range(200):
        difficulty = rng.lognormal(0, 1.0, 20)
        eb = difficulty * rng.lognormal(0, 0.1, 20)
        ea = 1.1 * difficulty * rng.lognormal(0, 0.1, 20)
        _, lo, hi = relative_change(eb, ea, np.arange(20), reps=1000)
        covered += lo <= 0.1 <= hi
        paired.append(hi - lo)
        # The same ratio with the two encoders' episodes resampled independently.
        i, j = rng.integers(0, 20, (2, 1000, 20))
        unpaired.append(np.subtract(*np.quantile(ea[i].sum(1) / eb[j].sum(1), [0.975, 0.025])))
    assert 0.85 <= covered / 200 <= 1.0
    assert np.mean(paired) < 0.3 * np.mean(unpaired)
    with pytest.raises(ValueError, match="must match"):
        relative_change(before, after[:3], np.zeros(4))
    with pytest.raises(ValueError, match="all zero"):
        relative_change(np.zeros(4), after, np.zeros(4))


def test_action_chunks_hold_the_last_action_of_each_episode():
    a = torch.arange(6.0)[:, None]
    ep = torch.tensor([0, 0, 0, 1, 1, 1])
    got = action_chunks(a, ep, 3).squeeze(-1)
    want = torch.tensor([[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 5], [4, 5, 5], [5, 5, 5]])
    assert torch.equal(got, want.float())


def test_variance_floor_matches_its_closed_form():
    s, target = 0.2, 0.5
    x = torch.tensor([[-s, 1.0], [s, 1.0]])  # dim 0: unbiased var 2 s^2; dim 1: constant
    want = (max(0.0, target - math.sqrt(2 * s * s + 1e-4)) + (target - math.sqrt(1e-4))) / 2
    assert float(variance_floor(x, target)) == pytest.approx(want, rel=1e-5)
    assert float(variance_floor(torch.randn(512, 4) * 3, target)) == 0.0


def _toy(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    f, p = torch.randn(n, 8, generator=g), torch.randn(n, 3, generator=g)
    a = torch.stack([f[:, 0] + 0.5 * p[:, 1], torch.tanh(2 * f[:, 1]), f[:, 2] - p[:, 0]], 1)
    return f, p, a


@pytest.mark.slow
def test_diffusion_head_learns_generalises_and_is_deterministic(tmp_path):
    f, p, a = _toy(600, 0)
    ep = torch.arange(600) // 50
    model, stats, _ = train_head(f, p, a, head="diffusion", episode=ep, steps=1500, seed=0,
                                 feature_noise=0.0)  # fmt: skip
    assert isinstance(model, DiffusionHead)
    spec = policy_spec("diffusion", 8, 3, 3, 0.1, {})
    pol = Policy(None, spec, model, stats)
    ft, pt, at = _toy(300, 1)
    with torch.no_grad():
        pred = pol.act(ft, pt)
        # Held out, in units of the action variance: predicting the mean scores 1.
        nmse = float(((pred - at) ** 2).mean(0).div(at.var(0)).mean())
        assert nmse < 0.25
        # Deterministic (one stored latent) and independent of the batch a frame comes in, up
        # to float rounding of different matmul shapes.
        assert torch.equal(pol.act(ft, pt), pred)
        assert torch.allclose(pol.act(ft[:7], pt[:7]), pred[:7], atol=1e-5)
    save_policy(tmp_path / "p", model, spec, stats)
    again = load_policy(tmp_path / "p")
    with torch.no_grad():
        assert torch.allclose(again.act(ft, pt), pred, atol=1e-6)
    assert again.spec["inputs"] == {
        "image": True,
        "reads": "features",
        "proprio": True,
        "language": False,
    }


def _row(preset, seed, ab, shifted, base, drift=0.5, audit="compatible"):
    return {"preset": preset, "seed": seed, "ablation": ab, "paired_drift": drift, "audit": audit,
            "shifted": {h: {"mse": v} for h, v in shifted.items()},
            "base": {h: {"mse": v} for h, v in base.items()}}  # fmt: skip


def test_summary_reductions_are_paired_per_preset_and_seed():
    rows = [
        _row("a", 0, "none", {"bc": 2.0, "proprio_only": 1.0}, {"bc": 0.5, "proprio_only": 1.0}),
        _row("b", 0, "none", {"bc": 4.0, "proprio_only": 1.0}, {"bc": 1.0, "proprio_only": 1.0}),
        _row("a", 0, "default", {"bc": 1.0, "proprio_only": 1.0}, {"bc": 0.5, "proprio_only": 1.0},
             audit="warning"),
        _row("b", 0, "default", {"bc": 3.0, "proprio_only": 1.0}, {"bc": 1.1, "proprio_only": 1.0},
             audit="incompatible"),
    ]  # fmt: skip
    s = summarize(rows, ["bc", "proprio_only"])
    d = s["default"]["heads"]["bc"]
    assert d["reduction"]["mean"] == pytest.approx((0.5 + 0.25) / 2)
    assert d["reduction"]["sd"] == pytest.approx(math.sqrt(2 * 0.125**2))
    assert d["base_change"]["mean"] == pytest.approx((0.0 + 0.1) / 2)
    assert s["default"]["image_heads_reduction"] == pytest.approx(0.375)
    # A warning passes the promotion gate; an incompatible audit does not.
    assert s["default"]["audit_compatible"] == 0 and s["default"]["audit_warning"] == 1
    assert s["default"]["audit_passed"] == 1 and s["default"]["audit_runs"] == 2
    assert s["default"]["goal_met"] is False  # base +5% and one incompatible audit
    ok = summarize([*rows[:3], {**rows[3], "audit": "compatible", "base": rows[2]["base"]}],
                   ["bc", "proprio_only"])  # fmt: skip
    assert ok["default"]["audit_passed"] == 2 and ok["default"]["goal_met"] is True
    assert s["none"]["heads"]["bc"]["reduction"]["mean"] == 0.0
    # The control: bc's shifted error (3.0 on average) is worse than proprio-only's (1.0).
    assert s["none"]["image_heads_beating_proprio_only"] == []
    assert s["default"]["image_heads_beating_proprio_only"] == []


def test_ablations_change_only_what_they_name():
    from dynaflip_adapt.config import load_recipe

    rec = load_recipe("finetune/default")[0]
    t = ablation_recipe(rec, ABLATIONS["teacher_only"])
    assert (t.loss.area, t.loss.distill_replay, t.loss.distill_site) == (0.0, 0.0, 1.0)
    assert t.optim == rec.optim and t.lora == rec.lora
    e = ablation_recipe(rec, ABLATIONS["extracted_flow"])
    assert e.data.flow_source == "dis_s4" and e.loss == rec.loss
    assert ablation_recipe(rec, ABLATIONS["default"]) == rec
    # The shipped recipe trains the invariance term; the ablations that drop the teacher drop
    # it too, and default_noinv differs from the recipe by nothing else.
    assert rec.loss.invariance > 0
    for name in ("teacher_only", "aug_only", "anchors_only"):
        assert ablation_recipe(rec, ABLATIONS[name]).loss.invariance == 0.0, name
    noinv = ablation_recipe(rec, ABLATIONS["default_noinv"])
    assert noinv.loss.invariance == 0.0
    assert noinv.loss.model_copy(update={"invariance": rec.loss.invariance}) == rec.loss
    assert noinv.model_copy(update={"loss": rec.loss}) == rec
    # The cascade's fallback trains what `finetune --fallback finetune/replay_area` trains.
    area = ablation_recipe(rec, ABLATIONS[ABLATIONS["default_retain_cascade"].fallback])
    shipped = load_recipe("finetune/replay_area")[0]
    assert area.model_copy(update={"description": shipped.description}) == shipped
    assert area.loss.replay_area == 1.0 and rec.loss.replay_area == 0.0


@needs_sim
def test_finetune_ablation_modes(tmp_path):
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.train.finetune import finetune
    from dynaflip_adapt.train.pretrain import pretrain

    r = CliRunner().invoke(app, ["sim", "generate", str(tmp_path / "s.h5"), "--site", "night_shift",
                                 "-n", "2", "--frames", "12", "--size", "32", "--workers", "1",
                                 "--flow-stride", "4"])  # fmt: skip
    assert r.exit_code == 0, r.output
    logs = open_logs(tmp_path / "s.h5")
    pre = load_recipe("pretrain/tiny", ["data.num_workers=0", "optim.max_steps=5",
                                        "replay.frames=8"])[0]  # fmt: skip
    bundle = pretrain(logs, pre, tmp_path / "pre").bundle
    from dynaflip_adapt.models.backbone import load_bundle

    b = load_bundle(bundle)
    before = {k: v.clone() for k, v in b.model.image.state_dict().items()}
    base = ["data.num_workers=0", "optim.batch_size=4", "optim.warmup_steps=0", "ema.enabled=false"]
    full_rec = load_recipe("finetune/default", base)[0]
    res = finetune(b, logs, full_rec, tmp_path / "full", site="s", max_steps=3, full=True)
    assert res.adapter is None and not (tmp_path / "full" / "adapter").exists()
    changed = [k for k, v in res.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 10  # every block trains, not only LoRA targets
    assert all(torch.equal(v, before[k]) for k, v in b.model.image.state_dict().items())
    assert res.probe["site_rgb0"].shape[0] > 0

    for ab in ("teacher_only", "aug_only"):
        rec = ablation_recipe(load_recipe("finetune/default", base)[0], ABLATIONS[ab])
        out = finetune(b, logs, rec, tmp_path / ab, site="s", max_steps=2)
        term = "distill_site" if ab == "teacher_only" else "consistency"
        # The student sees augmented frames: the term is non-zero from the first step.
        assert out.history[0][term] > 0
        assert set(out.history[0]) >= {term} and "area" not in out.history[0]
    std = load_recipe("finetune/default", [*base, "loss.distill_space=standardized"])[0]
    out = finetune(b, logs, std, tmp_path / "std", site="s", max_steps=2)
    assert "distill_replay" in out.history[0]


@needs_sim
@pytest.mark.slow
def test_eval_benchmark_end_to_end(tmp_path):
    runner = CliRunner()
    d = tmp_path / "logs"
    d.mkdir()
    r = runner.invoke(app, ["sim", "generate", str(d / "b.h5"), "-n", "3", "--frames", "12",
                            "--size", "32", "--workers", "1"])  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["pretrain", str(d / "b.h5"), "-r", "pretrain/tiny", "--set",
                            "data.num_workers=0", "--set", "optim.max_steps=5", "--set-base",
                            "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    out = tmp_path / "res" / "ood.json"
    args = ["eval", "benchmark", "-p", "night_shift", "-s", "0", "-a", "default", "--closed-loop", "0",
            "--steps", "2", "--episodes", "2", "--test-episodes", "2",
            "--frames", "12", "--size", "32", "--policy-steps", "20",
            "--set", "data.num_workers=0", "--set", "optim.batch_size=4",
            "--workdir", str(tmp_path / "w"), "--out", str(out), "--overwrite", "--json"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert json.loads(out.read_text())["summary"] == res["summary"]
    # The adapter went through `finetune`'s own job (adapt_site), registered in the benchmark's
    # registry under the work folder with the seed's image policies pinned to its site; the
    # user's registry holds no benchmark adapter.
    r = runner.invoke(app, ["adapters", "list", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [], r.output
    sandbox = f"sqlite:///{tmp_path / 'w' / 'registry' / 'mlflow.db'}"
    r = runner.invoke(app, ["--tracking-uri", sandbox, "adapters", "list", "--json"])
    assert r.exit_code == 0, r.output
    (adapter,) = json.loads(r.stdout)
    site = adapter["tags"]["site"]
    r = runner.invoke(
        app, ["--tracking-uri", sandbox, "policies", "list", "--site", site, "--json"]
    )
    assert r.exit_code == 0, r.output
    assert sorted(p["tags"]["name"] for p in json.loads(r.stdout)) == [
        "bc",
        "diffusion",
        "image_only",
    ]
    # A second invocation reuses the finished runs (kept per run under the work folder).
    kept = sorted(p.name for p in (tmp_path / "w" / "results").iterdir())
    assert len(kept) == 2 and "night_shift_s0_default_" in kept[0] and "_s0_none_" in kept[1]
    r2 = runner.invoke(app, args)
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["runs"] == res["runs"]
    # Trained policies and adapters are kept too; a run recomputed with the reloaded policies
    # and adapter (every score redone) gives the same row as with the freshly trained ones.
    kept_policies = sorted(p.name.split("_s0_")[0] for p in (tmp_path / "w" / "policies").iterdir())
    assert kept_policies == sorted(["bc", "diffusion", "image_only", "proprio_only", "cnn"])
    (tmp_path / "w" / "results" / kept[0]).unlink()
    r3 = runner.invoke(app, args)
    assert r3.exit_code == 0, r3.output
    untimed = [[{k: v for k, v in row.items() if k != "seconds"} for row in rr["runs"]]
               for rr in (json.loads(r3.stdout), res)]  # fmt: skip
    assert untimed[0] == untimed[1]
    assert [row["ablation"] for row in res["runs"]] == ["none", "default"]
    none, ad = res["runs"]
    # The proprio-only control reads no image: identical under every encoder.
    assert none["shifted"]["proprio_only"] == ad["shifted"]["proprio_only"]
    assert res["summary"]["none"]["heads"]["bc"]["reduction"]["mean"] == 0.0
    want = 1 - ad["shifted"]["bc"]["mse"] / none["shifted"]["bc"]["mse"]
    assert res["summary"]["default"]["heads"]["bc"]["reduction"]["mean"] == pytest.approx(want)
    assert ad["audit_detail"]
    failed = any(d["failed"] for d in ad["audit_detail"].values())
    assert (ad["audit"] == "incompatible") == failed and ad["audit"] != "unaudited"
    # Logged to MLflow with the JSON (and the PNG when matplotlib is there).
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store(None))
    arts = [a.path for a in reg.client.list_artifacts(res["mlflow_run_id"], "benchmark")]
    assert "benchmark/ood.json" in arts
    if importlib.util.find_spec("matplotlib") is not None:
        assert "benchmark/ood.png" in arts and out.with_suffix(".png").stat().st_size > 1000
    # default_fit reuses default's training (one run folder) and scales it to the largest
    # strength its audit passes; at strength 1 it is the default adapter itself.
    i = args.index("default")
    fit_args = [*args[: i + 1], "-a", "default_fit", "--tolerance", "1e-9", *args[i + 1 :]]
    r4 = runner.invoke(app, fit_args)
    assert r4.exit_code == 0, r4.output
    assert len(list((tmp_path / "w" / "runs").iterdir())) == 1
    rows = {row["ablation"]: row for row in json.loads(r4.stdout)["runs"]}
    fit = rows["default_fit"]
    assert fit["strength"] == fit["strength_fit"]["strength"] and fit["strength_fit"]["trials"]
    # A tolerance nothing meets leaves strength 0: the base encoder, scored like `none`.
    assert fit["strength"] == 0.0 and fit["audit"] == "compatible"
    assert fit["shifted"]["bc"]["mse"] == pytest.approx(rows["none"]["shifted"]["bc"]["mse"])
    assert rows["default"]["strength"] == 1.0 and rows["none"]["strength"] == 0.0
    # Other sizes are other training data: the adapter is trained again, not reused.
    j = fit_args.index("--episodes")
    r5 = runner.invoke(app, [*fit_args[: j + 1], "3", *fit_args[j + 2 :]])
    assert r5.exit_code == 0, r5.output
    assert len(list((tmp_path / "w" / "runs").iterdir())) == 2
    # The cascade (`finetune --fallback`): default_retain, and as its audit fails at full
    # strength (nothing meets this tolerance), default_retain_area_fit, here at strength 0.
    k = fit_args.index("default_fit")
    cascade = [*fit_args[: k + 1], "-a", "default_retain_cascade", *fit_args[k + 1 :]]
    r6 = runner.invoke(app, cascade)
    assert r6.exit_code == 0, r6.output
    rows = {row["ablation"]: row for row in json.loads(r6.stdout)["runs"]}
    c = rows["default_retain_cascade"]
    assert c["trained_as"] == "default_retain_area_fit" and c["strength"] == 0.0
    assert c["shifted"]["bc"]["mse"] == pytest.approx(rows["none"]["shifted"]["bc"]["mse"])
    # + default_retain, its fallback trained in the same folder as `finetune --fallback` does
    runs = list((tmp_path / "w" / "runs").iterdir())
    assert len(runs) == 3 and sum((d / "fallback-1" / "adapter").is_dir() for d in runs) == 1
    # At a tolerance everything meets, the first recipe's adapter is kept at full strength.
    easy = [a if a != "1e-9" else "1e9" for a in cascade]
    r7 = runner.invoke(app, easy)
    assert r7.exit_code == 0, r7.output
    c = {row["ablation"]: row for row in json.loads(r7.stdout)["runs"]}["default_retain_cascade"]
    assert c["trained_as"] == "default_retain_cascade" and c["strength"] == 1.0


def test_sharded_batches_split_every_global_batch_evenly():
    from dynaflip_adapt.train.distributed import Dist, ShardedBatches

    order = list(range(20))
    one = list(ShardedBatches(order, 8, Dist()))
    two = [list(ShardedBatches(order, 8, Dist(rank=r, world=2))) for r in (0, 1)]
    assert one == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    for b, (r0, r1) in zip(one, zip(*two, strict=False), strict=False):
        assert r0 + r1 == b  # rank 0 takes the first half, rank 1 the second
    assert two[0][-1] == [16, 17] and two[1][-1] == [18, 19]
    assert Dist(rank=1, world=2).shard(torch.arange(6)).tolist() == [3, 4, 5]
