"""3D flow extraction: exact on a synthetic moving camera, accurate on simulator logs."""

from __future__ import annotations

import importlib.util

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.data.logs import EpisodeReader, open_logs
from dynaflip_adapt.data.writer import EpisodeData, NativeWriter
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.flow.extract import ExtractConfig, _bilinear, extract_episode, extract_logs
from tests.builders import write_robomimic_file

runner = CliRunner()


def _texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h // 4, w // 4, 3)).astype(np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def _moving_camera_log(
    path, shift_px: int = 2, Z: float = 1.0, f: float = 100.0, wrong_extrinsics=False
):
    """A fronto-parallel textured wall at depth Z; the camera slides right so the image content
    moves left by `shift_px` pixels per frame. The scene is static: world flow must be 0."""
    H = W = 64
    T = 4
    big = _texture(H, W + shift_px * T + 8)
    rgb = np.stack([big[:, t * shift_px : t * shift_px + W] for t in range(T)])
    K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1.0]])
    extr = np.tile(np.eye(4), (T, 1, 1))
    if not wrong_extrinsics:
        extr[:, 0, 3] = np.arange(T) * shift_px * Z / f
    ep = EpisodeData(
        rgb={"agentview": rgb},
        actions=np.zeros((T, 4), np.float32),
        language="look at the wall",
        depth={"agentview": np.full((T, H, W), Z, np.float32)},
        intrinsics={"agentview": K},
        extrinsics={"agentview": extr},
    )
    with NativeWriter(path) as w:
        w.add(ep)
    return path


def test_static_scene_seen_by_a_moving_camera_has_zero_world_flow(tmp_path):
    p = _moving_camera_log(tmp_path / "wall.h5")
    ep = open_logs(p).episodes[0]
    flow = extract_episode(EpisodeReader(), ep, ExtractConfig(grid=4))
    v = flow["valid"]
    assert v.mean() > 0.7
    assert np.abs(flow["delta"][v]).max() < 0.003  # metres; the camera moved 20 mm per frame
    # The same pixels with the camera motion ignored: 2 px at f=100, Z=1 is 20 mm.
    p2 = _moving_camera_log(tmp_path / "wall2.h5", wrong_extrinsics=True)
    flow2 = extract_episode(EpisodeReader(), open_logs(p2).episodes[0], ExtractConfig(grid=4))
    v2 = flow2["valid"]
    np.testing.assert_allclose(np.median(flow2["delta"][v2][:, 0]), -0.02, atol=0.002)
    # Points at frame t are the back-projected grid pixels.
    u, vv = flow["pixels"][0]
    np.testing.assert_allclose(
        flow["points"][0, 0], [(u - 31.5) / 100, (vv - 31.5) / 100, 1.0], atol=1e-6
    )


def test_bilinear_matches_a_hand_computation():
    img = np.arange(12, dtype=np.float64).reshape(3, 4)
    val, nb = _bilinear(img, np.array([[1.25, 0.5]]))
    expected = 0.5 * (0.75 * img[0, 1] + 0.25 * img[0, 2]) + 0.5 * (
        0.75 * img[1, 1] + 0.25 * img[1, 2]
    )
    assert val[0] == pytest.approx(expected)
    assert sorted(nb[0]) == [1, 2, 5, 6]


def test_no_depth_is_a_clear_error_naming_the_missing_anchors(tmp_path):
    p, _ = write_robomimic_file(tmp_path / "rm.h5")
    r = runner.invoke(app, ["flow", "extract", str(p)])
    assert r.exit_code == 2
    assert "flow anchors" in r.stderr and "rm.h5" in r.stderr


def test_existing_group_needs_overwrite_and_partial_groups_are_ignored(tmp_path):
    p = _moving_camera_log(tmp_path / "wall.h5")
    extract_logs([p], ExtractConfig())
    with pytest.raises(InputError, match="--overwrite"):
        extract_logs([p], ExtractConfig())
    extract_logs([p], ExtractConfig(), overwrite=True)
    with h5py.File(p, "a") as f:
        f["data/demo_0/flow"].create_group(".dis.partial")
    ep = open_logs(p).episodes[0]
    assert [fl.source for fl in ep.flows] == ["dis"]


@pytest.mark.sim
def test_extracted_flow_is_accurate_on_simulator_logs(tmp_path):
    if importlib.util.find_spec("mujoco") is None:
        pytest.skip("the sim extra (mujoco) is not installed")
    out = tmp_path / "sim.h5"
    r = runner.invoke(
        app,
        ["sim", "generate", str(out), "-n", "3", "--frames", "24", "--size", "96", "--workers", "1",
         "--flow-stride", "1", "--task", "pick_place", "--task", "push"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["flow", "extract", str(out), "--json"])
    assert r.exit_code == 0, r.output
    import json

    r = runner.invoke(app, ["flow", "eval", str(out), "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["moving_points"] > 200
    assert ev["point_mismatch_mm"] < 1e-3  # same pixels, same depth: same points
    assert ev["epe_median_mm"] < 10.0, ev
    assert ev["found_fraction"] > 0.7, ev
    assert ev["static_epe_median_mm"] < 1.0, ev
