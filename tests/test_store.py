"""One place resolves the store, always to absolute URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.registry.client import Registry
from dynaflip_adapt.registry.store import absolutize_uri, resolve_store


def test_embedded_default_under_home(tmp_path):
    s = resolve_store(env={"DYNAFLIP_HOME": str(tmp_path / "h")})
    assert s.source == "embedded"
    assert s.tracking_uri == f"sqlite:///{tmp_path}/h/mlflow.db"
    assert s.artifact_root == (tmp_path / "h" / "artifacts").as_uri()


def test_default_home_is_user_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = resolve_store(env={})
    assert s.home == tmp_path / ".dynaflip"


def test_option_beats_env_beats_embedded(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "DYNAFLIP_HOME": str(tmp_path)}
    assert resolve_store(env=env).tracking_uri == "http://127.0.0.1:5000"
    assert resolve_store(env=env).source == "env"
    s = resolve_store("sqlite:///rel/db.sqlite", env=env, cwd=tmp_path)
    assert s.source == "option" and s.tracking_uri == f"sqlite:///{tmp_path}/rel/db.sqlite"


@pytest.mark.parametrize(
    "uri,expected",
    [
        ("sqlite:////abs/x.db", "sqlite:////abs/x.db"),
        ("sqlite:///x.db", "sqlite:///{cwd}/x.db"),
        ("mlruns", "file://{cwd}/mlruns"),
        ("file:/abs/mlruns", "file:///abs/mlruns"),
        ("file:///abs/mlruns", "file:///abs/mlruns"),
        ("https://mlflow.example/", "https://mlflow.example/"),
    ],
)
def test_absolutize(uri, expected, tmp_path):
    assert absolutize_uri(uri, cwd=tmp_path) == expected.format(cwd=tmp_path)
    assert "://" in absolutize_uri(uri, cwd=tmp_path)


def test_empty_uri_is_an_input_error():
    with pytest.raises(InputError):
        absolutize_uri("  ")


def test_cli_store_info(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAFLIP_HOME", str(tmp_path))
    r = CliRunner().invoke(app, ["store", "info", "--json"])
    assert r.exit_code == 0
    info = json.loads(r.stdout)
    assert info["tracking_uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert not Path(tmp_path, "mlflow.db").exists()  # resolving creates nothing
    r = CliRunner().invoke(app, ["--tracking-uri", "sqlite:///x.db", "store", "info", "--json"])
    assert json.loads(r.stdout)["tracking_uri"] == f"sqlite:///{Path.cwd()}/x.db"


def test_run_metrics_reach_the_store_within_the_flush_interval(monkeypatch):
    """A long run's metrics are in the tracking store while it runs, not only at its end."""
    from dynaflip_adapt.registry.client import Registry, RunHandle

    reg = Registry(resolve_store(None))

    def stored(run_id: str) -> list[int]:
        return sorted(m.step for m in reg.client.get_metric_history(run_id, "loss"))

    monkeypatch.setattr(RunHandle, "FLUSH_SECONDS", 3600.0)
    with reg.run("flush-test", "r") as run:
        run.log_metrics(1, {"loss": 1.0})
        run.log_metrics(2, {"loss": 0.5})
        assert stored(run.run_id) == []  # buffered: under 500 metrics and inside the interval
        monkeypatch.setattr(RunHandle, "FLUSH_SECONDS", 0.0)
        run.log_metrics(3, {"loss": 0.25})
        assert stored(run.run_id) == [1, 2, 3]  # the interval passed: the batch went out
        monkeypatch.setattr(RunHandle, "FLUSH_SECONDS", 3600.0)
        run.log_metrics(4, {"loss": 0.125})
        assert stored(run.run_id) == [1, 2, 3]
    assert stored(run.run_id) == [1, 2, 3, 4]  # the rest at the end of the run


def test_two_stores_under_one_home_never_share_a_cached_download(tmp_path, monkeypatch):
    """The embedded store and another (a server, a benchmark's own registry) used from one home
    both have `dynaflip-policy v1`: each download is its own store's files."""
    monkeypatch.setenv("DYNAFLIP_HOME", str(tmp_path / "home"))
    got = []
    for store in ("a", "b"):
        folder = tmp_path / f"src-{store}"
        folder.mkdir()
        (folder / "weights.txt").write_text(f"policy of store {store}")
        db = tmp_path / store / "mlflow.db"
        db.parent.mkdir()
        reg = Registry(resolve_store(f"sqlite:///{db}"))
        with reg.run("exp", "r") as run:
            info = reg.register("dynaflip-policy", run, folder, "policy", {})
        assert info.version == "1"
        got.append(reg.download(info, "policies"))
    assert [(p / "weights.txt").read_text() for p in got] == [
        "policy of store a",
        "policy of store b",
    ]
    # Cached: a second download is the same folder, still its own store's.
    assert reg.download(info, "policies") == got[1]
