"""Closed-loop evaluation: episodes paired with `sim generate`, Wilson intervals, determinism,
and `eval rollout` through the CLI on a real registry."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.sim.rollout import EpisodeResult, success_table, wilson

runner = CliRunner()
needs_sim = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None, reason="needs the sim extra"
)


def _wilson_reference(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927) solved as the roots of the quadratic (p - phat)^2 = z^2 p (1 - p) / n."""
    phat = k / n
    a = 1 + z * z / n
    b = -(2 * phat + z * z / n)
    c = phat * phat
    disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


@pytest.mark.parametrize("k,n", [(0, 10), (10, 10), (5, 10), (1, 30), (27, 30), (3, 7)])
def test_wilson_interval_solves_its_quadratic(k, n):
    lo, hi = wilson(k, n, z=1.959963984540054)
    rlo, rhi = _wilson_reference(k, n)
    assert lo == pytest.approx(rlo, abs=1e-9) and hi == pytest.approx(rhi, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_success_table_counts_per_task():
    rs = [EpisodeResult(i, i, t, "x", s, 5) for i, (t, s) in
          enumerate([("push", True), ("push", False), ("reach", True), ("reach", True)])]  # fmt: skip
    t = success_table(rs)
    assert (t["push"]["successes"], t["push"]["episodes"]) == (1, 2)
    assert (t["reach"]["successes"], t["all"]["successes"], t["all"]["episodes"]) == (2, 3, 4)
    assert t["all"]["rate"] == 0.75 and t["all"]["ci95"] == list(wilson(3, 4))


@needs_sim
def test_rollout_episodes_are_the_scenes_sim_generate_records():
    from dynaflip_adapt.sim.generate import GenerateSpec, _jobs
    from dynaflip_adapt.sim.rollout import RolloutConfig, episode_plan
    from dynaflip_adapt.sim.sites import get_site

    site = get_site("night_shift")
    plan = episode_plan(RolloutConfig(site, seed=77, episodes=7))
    jobs = _jobs(GenerateSpec(site, episodes=7, seed=77))
    assert [(i, s, t) for i, s, t in plan] == [(j[0], j[1], j[2]) for j in jobs]


class _Wobbly:
    """A deterministic controller with a little of everything: it reads the proprio and the
    frame, so the run is deterministic only if both are."""

    def reset(self, slots, obs):
        pass

    def act(self, slots, obs):
        out = []
        for o in obs:
            p = np.concatenate([np.ravel(v) for v in o["proprio"].values()])
            shade = float(o["rgb"].mean()) / 255.0 if o["rgb"] is not None else 0.0
            out.append(np.tanh([p[0] - 0.4, p[1], shade - 0.5, p[2] - 0.1]))
        return np.stack(out)


@needs_sim
def test_closed_loop_is_deterministic_and_the_expert_succeeds():
    from dynaflip_adapt.sim.rollout import ExpertController, RolloutConfig, run_rollouts
    from dynaflip_adapt.sim.sites import get_site

    cfg = RolloutConfig(get_site("base"), seed=3, episodes=6, horizon=12, render_size=32,
                        envs=4, workers=2, record=2)  # fmt: skip
    a = run_rollouts(cfg, _Wobbly())
    b = run_rollouts(cfg, _Wobbly())
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert all(np.array_equal(x, y) for x, y in zip(a[0].frames, b[0].frames, strict=True))
    assert len(a[0].frames) == a[0].steps and not a[2].frames  # only the first two recorded
    expert = run_rollouts(RolloutConfig(get_site("base"), seed=3, episodes=6, envs=3),
                          ExpertController(), render=False)  # fmt: skip
    assert all(r.success for r in expert) and max(r.steps for r in expert) < 50


@pytest.fixture(scope="module")
def sim_fleet(tmp_path_factory):
    """Simulator logs, a tiny backbone, an oracle policy and a bc policy at site 'lab'."""
    if importlib.util.find_spec("mujoco") is None:
        pytest.skip("needs the sim extra")
    from dynaflip_adapt.cli.app import app

    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("DYNAFLIP_HOME")
    os.environ["DYNAFLIP_HOME"] = str(home)
    d = tmp_path_factory.mktemp("logs")
    logs = str(d / "lab.h5")

    def ok(args):
        r = runner.invoke(app, [*args, "--json"])
        assert r.exit_code == 0, (args, r.output)
        return json.loads(r.stdout)

    ok(["sim", "generate", logs, "-n", "6", "--frames", "16", "--size", "32", "--workers", "1"])
    ok(["pretrain", logs, "-r", "pretrain/tiny", "--set", "data.num_workers=0",
        "--set", "optim.max_steps=4", "--set-base"])  # fmt: skip
    oracle = ok(["policies", "train", logs, "--site", "lab", "--head", "oracle", "--steps", "30",
                 "--name", "oracle"])  # fmt: skip
    bc = ok(["policies", "train", logs, "--site", "lab", "--head", "bc", "--steps", "30"])
    ad = ok(["finetune", logs, "--site", "lab", "--steps", "2", "--set", "data.num_workers=0",
             "--set", "optim.batch_size=4"])  # fmt: skip
    yield {"logs": logs, "oracle": oracle["policy"]["version"], "bc": bc["policy"]["version"],
           "adapter": ad["adapter"]["version"], "ok": ok, "app": app}  # fmt: skip
    if old is None:
        os.environ.pop("DYNAFLIP_HOME", None)
    else:
        os.environ["DYNAFLIP_HOME"] = old


@needs_sim
@pytest.mark.shared_home
@pytest.mark.slow
def test_eval_rollout_pairs_cells_and_logs_videos(sim_fleet, tmp_path):
    ok = sim_fleet["ok"]
    out = ok(["eval", "rollout", "--site", "base", "--site", "random-5", "--policies-of", "lab",
              "--adapter", sim_fleet["adapter"], "--episodes", "3", "--horizon", "6",
              "--render-size", "32", "--envs", "3", "--videos", "1", "--seed", "9"])  # fmt: skip
    cells = {(c["site"], c["encoder"], c["head"]): c for c in out["cells"]}
    # bc reads the backbone: base and adapter; the oracle reads no image: once per site.
    assert set(cells) == {(s, e, h) for s in ("base", "random-5") for e, h in
                          [("base", "bc"), (f"adapter v{sim_fleet['adapter']}", "bc"), ("-", "oracle")]}  # fmt: skip
    for c in out["cells"]:
        assert [e["index"] for e in c["episodes"]] == [0, 1, 2]  # paired: the same episodes
        assert c["success"]["all"]["episodes"] == 3
        assert len(c["videos"]) == 1
    seeds = {tuple(e["seed"] for e in c["episodes"]) for c in out["cells"]}
    assert len(seeds) == 1
    assert out["expert"]["base"]["all"]["episodes"] == 3
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    run = reg.client.get_run(out["mlflow_run_id"])
    assert any(k.startswith("success.random-5.base.") for k in run.data.metrics)
    arts = [a.path for a in reg.client.list_artifacts(out["mlflow_run_id"], "videos")]
    assert len(arts) == len(out["cells"]) and all(a.endswith(".gif") for a in arts)


@needs_sim
@pytest.mark.shared_home
def test_eval_rollout_bad_input_is_one_line(sim_fleet, tmp_path):
    from dynaflip_adapt.policies import load_policy, save_policy

    app = sim_fleet["app"]
    r = runner.invoke(app, ["eval", "rollout", "--site", "moon_base", "--policies-of", "lab"])
    assert r.exit_code == 2 and "moon_base" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A policy for another robot: 7-D actions.
    info = sim_fleet["ok"](["policies", "show", sim_fleet["oracle"]])
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL

    pol = load_policy(reg.download(reg.resolve(POLICY_MODEL, info["version"]["version"]), "p"))
    spec = {**pol.spec, "action_dim": 7}
    stats = {**pol.stats, "act_mean": torch.zeros(7), "act_std": torch.ones(7)}
    stats.pop("bin_mask", None)
    # Weights that do not fit the spec: refused when loading, in one line.
    folder = save_policy(tmp_path / "torn", pol.head, spec, stats)
    r = runner.invoke(app, ["eval", "rollout", "--site", "base", "--policy", str(folder)])
    assert r.exit_code == 2 and "do not fit policy.json" in r.stderr, r.output
    from dynaflip_adapt.policies import build_head
    from dynaflip_adapt.policies.policy import head_dims

    folder = save_policy(tmp_path / "seven", build_head(spec, *head_dims(spec)), spec, stats)
    r = runner.invoke(app, ["eval", "rollout", "--site", "base", "--policy", str(folder)])
    assert r.exit_code == 2 and "action_dim" in r.stderr and "4 (the simulator's)" in r.stderr, (
        r.output
    )


@needs_sim
@pytest.mark.shared_home
def test_eval_rollout_runs_every_policy_folder_even_of_one_name(sim_fleet, tmp_path):
    """Policy folders are labelled by name; two folders of one name (every home's first policy
    is dynaflip-policy-v1) both run, labelled by path, and a folder given twice runs once."""
    from dynaflip_adapt.policies import load_policy, save_policy
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    pol = load_policy(reg.download(reg.resolve(POLICY_MODEL, sim_fleet["oracle"]), "p"))
    a = save_policy(tmp_path / "a" / "p", pol.head, pol.spec, pol.stats)
    b = save_policy(tmp_path / "b" / "p", pol.head, pol.spec, pol.stats)
    out = sim_fleet["ok"](["eval", "rollout", "--site", "base", "--policy", str(a), "--policy",
                           str(b), "--policy", str(a), "--episodes", "1", "--horizon", "2",
                           "--render-size", "32", "--envs", "1", "--no-expert", "--videos", "0"])  # fmt: skip
    assert sorted(c["policy"] for c in out["cells"]) == sorted([str(a.resolve()), str(b.resolve())])
