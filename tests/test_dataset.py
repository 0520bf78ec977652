"""The streaming frame-pair dataset returns the right frames, lazily, with several workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dynaflip_adapt.data.dataset import FramePairDataset
from dynaflip_adapt.data.logs import open_logs
from dynaflip_adapt.errors import InputError
from tests.builders import write_native, write_robomimic_file


def test_pairs_are_frames_t_and_t_plus_gap(tmp_path):
    path, eps = write_native(tmp_path / "s.h5", n=2)
    ds = FramePairDataset(open_logs(path), gap=1)
    assert len(ds) == 2 * (6 - 1)
    assert set(ds.fields) == {"depth", "intrinsics", "extrinsics", "flow", "proprio"}
    item = ds[7]  # episode 1, t = 2
    assert item["episode"] == 1 and item["t"] == 2
    src = eps[1]
    np.testing.assert_array_equal(item["rgb0"].permute(1, 2, 0).numpy(), src.rgb["agentview"][2])
    np.testing.assert_array_equal(item["rgb1"].permute(1, 2, 0).numpy(), src.rgb["agentview"][3])
    np.testing.assert_allclose(item["depth1"].numpy(), src.depth["agentview"][3])
    np.testing.assert_allclose(item["cam_to_world1"].numpy(), src.extrinsics["agentview"][3])
    np.testing.assert_allclose(item["flow_delta"].numpy(), src.flows["ground_truth"]["delta"][2])
    assert item["language"] == src.language
    assert item["rgb0"].dtype == torch.uint8 and item["rgb0"].shape == (3, 16, 20)


def test_gap_without_matching_flow_drops_flow_and_require_refuses(tmp_path):
    path, eps = write_native(tmp_path / "s.h5", n=1)
    ds = FramePairDataset(open_logs(path), gap=3)
    assert len(ds) == 3 and "flow" not in ds.fields
    np.testing.assert_array_equal(
        ds[2]["rgb1"].permute(1, 2, 0).numpy(), eps[0].rgb["agentview"][5]
    )
    with pytest.raises(InputError, match="flow extract"):
        FramePairDataset(open_logs(path), gap=3, require=["flow"])


def test_mixed_layouts_keep_only_shared_fields(tmp_path):
    a, _ = write_native(tmp_path / "a.h5")
    b, _ = write_robomimic_file(tmp_path / "b.h5")
    ds = FramePairDataset(open_logs([a, b]), gap=2)
    assert ds.fields == ("proprio",)
    assert len(ds) == 4 * 4


def test_two_workers_yield_the_same_items_as_one_process(tmp_path):
    path, _ = write_native(tmp_path / "s.h5", n=3)
    ds = FramePairDataset(open_logs(path), gap=1)
    seq = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = [b for b in loader]
    rgb = torch.cat([b["rgb0"] for b in got])
    assert torch.equal(rgb, torch.stack([s["rgb0"] for s in seq]))
    flow = torch.cat([b["flow_points"] for b in got])
    assert torch.equal(flow, torch.stack([s["flow_points"] for s in seq]))
    assert sum(len(b["language"]) for b in got) == len(ds)


def test_nan_depth_is_reported_when_read(tmp_path):
    import h5py

    path, _ = write_native(tmp_path / "s.h5", n=1)
    with h5py.File(path, "a") as f:
        f["data/demo_0/obs/agentview_depth"][4, 1, 1] = np.nan
    ds = FramePairDataset(open_logs(path), gap=1)
    ds[0]
    with pytest.raises(
        InputError, match=r"agentview_depth\[slice\(3, 5, 1\)\]: found NaN/inf depth"
    ):
        ds[3]
