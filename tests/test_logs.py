"""Every layout maps to the same canonical episode view, with the right pixels and geometry."""

from __future__ import annotations

import numpy as np
import pytest

from dynaflip_adapt.data.logs import (
    EpisodeReader,
    SourceSettings,
    open_logs,
    orient_intrinsics,
    summarize,
)
from dynaflip_adapt.errors import InputError
from tests.builders import (
    write_aloha_folder,
    write_libero_file,
    write_native,
    write_robomimic_file,
)


def test_native_round_trip(tmp_path):
    path, eps = write_native(tmp_path / "site.h5", n=3)
    logs = open_logs(path)
    assert [e.name for e in logs.episodes] == ["demo_0", "demo_1", "demo_2"]
    r = EpisodeReader()
    for ep, src in zip(logs.episodes, eps, strict=True):
        assert ep.layout == "native" and ep.length == src.length
        assert ep.language == src.language
        assert ep.image_hw == (16, 20) and ep.action_dim == 7 and ep.proprio_dim == 5
        np.testing.assert_array_equal(r.rgb(ep, 3), src.rgb["agentview"][3])
        np.testing.assert_allclose(r.depth(ep, 2), src.depth["agentview"][2])
        np.testing.assert_allclose(r.actions(ep, 1), src.actions[1])
        np.testing.assert_allclose(r.intrinsics(ep, 0), src.intrinsics["agentview"])
        np.testing.assert_allclose(r.extrinsics(ep, 4), src.extrinsics["agentview"][4])
        pts, _delta, valid = r.flow(ep, 2)
        np.testing.assert_allclose(pts, src.flows["ground_truth"]["points"][2])
        np.testing.assert_array_equal(valid, src.flows["ground_truth"]["valid"][2])
        assert ep.flow().stride == 1 and ep.flow().num_points == 8
    r.close()


def test_robomimic_has_no_depth_or_language(tmp_path):
    path, eps = write_robomimic_file(tmp_path / "rm.hdf5")
    logs = open_logs(path)
    ep = logs.episodes[0]
    assert ep.layout == "robomimic"
    assert not ep.has("depth") and not ep.has("flow") and not ep.has("language")
    np.testing.assert_array_equal(EpisodeReader().rgb(ep, 0), eps[0].rgb["agentview"][0])
    # A language fallback is a per-source setting.
    ep2 = open_logs(path, SourceSettings(language="stack the blocks")).episodes[0]
    assert ep2.language == "stack the blocks"


def test_libero_is_rotated_back_and_has_language(tmp_path):
    path, eps = write_libero_file(tmp_path / "libero.hdf5")
    ep = open_logs(path).episodes[1]
    assert ep.layout == "libero" and ep.orientation == "rotate180"
    assert ep.language == "open the drawer"
    assert ep.cameras == ("agentview", "eye_in_hand") and ep.camera == "agentview"
    np.testing.assert_array_equal(EpisodeReader().rgb(ep, 2), eps[1].rgb["agentview"][2])
    # Forcing no orientation returns the stored (upside-down) pixels.
    raw = open_logs(path, SourceSettings(orientation="none")).episodes[1]
    np.testing.assert_array_equal(
        EpisodeReader().rgb(raw, 2), eps[1].rgb["agentview"][2][::-1, ::-1]
    )


def test_aloha_folder_one_file_per_episode(tmp_path):
    files, eps = write_aloha_folder(tmp_path / "aloha", n=3)
    logs = open_logs(tmp_path / "aloha")
    assert len(logs.files) == 3 and all(f.layout == "aloha" for f in logs.files)
    ep = logs.episodes[2]
    assert ep.cameras == ("cam_high", "cam_low") and ep.camera == "cam_high"
    assert ep.proprio_dim == 3  # qpos = first proprio key (eef pos)
    np.testing.assert_array_equal(EpisodeReader().rgb(ep, 1), eps[2].rgb["cam_high"][1])
    low = open_logs(files[0], SourceSettings(camera="cam_low")).episodes[0]
    np.testing.assert_array_equal(EpisodeReader().rgb(low, 0), eps[0].rgb["cam_low"][0])


def test_aloha_jpeg_decodes_close_to_original(tmp_path):
    files, eps = write_aloha_folder(tmp_path / "aj", n=1, jpeg=95)
    ep = open_logs(files).episodes[0]
    assert ep.layout == "aloha_jpeg" and ep.image_hw == (16, 20)
    img = EpisodeReader().rgb(ep, 3)
    assert img.shape == (16, 20, 3) and img.dtype == np.uint8
    # JPEG of random noise is lossy, but far closer to its source than to another frame.
    err_same = np.abs(img.astype(int) - eps[0].rgb["cam_high"][3]).mean()
    err_other = np.abs(img.astype(int) - eps[0].rgb["cam_high"][4]).mean()
    assert err_same < 0.5 * err_other
    stack = EpisodeReader().rgb(ep, slice(0, 4, 2))
    assert stack.shape == (2, 16, 20, 3)


def test_forced_layout_and_unknown_camera(tmp_path):
    path, _ = write_native(tmp_path / "n.h5")
    # A native file is robomimic-compatible: forcing robomimic reads it too.
    assert open_logs(path, SourceSettings(layout="robomimic")).episodes[0].layout == "robomimic"
    with pytest.raises(InputError) as e:
        open_logs(path, SourceSettings(camera="wrist"))
    assert "no camera 'wrist'" in str(e.value) and "agentview" in str(e.value)


def test_bad_settings_rejected():
    with pytest.raises(InputError, match="orientation"):
        SourceSettings(orientation="sideways")
    with pytest.raises(InputError, match="layout"):
        SourceSettings(layout="rlds")
    with pytest.raises(InputError, match="depth_scale"):
        SourceSettings(depth_scale=-1.0)


def test_depth_scale_from_uint16_millimetres(tmp_path):
    import h5py

    path, eps = write_native(tmp_path / "mm.h5", n=1)
    with h5py.File(path, "a") as f:
        d = f["data/demo_0/obs/agentview_depth"]
        mm = np.round(d[()] * 1000).astype(np.uint16)
        del f["data/demo_0/obs/agentview_depth"]
        f["data/demo_0/obs"].create_dataset("agentview_depth", data=mm)
        f["data/demo_0"].attrs["depth_scale"] = 0.001
    ep = open_logs(path).episodes[0]
    np.testing.assert_allclose(
        EpisodeReader().depth(ep, 1), eps[0].depth["agentview"][1], atol=6e-4
    )


@pytest.mark.parametrize("orientation", ["flip_vertical", "flip_horizontal", "rotate180"])
def test_oriented_intrinsics_unproject_to_the_same_point(orientation):
    H, W = 12, 17
    K = np.array([[30.0, 0, 7.3], [0, 28.0, 5.1], [0, 0, 1]])
    Ko = orient_intrinsics(K, (H, W), orientation)
    u, v = 3.0, 9.0
    uo = (W - 1 - u) if orientation in ("flip_horizontal", "rotate180") else u
    vo = (H - 1 - v) if orientation in ("flip_vertical", "rotate180") else v
    ray = np.linalg.inv(K) @ [u, v, 1.0]
    ray_o = np.linalg.inv(Ko) @ [uo, vo, 1.0]
    np.testing.assert_allclose(ray, ray_o, atol=1e-12)


def test_summary_reports_supervision(tmp_path):
    path, _ = write_native(tmp_path / "n.h5")
    rm, _ = write_robomimic_file(tmp_path / "r.h5")
    s = summarize(open_logs([path, rm]))
    assert s[0]["supervision"] == {
        "language": True,
        "depth": True,
        "intrinsics": True,
        "extrinsics": True,
        "flow": ["ground_truth"],
    }
    assert s[1]["supervision"]["depth"] is False and s[1]["supervision"]["flow"] == []
    assert s[0]["shapes"]["rgb"] == [6, 16, 20, 3]
