from __future__ import annotations

import os

import pytest

# MuJoCo picks its GL backend at first import: offscreen EGL, before anything imports it.
os.environ.setdefault("MUJOCO_GL", "egl")

# Keep every test away from the user's ~/.dynaflip and any ambient tracking server.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(autouse=True)
def _isolated_home(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # Modules that share one registry across tests (a module fixture sets DYNAFLIP_HOME) opt out.
    if request.node.get_closest_marker("shared_home") is None:
        monkeypatch.setenv("DYNAFLIP_HOME", str(tmp_path_factory.mktemp("home")))
