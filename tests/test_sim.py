"""The simulator's labels are physically right, not just well-shaped."""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

if importlib.util.find_spec("mujoco") is None:
    pytest.skip("the sim extra (mujoco) is not installed", allow_module_level=True)

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.data.logs import EpisodeReader, open_logs
from dynaflip_adapt.flow.geometry import backproject, grid_pixels, project
from dynaflip_adapt.sim import expert as E
from dynaflip_adapt.sim.env import SimState, TabletopEnv, ground_truth_flow
from dynaflip_adapt.sim.expert import Expert, make_spec, run_episode, run_expert
from dynaflip_adapt.sim.generate import GenerateSpec, iter_episodes
from dynaflip_adapt.sim.scene import OBJECT_HALF, OBJECTS
from dynaflip_adapt.sim.sites import PRESETS, get_site

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def env():
    e = TabletopEnv(PRESETS["base"], 64)
    yield e
    e.close()


def _reset(env, seed=0, task="pick_place"):
    spec = make_spec(task, np.random.default_rng(seed))
    E.reset(env, spec)
    return spec


def test_depth_matches_ray_casts_through_pixel_centres(env):
    import mujoco

    _reset(env)
    fr = env.render()
    K, E = env.intrinsics(), env.extrinsics()
    rng = np.random.default_rng(0)
    uv = rng.integers(0, 64, (40, 2))
    origin = E[:3, 3]
    geomid = np.zeros(1, np.int32)
    errs = []
    for u, v in uv:
        ray_cam = np.array([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], 1.0])
        ray = E[:3, :3] @ ray_cam
        dist = mujoco.mj_ray(env.model, env.data, origin, ray, None, 1, -1, geomid)
        if dist < 0 or fr.depth[v, u] == 0:
            continue
        errs.append(abs(dist - fr.depth[v, u]))  # ray has unit z: distance along it = z-depth
    assert len(errs) > 30
    assert np.max(errs) < 1e-3, np.max(errs)


def test_backprojected_depth_lands_on_rendered_surfaces(env):
    _reset(env, seed=3)
    fr = env.render()
    uv = grid_pixels(64, 64, 1)
    X = backproject(fr.depth, env.intrinsics(), env.extrinsics(), uv)
    body = fr.body[uv[:, 1], uv[:, 0]]
    table = body == 0  # the table and floor belong to the world body
    on_top = table & (np.abs(X[:, 2]) < 0.01)
    assert on_top.sum() > 200
    for b in env.obj_body:
        sel = body == b
        assert sel.sum() >= 3
        T = env.body_poses()[b]
        local = (X[sel] - T[:3, 3]) @ T[:3, :3]
        # Every point is on the object: inside its half-extent and on its boundary.
        assert np.abs(local).max() < OBJECT_HALF + 2e-3
        assert np.median(np.abs(local).max(axis=1)) > OBJECT_HALF - 3e-3


def test_ground_truth_flow_agrees_with_next_frame_far_more_than_zero_flow(env):
    spec = _reset(env, seed=1)
    expert = Expert(spec)
    K = env.intrinsics()
    uv = grid_pixels(64, 64, 2)
    agree_gt, agree_zero, n = 0, 0, 0
    prev = env.render(), env.body_poses(), env.extrinsics()
    for _ in range(29):
        env.step(expert.act(env.state()))
        cur = env.render(), env.body_poses(), env.extrinsics()
        pts, delta, valid = ground_truth_flow(
            prev[0], cur[0], prev[1], cur[1], K, prev[2], cur[2], uv
        )
        moving = valid & (np.linalg.norm(delta, axis=1) > 0.003)
        if moving.any():
            src_body = prev[0].body[uv[moving, 1], uv[moving, 0]]
            for cand, counter in ((pts[moving] + delta[moving], "gt"), (pts[moving], "zero")):
                pix, z = project(cand.astype(np.float64), K, cur[2])
                pi = np.clip(np.round(pix).astype(int), 0, 63)
                ok = (np.abs(cur[0].depth[pi[:, 1], pi[:, 0]] - z) < 0.01) & (
                    cur[0].body[pi[:, 1], pi[:, 0]] == src_body
                )
                if counter == "gt":
                    agree_gt += int(ok.sum())
                else:
                    agree_zero += int(ok.sum())
            n += int(moving.sum())
        prev = cur
    assert n > 100
    assert agree_gt / n > 0.9, agree_gt / n
    assert agree_zero / n < 0.5 * agree_gt / n, (agree_zero / n, agree_gt / n)


@pytest.mark.parametrize("task", ["pick_place", "push", "reach"])
def test_scripted_experts_succeed_with_and_without_recording_noise(task):
    physics = TabletopEnv(PRESETS["base"], 32, render=False)
    for noise in (0.0, E.DART_STD):
        wins = [run_expert(physics, 500 + s, task, 50, noise) for s in range(8)]
        assert all(wins), (noise, wins)
    physics.close()


def test_recorded_episodes_end_after_success_and_log_clean_labels(env):
    ep = run_episode(env, 3, "reach", 50, (1,), 8, noise=E.DART_STD)
    assert ep.attrs["success"] and E.MIN_FRAMES <= ep.length < 50
    assert ep.length == max(E.MIN_FRAMES, ep.attrs["success_frame"] + E.HOLD_FRAMES)
    # DART: the executed motion was perturbed, the logged action is the expert's own at the
    # state reached (replaying the states through the expert gives the logged actions).
    clean = run_episode(env, 3, "reach", 50, (1,), 8, noise=0.0)
    assert not np.allclose(ep.proprio["robot0_eef_pos"][5], clean.proprio["robot0_eef_pos"][5])
    assert ep.proprio["object_state"].shape == (ep.length, 11)


def _state(eef, fingers, objects, plate):
    return SimState(np.asarray(eef, float), np.asarray(fingers, float),
                    np.asarray(objects, float), np.asarray(plate, float))  # fmt: skip


def test_experts_act_on_the_state_alone():
    """Markov: the same state gives the same action whenever it is visited, and the action
    points where the task needs the gripper next (the old experts followed a clock)."""
    spec = make_spec("pick_place", np.random.default_rng(4))
    objs = np.c_[spec.objects, np.full(3, OBJECT_HALF)]
    o, plate = objs[spec.target], spec.plate
    ex = Expert(spec)
    open_ = [0.035, 0.035]
    far = _state([0.3, 0.0, 0.2], open_, objs, plate)
    a1, a2 = ex.act(far), Expert(spec).act(far)
    np.testing.assert_array_equal(a1, a2)
    heading = a1[:2] / np.linalg.norm(a1[:2])
    to_obj = (o[:2] - far.eef[:2]) / np.linalg.norm(o[:2] - far.eef[:2])
    assert heading @ to_obj > 0.99 and a1[3] > 0  # toward the object, gripper open
    at_grasp = _state([o[0], o[1], E.GRASP_Z], open_, objs, plate)
    assert Expert(spec).act(at_grasp)[3] < 0  # close
    held = objs.copy()
    held[spec.target] = [o[0], o[1], 0.1]
    carrying = _state([o[0], o[1], 0.1], [0.019, 0.019], held, plate)
    a = Expert(spec).act(carrying)
    assert a[3] < 0 and a[2] > 0  # keep holding, lift first


def test_reach_has_a_real_success_predicate():
    spec = make_spec("reach", np.random.default_rng(0))
    objs = np.c_[spec.objects, np.full(3, OBJECT_HALF)]
    o = objs[spec.target]
    start = objs
    above = _state([o[0], o[1], E.REACH_Z], [0.035, 0.035], objs, spec.plate)
    home = _state([0.3, 0.0, 0.2], [0.035, 0.035], objs, spec.plate)
    beside = _state([o[0] + 0.05, o[1], E.REACH_Z], [0.035, 0.035], objs, spec.plate)
    assert E.success(spec, start, above)
    assert not E.success(spec, start, home) and not E.success(spec, start, beside)


def test_push_succeeds_past_its_line_only():
    spec = make_spec("push", np.random.default_rng(1))
    objs = np.c_[spec.objects, np.full(3, OBJECT_HALF)]
    d = E.DIRECTIONS[spec.direction]
    gap = E._to_line(objs[spec.target], spec.direction)
    assert E.PUSH_RANGE[0] <= gap <= E.PUSH_RANGE[1]
    moved = objs.copy()
    moved[spec.target, :2] += (gap + 0.01) * d
    short = objs.copy()
    short[spec.target, :2] += (gap - 0.01) * d
    eef = [0.3, 0.0, 0.2]
    assert E.success(spec, objs, _state(eef, [0, 0], moved, spec.plate))
    assert not E.success(spec, objs, _state(eef, [0, 0], short, spec.plate))


def test_same_seed_other_site_is_paired(tmp_path):
    a = TabletopEnv(PRESETS["base"], 32)
    b = TabletopEnv(PRESETS["night_shift"], 32)
    ea = run_episode(a, 7, "push", 20, (1,), 8)
    eb = run_episode(b, 7, "push", 20, (1,), 8)
    assert ea.length == eb.length
    np.testing.assert_allclose(ea.actions, eb.actions, atol=1e-6)
    np.testing.assert_allclose(
        ea.proprio["robot0_eef_pos"], eb.proprio["robot0_eef_pos"], atol=1e-6
    )
    assert ea.language == eb.language
    diff = np.abs(ea.rgb["agentview"].astype(int) - eb.rgb["agentview"]).mean()
    assert diff > 20, diff
    a.close()
    b.close()


def test_random_sites_differ_and_unknown_site_is_rejected():
    from dynaflip_adapt.errors import InputError

    assert get_site("random", 1) != get_site("random", 2)
    assert get_site("random-5") == get_site("random", 5)
    with pytest.raises(InputError, match="base"):
        get_site("moon")


def test_a_blended_site_lies_between_its_ends():
    """``SITE@T``, the mild shifts `monitor` is calibrated on: exact at both ends, the mean
    half-way, and images whose difference to the base grows with T."""
    from dataclasses import replace

    from dynaflip_adapt.errors import InputError

    base = PRESETS["base"]
    for name, site in PRESETS.items():
        assert replace(get_site(f"{name}@0"), name="base") == base
        assert replace(get_site(f"{name}@1"), name=name) == site
    half, warm = get_site("warm_dim@0.5"), PRESETS["warm_dim"]
    assert half.ambient == pytest.approx((base.ambient + warm.ambient) / 2)
    assert half.camera == base.camera and half.shadows is True  # switches at half-way
    cam = get_site("camera@0.25").camera
    assert cam.azimuth == pytest.approx(0.75 * base.camera.azimuth + 0.25 * 155.0)
    assert get_site("random-3@0.5").name == "random-3@0.5"
    for bad in ("warm_dim@1.5", "warm_dim@x", "moon@0.5"):
        with pytest.raises(InputError):
            get_site(bad)
    spec = {"episodes": 1, "frames": 10, "seed": 4, "size": 32}
    eps = {t: next(iter_episodes(GenerateSpec(site=get_site(f"warm_dim@{t}"), **spec), 1))
           for t in (0, 0.25, 1)}  # fmt: skip
    d = [np.abs(eps[t].rgb["agentview"].astype(int) - eps[0].rgb["agentview"]).mean()
         for t in (0.25, 1)]  # fmt: skip
    assert 0 < d[0] < d[1], d


def test_cli_generate_writes_valid_logs_and_exports(tmp_path):
    out = tmp_path / "site.h5"
    r = CliRunner().invoke(
        app,
        [
            "sim", "generate", str(out), "-n", "2", "--frames", "12", "--size", "32",
            "--workers", "1", "--site", "warm_dim", "--export", "robomimic",
            "--export", "aloha_jpeg", "--json",
        ],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["episodes"] == 2 and res["frames"] == 24
    v = CliRunner().invoke(app, ["data", "validate", str(tmp_path), "--json"])
    assert v.exit_code == 0, v.output
    layouts = sorted(f["layout"] for f in json.loads(v.stdout)["files"])
    assert layouts == ["aloha_jpeg", "aloha_jpeg", "native", "robomimic"]
    native = open_logs(out).episodes
    assert native[0].has("depth") and native[0].has("extrinsics")
    assert [f.stride for f in native[0].flows] == [1, 4]
    rm = open_logs(tmp_path / "site_robomimic.hdf5").episodes
    rd = EpisodeReader()
    np.testing.assert_array_equal(rd.rgb(rm[1], 5), rd.rgb(native[1], 5))
    np.testing.assert_allclose(rd.actions(rm[1], 3), rd.actions(native[1], 3), atol=1e-6)


def test_cli_rejects_bad_generate_options(tmp_path):
    r = CliRunner().invoke(app, ["sim", "generate", str(tmp_path / "x.h5"), "--task", "fly"])
    assert r.exit_code == 2 and "pick_place" in r.stderr
    r = CliRunner().invoke(
        app, ["sim", "generate", str(tmp_path / "x.h5"), "--frames", "10", "--flow-stride", "12"]
    )
    assert r.exit_code == 2 and "--flow-stride" in r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_cli_camera_holds_one_rig_while_the_appearance_changes(tmp_path):
    def gen(name, *opts):
        r = CliRunner().invoke(
            app,
            ["sim", "generate", str(tmp_path / name), "-n", "1", "--frames", "10", "--size", "32",
             "--workers", "1", "--seed", "5", "--task", "reach", *opts],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        ep = open_logs(tmp_path / name).episodes[0]
        rd = EpisodeReader()
        return rd.rgb(ep, 0).astype(int), rd.extrinsics(ep, 0), rd.intrinsics(ep, 0)

    base = gen("base.h5", "--site", "base")
    own = gen("own.h5", "--site", "random", "--site-seed", "3")
    held = gen("held.h5", "--site", "random", "--site-seed", "3", "--camera", "base")
    # The base rig exactly (pose and field of view), not the random site's own ...
    np.testing.assert_allclose(held[1], base[1], atol=1e-6)
    np.testing.assert_allclose(held[2], base[2], atol=1e-6)
    assert np.abs(own[1] - base[1]).max() > 1e-2
    # ... and the random site's appearance, not the base site's.
    assert np.abs(held[0] - base[0]).mean() > 10, np.abs(held[0] - base[0]).mean()
    with h5py.File(tmp_path / "held.h5", "r") as f:  # the site name finetune --site defaults to
        assert f.attrs["site"] == "random-3-camera-base"
    r = CliRunner().invoke(
        app, ["sim", "generate", str(tmp_path / "x.h5"), "--camera", "moon", "-n", "1"]
    )
    assert r.exit_code == 2 and "--camera" in r.stderr and "random-N" in r.stderr, r.stderr
    # It offers only what --camera takes: bare 'random' needs a seed it has no room for.
    assert "random," not in r.stderr and "'random'" not in r.stderr, r.stderr
    assert not (tmp_path / "x.h5").exists()
    r = CliRunner().invoke(
        app, ["sim", "generate", str(tmp_path / "x.h5"), "--camera", "random", "-n", "1"]
    )
    assert r.exit_code == 2 and "random-N" in r.stderr and not (tmp_path / "x.h5").exists()


def test_objects_are_named_in_language():
    words = {f"{c} {s}" for _, s, c, _ in OBJECTS}
    spec = make_spec("reach", np.random.default_rng(0))
    assert any(w in spec.language for w in words)
    assert f"{OBJECTS[spec.target][2]} {OBJECTS[spec.target][1]}" in spec.language


@pytest.mark.parametrize("task", ["pick_place", "push"])
def test_the_object_the_instruction_names_is_the_one_that_moves(task):
    """Read back by MuJoCo body name (not the generator's own index): the body whose colour the
    instruction names is the one the expert displaced, and no other object moved as far."""
    import mujoco

    physics = TabletopEnv(PRESETS["base"], 32, render=False)
    colours = [c for _, _, c, _ in OBJECTS]
    bodies = {c: physics.model.body(name).id for name, _, c, _ in OBJECTS}

    def where() -> dict[str, np.ndarray]:
        mujoco.mj_forward(physics.model, physics.data)
        return {c: physics.data.xpos[b][:2].copy() for c, b in bodies.items()}

    for seed in range(6):
        spec = make_spec(task, E.episode_rngs(seed)[0])
        named = [c for c in colours if f"{c} " in spec.language]
        assert len(named) == 1, spec.language
        E.reset(physics, spec)
        before = where()
        assert run_expert(physics, seed, task, 50)
        moved = {c: float(np.linalg.norm(where()[c] - before[c])) for c in colours}
        assert moved[named[0]] > 0.04, (spec.language, moved)
        assert all(moved[c] < 0.5 * moved[named[0]] for c in colours if c != named[0]), moved
    physics.close()


def test_object_heads_tell_objects_apart_by_the_logged_target(tmp_path):
    """`collect(objects=True)` places each episode's instructed object in the simulator's
    object order (what slot k of an object head is held to): the place agrees with the
    instruction's colour word, and a log without the attribute is refused, naming it."""
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.policies import collect

    path = tmp_path / "s.h5"
    r = CliRunner().invoke(app, ["sim", "generate", str(path), "-n", "6", "--frames", "12",
                                 "--size", "32", "--workers", "1", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    logs = open_logs([path])
    d = collect(logs, EpisodeReader(), 32, state=True, objects=True)
    for i, ep in enumerate(logs.episodes):
        k = int(d["target_index"][d["episode"] == i].unique())
        colour = OBJECTS[k][2]
        assert colour in ep.language, (ep.language, colour)
    with h5py.File(path, "a") as f:
        del f[f"data/{logs.episodes[2].group.split('/')[-1]}"].attrs["target_object"]
    with pytest.raises(InputError, match="target_object"):
        collect(open_logs([path]), EpisodeReader(), 32, state=True, objects=True)
