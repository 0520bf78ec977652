"""Writes that fail for real: a file-size limit (RLIMIT_FSIZE, no root needed) makes the kernel
refuse the write, as a full disk would. Each command must say so in one line (exit 3), keep what
was there before (the previous checkpoint, the user's log byte for byte) and leave no partial
file. The same limit a notch higher lets the same command through: the limit is the cause."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import write_native

CLI = [sys.executable, "-m", "dynaflip_adapt"]


def run_limited(args: list[str], limit: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs `args` with every file it writes capped at `limit` bytes."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    env = {**os.environ, "MUJOCO_GL": "egl"}
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, preexec_fn=cap, timeout=300
    )


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]  # no traceback, no HDF5 noise
    return lines[0]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.sim
@pytest.mark.skipif(importlib.util.find_spec("mujoco") is None, reason="needs the sim extra")
def test_sim_generate_without_room_fails_in_one_line_and_leaves_no_file(tmp_path):
    # HDF5 crashed the process here (SIGSEGV after hundreds of lines of tracebacks) and left a
    # hidden temporary file behind.
    args = [*CLI, "sim", "generate", "x.h5", "-n", "3", "--frames", "20", "--size", "32"]
    line = one_error_line(run_limited(args, 200_000, tmp_path))
    assert "x.h5" in line and "not enough room" in line and "MB left" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    r = run_limited(args, 8_000_000, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


def test_flow_extract_without_room_leaves_the_log_byte_identical(tmp_path):
    logs = write_native(tmp_path / "lab.h5", n=3, T=12, H=32, W=32)[0]
    before = sha(logs)
    size = logs.stat().st_size
    args = [*CLI, "flow", "extract", str(logs)]
    line = one_error_line(run_limited(args, size + 16_000, tmp_path))
    assert str(logs) in line and "not enough room" in line
    assert sha(logs) == before
    r = run_limited(args, 4 * size + 1_000_000, tmp_path)
    assert r.returncode == 0, r.stderr
    assert sha(logs) != before


CHECKPOINT_SCRIPT = """
import json, resource, sys
from pathlib import Path
import torch
from dynaflip_adapt.errors import RuntimeFailure
from dynaflip_adapt.train.common import load_checkpoint, save_checkpoint

folder = Path(sys.argv[1])
save_checkpoint(folder, {"step": 1, "w": torch.zeros(1000)})
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
try:
    save_checkpoint(folder, {"step": 2, "w": torch.zeros(200_000)})
    error = None
except RuntimeFailure as exc:
    error = str(exc)
print(json.dumps({"error": error, "step": load_checkpoint(folder)["step"]}))
"""


@pytest.mark.parametrize("limit", [50_000, 4_000_000])
def test_a_checkpoint_that_does_not_fit_keeps_the_previous_one(tmp_path, limit):
    folder = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_SCRIPT, str(folder), str(limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    if limit < 800_000:  # the new state is 800 kB of float32
        assert out["step"] == 1  # the previous checkpoint is the one that loads
        assert "checkpoint.pt: could not write the checkpoint" in out["error"]
        assert "previous one is kept" in out["error"]
    else:
        assert out == {"error": None, "step": 2}
    # No temporary file left either way.
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
