"""A corpus of malformed site logs: each gets one line naming file/key/found/expected, exit 2,
no traceback, through both `data validate` and `data inspect`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from tests.builders import write_aloha_folder, write_native

runner = CliRunner()


def _native(tmp: Path) -> Path:
    return write_native(tmp / "site.h5", n=2)[0]


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        p = _native(tmp)
        with h5py.File(p, "a") as f:
            fn(f)
        return p

    return build


def _replace(f: h5py.File, path: str, data: np.ndarray) -> None:
    parent, _, name = path.rpartition("/")
    del f[path]
    f[parent].create_dataset(name, data=data)


def not_hdf5(tmp: Path) -> Path:
    p = tmp / "notes.h5"
    p.write_text("this is a CSV file, not HDF5\n" * 40)
    return p


def truncated(tmp: Path) -> Path:
    p = _native(tmp)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def non_utf8_name(tmp: Path) -> Path:
    """One damaged byte in a link name: h5py hands the name back as bytes, not str."""
    p = _native(tmp)
    data = p.read_bytes()
    assert data.count(b"demo_0") == 1
    p.write_bytes(data.replace(b"demo_0", b"\x80emo_0"))
    return p


def empty(tmp: Path) -> Path:
    p = tmp / "empty.h5"
    p.write_bytes(b"")
    return p


def missing_data_group(tmp: Path) -> Path:
    p = tmp / "nodata.h5"
    with h5py.File(p, "w") as f:
        f.create_group("episodes")
    return p


def native_missing_data_group(tmp: Path) -> Path:
    p = tmp / "nd.h5"
    with h5py.File(p, "w") as f:
        f.attrs["dynaflip_schema"] = "native"
        f.attrs["dynaflip_schema_version"] = 1
    return p


def folder_without_episodes(tmp: Path) -> Path:
    d = tmp / "empty_folder"
    d.mkdir()
    (d / "readme.txt").write_text("nothing here")
    return d


def data_group_without_demos(tmp: Path) -> Path:
    p = tmp / "nodemos.h5"
    with h5py.File(p, "w") as f:
        f.attrs["dynaflip_schema"] = "native"
        f.attrs["dynaflip_schema_version"] = 1
        f.create_group("data")
    return p


def unknown_schema_tag(tmp: Path) -> Path:
    return _edit(lambda f: f.attrs.__setitem__("dynaflip_schema", "rlds"))(tmp)


CASES: list[tuple[str, Callable[[Path], Path], str, str]] = [
    # name, builder, key fragment, text fragment
    ("not_hdf5", not_hdf5, "", "not an HDF5 file"),
    ("truncated", truncated, "", "truncated"),
    ("empty", empty, "", "empty file"),
    ("missing_data_group", missing_data_group, "/", "'data' group"),
    ("native_missing_data_group", native_missing_data_group, "/data", "missing"),
    (
        "no_actions",
        _edit(lambda f: f.__delitem__("data/demo_1/actions")),
        "data/demo_1/actions",
        "missing",
    ),
    (
        "image_wrong_rank",
        _edit(
            lambda f: _replace(
                f, "data/demo_0/obs/agentview_image", np.zeros((6, 16, 20), np.uint8)
            )
        ),
        "agentview_image",
        "shape (6, 16, 20)",
    ),
    (
        "image_wrong_dtype",
        _edit(
            lambda f: _replace(
                f, "data/demo_0/obs/agentview_image", np.zeros((6, 16, 20, 3), np.float32)
            )
        ),
        "agentview_image",
        "dtype float32",
    ),
    (
        "mismatched_lengths",
        _edit(
            lambda f: _replace(
                f, "data/demo_1/obs/agentview_depth", np.ones((5, 16, 20), np.float32)
            )
        ),
        "agentview_depth",
        "expected shape (6, 16, 20)",
    ),
    (
        "nan_actions",
        _edit(lambda f: f["data/demo_0/actions"].__setitem__((2, 3), np.nan)),
        "data/demo_0/actions[2]",
        "NaN/inf",
    ),
    (
        "inf_depth",
        _edit(lambda f: f["data/demo_1/obs/agentview_depth"].__setitem__((4, 0, 0), np.inf)),
        "agentview_depth[4]",
        "NaN/inf",
    ),
    (
        "negative_depth",
        _edit(lambda f: f["data/demo_0/obs/agentview_depth"].__setitem__((1, 3, 3), -0.5)),
        "agentview_depth[1]",
        "below 0",
    ),
    (
        "K_not_3x3",
        _edit(lambda f: _replace(f, "data/demo_0/obs/agentview_intrinsics", np.eye(4))),
        "agentview_intrinsics",
        "shape (4, 4)",
    ),
    (
        "K_not_pinhole",
        _edit(lambda f: _replace(f, "data/demo_0/obs/agentview_intrinsics", np.ones((3, 3)))),
        "agentview_intrinsics",
        "pinhole",
    ),
    (
        "extrinsics_not_rigid",
        _edit(lambda f: f["data/demo_1/obs/agentview_extrinsics"].__setitem__((0, 0, 0), 3.0)),
        "agentview_extrinsics",
        "non-rigid",
    ),
    (
        "wrong_schema_version",
        _edit(lambda f: f.attrs.__setitem__("dynaflip_schema_version", 7)),
        "/@dynaflip_schema_version",
        "found 7, expected a schema version 1",
    ),
    ("unknown_schema_tag", unknown_schema_tag, "/@dynaflip_schema", "'rlds'"),
    (
        "zero_length_episode",
        _edit(
            lambda f: [
                _replace(
                    f,
                    f"data/demo_1/{k}",
                    np.zeros((0, *f[f"data/demo_1/{k}"].shape[1:]), f[f"data/demo_1/{k}"].dtype),
                )
                for k in ("actions",)
            ]
        ),
        "data/demo_1/actions",
        "zero-length",
    ),
    (
        "num_samples_disagrees",
        _edit(lambda f: f["data/demo_0"].attrs.__setitem__("num_samples", 99)),
        "num_samples",
        "found 99",
    ),
    (
        "missing_language",
        _edit(lambda f: f["data/demo_0"].attrs.__delitem__("language_instruction")),
        "language_instruction",
        "missing",
    ),
    (
        "flow_wrong_points",
        _edit(
            lambda f: _replace(
                f, "data/demo_0/flow/ground_truth/delta", np.zeros((5, 9, 3), np.float32)
            )
        ),
        "flow/ground_truth/delta",
        "expected shape (5, 8, 3)",
    ),
    (
        "actions_strings",
        _edit(lambda f: _replace(f, "data/demo_0/actions", np.array([b"x"] * 6))),
        "data/demo_0/actions",
        "dtype |S1",
    ),
    ("non_utf8_link_name", non_utf8_name, "emo_0", "a link name that is not UTF-8"),
    ("folder_no_episodes", folder_without_episodes, "", "no episodes"),
    ("data_without_demos", data_group_without_demos, "/data", "no episodes"),
    ("does_not_exist", lambda tmp: tmp / "nope.h5", "", "no such file"),
]


# Problems in large arrays: found by `data validate` (full scan) and, lazily, by the reader.
DEEP_ONLY = {"inf_depth", "negative_depth"}


@pytest.mark.parametrize("name,build,key,text", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["validate", "inspect"])
def test_malformed_input_one_line_exit_2(tmp_path, name, build, key, text, command):
    if command == "inspect" and name in DEEP_ONLY:
        pytest.skip("inspect reads metadata and small arrays; depth values are scanned by validate")
    path = build(tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["data", command, str(path)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    if command == "inspect":
        assert len(errors) == 1, errors
    assert errors, result.output
    line = errors[0]
    assert str(path.name) in line, line
    assert key in line and text in line, line
    assert "found" in line and "expected" in line, line
    assert _snapshot(tmp_path) == before, "reading must not modify the files"


def _snapshot(root: Path) -> dict[str, tuple[int, float]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for p in root.rglob("*") if p.is_file()}


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


def test_validate_lists_every_problem_in_every_file(tmp_path):
    a = _edit(lambda f: f["data/demo_0/actions"].__setitem__((0, 0), np.nan))(tmp_path)
    b = tmp_path / "b.h5"
    shutil.copy(a, b)
    with h5py.File(b, "a") as f:
        f["data/demo_1/obs/agentview_depth"][0, 0, 0] = -1
    good = write_native(tmp_path / "good.h5")[0]
    result = runner.invoke(app, ["data", "validate", str(a), str(b), str(good), "--json"])
    assert result.exit_code == 2
    import json

    report = json.loads(result.stdout)
    by_file = {Path(r["file"]).name: r for r in report["files"]}
    assert by_file["good.h5"]["ok"] and not by_file["site.h5"]["ok"]
    assert (
        len(by_file["b.h5"]["problems"]) == 2
    )  # NaN actions in demo_0 and negative depth in demo_1


def test_debug_shows_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "data", "inspect", str(tmp_path / "nope.h5")])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "InputError"


def test_unreadable_permissions(tmp_path):
    p = _native(tmp_path)
    # Warm the imports first: with a dropped uid, stdlib modules under /root are unreadable too.
    assert runner.invoke(app, ["data", "inspect", str(p)]).exit_code == 0
    os.chmod(p, 0)
    try:
        if os.geteuid() == 0:
            # Root reads anything: drop the effective uid so the kernel really refuses the open.
            os.seteuid(65534)
        try:
            result = runner.invoke(app, ["data", "inspect", str(p)])
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
    finally:
        os.chmod(p, 0o644)
    assert result.exit_code == 2, result.output
    assert "permission denied" in result.stderr and p.name in result.stderr


def test_aloha_bad_jpeg_bytes(tmp_path):
    files, _ = write_aloha_folder(tmp_path / "aj", n=1, jpeg=90)
    with h5py.File(files[0], "a") as f:
        f["observations/images/cam_high"][2, :50] = 7
    result = runner.invoke(app, ["data", "validate", str(files[0])])
    assert result.exit_code == 2
    assert "cam_high[2]" in result.stderr and "JPEG" in result.stderr


def test_fingerprint_refuses_a_damaged_link_name(tmp_path):
    path = non_utf8_name(tmp_path)
    before = _snapshot(tmp_path)
    result = runner.invoke(app, ["data", "fingerprint", str(path)])
    assert result.exit_code == 2, (result.exit_code, result.output)
    line = result.stderr.strip()
    assert "\n" not in line and path.name in line and "not UTF-8" in line, line
    assert _snapshot(tmp_path) == before
