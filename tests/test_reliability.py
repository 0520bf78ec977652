"""Crash safety: a finetune killed with SIGKILL resumes to the same adapter, the dead run is
marked KILLED and registered nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.builders import write_native

pytestmark = [
    pytest.mark.slow,
]
CLI = [sys.executable, "-m", "dynaflip_adapt"]
FAST = ["--set", "data.num_workers=0", "--set", "optim.batch_size=8",
        "--set", "run.checkpoint_every=4", "--set", "data.gap=1", "--max-steps", "96"]  # fmt: skip


def cli(*args: str, env: dict[str, str]) -> dict:
    r = subprocess.run([*CLI, *args, "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    env = {**os.environ, "DYNAFLIP_HOME": str(tmp_path / "home"), "MUJOCO_GL": "egl"}
    logs = str(write_native(tmp_path / "s.h5", n=3, T=16, H=32, W=32, varied_language=True)[0])
    cli("pretrain", logs, "-r", "pretrain/tiny", "--set", "data.num_workers=0",
        "--set", "optim.max_steps=10", "--set", "replay.frames=16", "--set", "data.gap=1",
        "--set-base", env=env)  # fmt: skip
    straight = cli("finetune", logs, "--site", "s", *FAST, "--workdir", str(tmp_path / "a"),
                   env=env)  # fmt: skip

    work = tmp_path / "b"
    proc = subprocess.Popen(
        [*CLI, "finetune", logs, "--site", "s", *FAST, "--workdir", str(work), "--json"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill at a random moment after the first checkpoint (step 4 of 96: the window is ~20x the
    # random delay on the 2-core CI machine, so the kill lands mid-training).
    deadline = time.time() + 300
    while not (work / "checkpoint.pt").exists():
        assert proc.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.5))
    # The adapter folder is written just before registration: once it exists the run may be
    # registered already while its process is still alive (tearing down).
    if proc.poll() is not None or (work / "adapter").exists():
        pytest.skip("the run finished before the kill (machine too fast for this test)")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    versions = cli("adapters", "list", env=env)
    assert len(versions) == 1  # the killed run registered nothing
    resumed = cli("finetune", logs, "--site", "s", *FAST, "--workdir", str(work), "--resume",
                  env=env)  # fmt: skip
    a = load_file(_adapter_file(env, straight["adapter"]["version"]))
    b = load_file(_adapter_file(env, resumed["adapter"]["version"]))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)

    from dynaflip_adapt.registry.adapters import FINETUNE_EXPERIMENT
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    monkeypatch.setenv("DYNAFLIP_HOME", env["DYNAFLIP_HOME"])  # restored for later tests
    reg = Registry(resolve_store(None))
    exp = reg.client.get_experiment_by_name(FINETUNE_EXPERIMENT)
    runs = reg.client.search_runs([exp.experiment_id], f"tags.workdir = '{work}'")
    status = sorted(r.info.status for r in runs)
    assert status == ["FINISHED", "KILLED"], status
    killed = next(r for r in runs if r.info.status == "KILLED")
    assert killed.data.tags.get("dynaflip.reaped") == "process gone"
    assert "adapter_version" not in killed.data.tags


def _adapter_file(env: dict[str, str], version: str) -> str:
    info = cli("adapters", "show", version, env=env)
    folder = Path(info["path"]) if "path" in info else None
    assert folder is not None, info
    return str(folder / "adapter_model.safetensors")
