"""Against a real tracking server: `mlflow server` (sqlite backend, proxied local artifacts) on
127.0.0.1 as a subprocess. The whole lifecycle by URI, a server restart in the middle of a
finetune, and an unreachable registry."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.builders import expected_verdict, write_native

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("flask") is None, reason="needs the server extra (full mlflow)"
    ),
    pytest.mark.slow,
]
CLI = [sys.executable, "-m", "dynaflip_adapt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """An `mlflow server` subprocess that can be stopped and started again on the same port."""

    def __init__(self, root: Path, backend: str | None = None, workers: int = 1) -> None:
        self.root, self.port = root, _free_port()
        self.backend = backend or f"sqlite:///{root / 'server.db'}"
        self.workers = workers
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", str(self.workers),
               "--backend-store-uri", self.backend,
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, server):
    """Site logs, and a tiny base backbone registered on the server."""
    d = tmp_path_factory.mktemp("world")
    env = _env(d / "home")
    logs = str(write_native(d / "lab.h5", n=3, T=16, H=32, W=32, varied_language=True)[0])
    _cli(env, server.uri, "pretrain", logs, "-r", "pretrain/tiny", "--set", "data.num_workers=0",
         "--set", "optim.max_steps=10", "--set", "replay.frames=16", "--set", "data.gap=1",
         "--set-base")  # fmt: skip
    return {"logs": logs, "env": env, "home": d / "home"}


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "DYNAFLIP_HOME": str(home), "MUJOCO_GL": "egl"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _cli(env: dict[str, str], uri: str | None, *args: str) -> dict:
    pre = ["--tracking-uri", uri] if uri else []
    r = subprocess.run([*CLI, *pre, *args, "--json"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, (args, r.stderr[-3000:])
    return json.loads(r.stdout)


FAST = ["--set", "data.num_workers=0", "--set", "optim.batch_size=8", "--set", "data.gap=1"]


def test_lifecycle_against_a_tracking_server(server, world):
    env, logs, uri = world["env"], world["logs"], server.uri
    pol = _cli(env, uri, "policies", "train", logs, "--site", "lab", "--steps", "50")
    a1 = _cli(env, uri, "finetune", logs, "--site", "lab", "--max-steps", "3", *FAST)
    a2 = _cli(env, uri, "finetune", logs, "--site", "lab", "--max-steps", "4", *FAST)
    v1, v2 = a1["adapter"]["version"], a2["adapter"]["version"]
    audit = subprocess.run([*CLI, "--tracking-uri", uri, "audit", "--adapter", v2, "--json"],
                           env=env, capture_output=True, text=True)  # fmt: skip
    report = json.loads(audit.stdout)
    assert report["verdict"] == expected_verdict(report) != "unaudited"
    assert audit.returncode == (1 if report["verdict"] == "incompatible" else 0), audit.stderr
    for v in (v1, v2):
        _cli(env, uri, "promote", v, "--site", "lab", "--force", "--reason", "server test")
    back = _cli(env, uri, "rollback", "--site", "lab", "--reason", "server test")
    assert back["event"]["version"] == v1
    h = _cli(env, uri, "history", "--site", "lab")
    assert [e["action"] for e in h["events"]] == ["promote", "promote", "rollback"]
    assert h["current"] == v1

    # Everything lives on the server: read it back with a plain MLflow client.
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    names = {m.name for m in c.search_registered_models()}
    assert {"dynaflip-backbone", "dynaflip-adapter", "dynaflip-policy"} <= names
    assert c.get_model_version_by_alias("dynaflip-adapter", "prod-lab").version == v1
    assert pol["policy"]["version"] == "1"
    # ... and nothing was written to an embedded store.
    assert not (world["home"] / "mlflow.db").exists()


def test_finetune_survives_a_server_restart(server, world):
    env, logs = world["env"], world["logs"]
    work = world["home"] / "restart-run"
    args = [*CLI, "--tracking-uri", server.uri, "finetune", logs, "--site", "lab",
            "--max-steps", "40", "--set", "run.log_every=1", "--set", "run.checkpoint_every=5",
            "--workdir", str(work), *FAST, "--json"]  # fmt: skip
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while not (work / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    server.stop()
    time.sleep(3)  # metrics logged meanwhile go through MLflow's bounded retries
    server.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    version = json.loads(out)["adapter"]["version"]
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
    mv = c.get_model_version("dynaflip-adapter", version)
    run = c.get_run(mv.run_id)
    assert run.info.status == "FINISHED"
    assert len(c.get_metric_history(run.info.run_id, "loss")) == 40  # no step lost


def test_unreachable_registry_is_one_line_exit_3(tmp_path):
    env = _env(tmp_path / "home")
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    uri = f"http://127.0.0.1:{_free_port()}"
    r = subprocess.run([*CLI, "--tracking-uri", uri, "adapters", "list"], env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 3, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and uri in lines[0], lines
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "home" / "mlflow.db").exists()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
