"""Safe by default: no data loss, gates that fail closed, one-line errors for bad input, and a
CLI that says what it is doing. Synthetic logs (no simulator), a real MLflow registry."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import h5py
import pytest
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from tests.builders import expected_verdict, write_native

pytestmark = pytest.mark.shared_home
runner = CliRunner()
FAST = ["--set", "data.num_workers=0", "--set", "optim.batch_size=4", "--set", "data.gap=1"]


def ok(args: list[str]) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, (args, r.output)
    return json.loads(r.stdout)


def refused(args: list[str], code: int) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == code, (args, r.exit_code, r.output)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # one line, no traceback
    return lines[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry with a tiny base backbone, a policy at site 'lab', an adapter trained for
    'lab' and one for 'empty' (a site with no policies)."""
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("DYNAFLIP_HOME")
    os.environ["DYNAFLIP_HOME"] = str(home)
    d = tmp_path_factory.mktemp("logs")
    logs = write_native(d / "lab.h5", n=4, T=16, H=32, W=32)[0]
    with h5py.File(logs, "a") as f:
        f.attrs["site"] = "lab"
    logs_s = str(logs)
    ok(["pretrain", logs_s, "-r", "pretrain/tiny", "--set", "data.num_workers=0",
        "--set", "optim.max_steps=6", "--set", "data.gap=1", "--set-base"])  # fmt: skip
    policy = ok(["policies", "train", logs_s, "--site", "lab", "--steps", "40",
                 "--tolerance", "0.2", "--name", "lab-bc"])  # fmt: skip
    gentle = ok(["finetune", logs_s, "--site", "lab", "--steps", "2", *FAST,
                 "--set", "optim.lr=1e-9"])  # fmt: skip
    empty = ok(["finetune", logs_s, "--site", "empty", "--steps", "2", *FAST,
                "--set", "optim.lr=1e-9"])  # fmt: skip
    yield {
        "home": home,
        "logs": logs_s,
        "policy": policy["policy"]["version"],
        "lab": gentle["adapter"]["version"],
        "empty": empty["adapter"]["version"],
    }
    if old is None:
        os.environ.pop("DYNAFLIP_HOME", None)
    else:
        os.environ["DYNAFLIP_HOME"] = old


# ------------------------------------------------------------------------------ export


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_export_never_deletes_a_folder_it_did_not_write(fleet, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "precious.pt").write_bytes(b"weights of another project")
    before = _tree(models)
    line = refused(["export", fleet["lab"], "--out", str(models)], 2)
    assert "not a dynaflip-adapt export" in line and str(models) in line
    # Not even --overwrite lets an export write into a folder it did not create.
    refused(["export", fleet["lab"], "--out", str(models), "--overwrite"], 2)
    assert _tree(models) == before


def test_pretrain_export_bundle_never_deletes_a_folder_it_did_not_write(fleet, tmp_path):
    """`pretrain --export-bundle` used to delete the folder first; it now installs a bundle the
    way exports are installed, and checks the folder before anything trains."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "precious.pt").write_bytes(b"weights of another project")
    before = _tree(models)
    runs = len(ok(["backbones", "list"]))
    args = ["pretrain", fleet["logs"], "-r", "pretrain/tiny", "--steps", "2",
            "--set", "data.num_workers=0", "--set", "data.gap=1"]  # fmt: skip
    for extra in ([], ["--overwrite"]):
        line = refused([*args, "--export-bundle", str(models), *extra], 2)
        assert "--export-bundle" in line and "not a dynaflip-adapt export" in line
    assert _tree(models) == before and len(ok(["backbones", "list"])) == runs
    # A previous bundle is replaced only with --overwrite, and a user's file beside it stays.
    out = tmp_path / "bundle"
    ok([*args, "--export-bundle", str(out)])
    (out / "NOTES.md").write_text("mine")
    assert "--overwrite" in refused([*args, "--export-bundle", str(out)], 2)
    ok([*args, "--export-bundle", str(out), "--overwrite", "--seed", "1"])
    assert (out / "NOTES.md").read_text() == "mine"
    from dynaflip_adapt.models.backbone import load_bundle

    assert load_bundle(out).manifest["provenance"]["recipe_hash"]


def test_export_overwrite_replaces_only_what_the_previous_export_wrote(fleet, tmp_path):
    out = tmp_path / "exp"
    first = ok(["export", fleet["lab"], "--out", str(out), "--format", "safetensors"])
    (out / "NOTES.md").write_text("my notes")  # the user's file, added later
    line = refused(["export", fleet["lab"], "--out", str(out), "--format", "torchscript"], 2)
    assert "--overwrite" in line
    second = ok(["export", fleet["lab"], "--out", str(out), "--format", "torchscript",
                 "--overwrite"])  # fmt: skip
    names = {p.name for p in out.iterdir()}
    assert (out / "NOTES.md").read_text() == "my notes"
    assert "encoder.ts" in names and "encoder.safetensors" not in names  # the old export's file
    assert names == set(second["files"]) | {"NOTES.md"}
    assert set(first["files"]) != set(second["files"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["adapter"]["version"] == fleet["lab"]
    assert man["adapter"]["model"] == "dynaflip-adapter"
    assert man["adapter"]["registry"].startswith("sqlite:///")
    assert str(fleet["home"] / "cache") not in json.dumps(man)  # no local cache path


def test_export_to_a_file_or_the_current_folder_is_bad_input(fleet, tmp_path, monkeypatch):
    f = tmp_path / "encoder.bin"
    f.write_bytes(b"x")
    assert "an existing file" in refused(["export", fleet["lab"], "--out", str(f)], 2)
    assert f.read_bytes() == b"x"
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert "current folder" in refused(["export", fleet["lab"], "--out", "."], 2)
    assert list(here.iterdir()) == []


def test_export_format_is_checked_before_anything_loads(tmp_path):
    # An unreachable registry would fail with exit 3 after its timeout: the format comes first.
    t0 = time.perf_counter()
    line = refused(["--tracking-uri", "http://127.0.0.1:9", "export", "3",
                    "--out", str(tmp_path / "x"), "--format", "tflite"], 2)  # fmt: skip
    assert "--format" in line and "tflite" in line
    assert time.perf_counter() - t0 < 5


# -------------------------------------------------------- damaged stores, full disks


def _store_copy(version: str) -> Path:
    """The registry's own folder of an adapter version (the sqlite store keeps artifacts on
    disk), with the local cache of that version removed so the next command downloads it."""
    import shutil

    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store(None))
    source = reg.resolve(ADAPTER_MODEL, version).source
    shutil.rmtree(reg.store.home / "cache" / "adapters", ignore_errors=True)
    return Path(source.removeprefix("file://"))


def test_artifacts_damaged_on_the_server_are_refused_naming_the_version(fleet, tmp_path):
    import shutil

    folder = _store_copy(fleet["lab"])
    backup = tmp_path / "backup"
    shutil.copytree(folder, backup)
    weights = folder / "adapter_model.safetensors"
    before = ok(["history", "--site", "lab"])
    try:
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
        for args, code in (
            (["audit", fleet["lab"]], 2),
            (["export", fleet["lab"], "--out", str(tmp_path / "e")], 2),
            (["promote", fleet["lab"], "--site", "lab"], 2),
        ):
            line = refused(args, code)
            assert f"dynaflip-adapter v{fleet['lab']}" in line, line
            assert "adapter_model.safetensors" in line and "tampered" in line, line
        assert not (tmp_path / "e").exists()
        # Rewritten consistently: the manifest lists the damaged file's new hash. The manifest's
        # own sha256, pinned in the version's tags at registration, catches it.
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["adapter_model.safetensors"] = (
            "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
        )
        (folder / "manifest.json").write_text(json.dumps(manifest))
        line = refused(["export", fleet["lab"], "--out", str(tmp_path / "e")], 2)
        assert f"dynaflip-adapter v{fleet['lab']}: manifest.json" in line, line
        assert "rewritten since registration" in line, line
        shutil.rmtree(folder)  # deleted outright
        line = refused(["audit", fleet["lab"]], 3)
        assert f"dynaflip-adapter v{fleet['lab']}" in line and "No such artifact" in line
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(backup, folder)
    assert ok(["history", "--site", "lab"]) == before  # nothing moved
    # The damaged copy was never cached: with the store restored, the version works again.
    ok(["export", fleet["lab"], "--out", str(tmp_path / "e")])


@pytest.fixture
def small_disk(tmp_path):
    """A 400 kB tmpfs (root only): writes fail with ENOSPC, a real full disk."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_stops_finetune_and_export_in_one_line_with_nothing_registered(
    fleet, small_disk
):
    versions = ok(["adapters", "list"])
    work = small_disk / "work"
    line = refused(["finetune", fleet["logs"], "--site", "lab", "--steps", "8", *FAST, "--json",
                    "--set", "run.checkpoint_every=2", "--workdir", str(work)], 3)  # fmt: skip
    assert "could not write the checkpoint" in line and "previous one is kept" in line, line
    assert ok(["adapters", "list"]) == versions  # nothing half-registered
    kept = sorted(p.name for p in work.iterdir())
    assert "checkpoint.pt" in kept and not [n for n in kept if n.endswith(".tmp")]
    import torch

    assert torch.load(work / "checkpoint.pt", weights_only=False)["step"] >= 2  # readable
    import shutil

    shutil.rmtree(work)
    # No checkpoint this time: the disk fills while the adapter itself is written.
    line = refused(["finetune", fleet["logs"], "--site", "lab", "--steps", "4", *FAST, "--json",
                    "--set", "run.checkpoint_every=1000", "--workdir", str(work)], 3)  # fmt: skip
    assert "could not write the adapter" in line and "nothing was registered" in line, line
    assert ok(["adapters", "list"]) == versions
    shutil.rmtree(work)
    filler = small_disk / "filler"  # leave 40 kB: less than the encoder's weights
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 40_000))
    out = small_disk / "export"
    line = refused(["export", fleet["lab"], "--out", str(out)], 3)
    assert str(out) in line and "the folder is left as it was" in line, line
    assert not out.exists() and list(small_disk.iterdir()) == [filler]


# ------------------------------------------------------------------------ promotion gate


def test_promote_refuses_another_sites_adapter(fleet):
    before = ok(["history", "--site", "lab-typo"])
    line = refused(["promote", fleet["lab"], "--site", "lab-typo"], 1)
    assert "'lab'" in line and "'lab-typo'" in line
    assert ok(["history", "--site", "lab-typo"]) == before  # nothing moved, nothing recorded
    r = runner.invoke(app, ["promote", fleet["lab"], "--site", "lab-typo", "--force"])
    assert r.exit_code == 2 and "--reason" in r.stderr
    out = ok(["promote", fleet["lab"], "--site", "lab-typo", "--force", "--reason", "same rig"])
    ev = out["event"]
    assert ev["forced"] is True and ev["adapter_site"] == "lab" and ev["site"] == "lab-typo"
    assert out["audit"]["verdict"] == "unaudited"


def test_a_site_without_policies_is_unaudited_and_needs_an_explicit_override(fleet):
    r = runner.invoke(app, ["audit", fleet["empty"], "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["verdict"] == "unaudited"
    line = refused(["promote", fleet["empty"], "--site", "empty"], 1)
    assert "unaudited" in line and "--allow-unaudited" in line
    assert ok(["history", "--site", "empty"])["current"] is None
    out = ok(["promote", fleet["empty"], "--site", "empty", "--allow-unaudited"])
    assert out["event"]["allow_unaudited"] is True and out["event"]["audit"] == "unaudited"
    h = ok(["history", "--site", "empty"])
    assert h["current"] == fleet["empty"]
    assert h["events"][-1]["allow_unaudited"] is True and h["events"][-1]["forced"] is False


def test_promote_and_history_print_one_event_schema(fleet):
    p = ok(["promote", fleet["lab"], "--site", "lab"])
    assert p["promoted"] is True and p["audit"]["verdict"] in ("compatible", "warning")
    h = ok(["history", "--site", "lab"])
    last = h["events"][-1]
    assert last == p["event"]  # same keys, same types, same values
    assert isinstance(last["seq"], int) and isinstance(last["time"], float)
    assert isinstance(last["forced"], bool) and last["time_utc"].endswith("Z")
    rb = ok(["rollback", "--site", "lab", "--to", fleet["lab"]])
    assert set(rb["event"]) == set(last)


def test_rollback_to_restores_only_what_was_promoted_there(fleet):
    """`rollback --to V` skips the audit gate, so V must be a version promoted at that site
    before: an adapter of another site (never audited against these policies) is refused with
    one line, exit 2, and production does not move."""
    ok(["promote", fleet["lab"], "--site", "lab"])
    before = ok(["history", "--site", "lab"])
    r = runner.invoke(app, ["rollback", "--site", "lab", "--to", fleet["empty"]])
    assert r.exit_code == 2, r.output
    assert "never promoted at site 'lab'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    after = ok(["history", "--site", "lab"])
    assert after["current"] == before["current"] == fleet["lab"]
    assert after["events"] == before["events"]


@pytest.mark.parametrize("method", ["search_model_versions", "get_registered_model"])
def test_a_registry_error_mid_promotion_fails_closed(fleet, monkeypatch, method):
    """The tracking server drops out in the middle of `promote`, just when the site's policies
    are read (the adapter and backbone were found). That read used to come back empty: the
    audit saw no policies, and the gate opened."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    before = ok(["history", "--site", "lab"])
    real = getattr(MlflowClient, method)
    failed = []

    def flaky(self, *args, **kwargs):
        if "dynaflip-policy" in repr(args) + repr(kwargs):
            failed.append(args)
            raise MlflowException("server went away", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)
    line = refused(["promote", fleet["lab"], "--site", "lab"], 3)
    assert failed and "server went away" in line
    monkeypatch.undo()
    assert ok(["history", "--site", "lab"]) == before


def test_history_is_read_page_by_page(fleet, monkeypatch):
    import dynaflip_adapt.registry.client as registry_mod

    n = len(ok(["history", "--site", "lab"])["events"])
    assert n >= 2
    monkeypatch.setattr(registry_mod, "RUN_PAGE", 1)  # one event per page
    h = ok(["history", "--site", "lab"])
    assert len(h["events"]) == n and [e["seq"] for e in h["events"]] == list(range(1, n + 1))


# ---------------------------------------------------------------------------- references


def test_every_spelling_of_a_version_is_accepted(fleet):
    v = fleet["lab"]
    ok(["promote", v, "--site", "lab"])
    for ref in (v, f"v{v}", f"models:/dynaflip-adapter/{v}", "models:/dynaflip-adapter@prod-lab",
                "@prod-lab", "prod-lab"):  # fmt: skip
        assert ok(["adapters", "show", ref])["version"]["version"] == v, ref
    rep = ok(["audit", f"v{v}"])
    assert rep["verdict"] == expected_verdict(rep) and rep["verdict"] in ("compatible", "warning")
    assert ok(["audit", "--adapter", f"models:/dynaflip-adapter/{v}"])["adapter"].endswith(f"v{v}")
    line = refused(["adapters", "show", "models:/dynaflip-policy/1"], 2)
    assert "models:/dynaflip-adapter/VERSION" in line
    assert ok(["policies", "show", f"v{fleet['policy']}"])["version"]["version"] == fleet["policy"]


def test_no_python_none_or_raw_dicts_reach_a_person(fleet):
    r = runner.invoke(app, ["adapters", "show", fleet["lab"]])
    assert r.exit_code == 0 and "None" not in r.stdout and "{'" not in r.stdout, r.stdout
    assert "lineage:" in r.stdout and "data_fingerprint: sha256:" in r.stdout
    r = runner.invoke(app, ["history", "--site", "never-promoted"])
    assert r.exit_code == 0 and "vNone" not in r.stdout and "production: none" in r.stdout


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "args",
    [
        ["finetune", "LOGS", "--site", "lab", "--steps", "0"],
        ["finetune", "LOGS", "--site", "lab", "--steps", "-3", "--dry-run"],
        ["finetune", "LOGS", "--site", "lab", "--max-steps", "0"],
        ["pretrain", "LOGS", "--steps", "0"],
        ["policies", "train", "LOGS", "--site", "lab", "--steps", "0"],
        ["sim", "generate", "OUT", "-n", "0"],
        ["eval", "benchmark", "--steps", "0"],
        ["eval", "benchmark", "--policy-steps", "-1"],
        ["finetune", "LOGS", "--retain", "LOGS", "--retain-frames", "0"],
        ["inspect", "LOGS", "--frames", "0"],
    ],
)
def test_counts_must_be_positive(tmp_path, args):
    logs = str(write_native(tmp_path / "l.h5")[0])
    args = [logs if a == "LOGS" else str(tmp_path / "o.h5") if a == "OUT" else a for a in args]
    line = refused(args, 2)
    assert "greater than or equal to" in line and "--" in line


def test_a_bad_set_key_is_blamed_on_set_not_on_the_recipe_file(tmp_path):
    logs = str(write_native(tmp_path / "l.h5")[0])
    line = refused(["finetune", logs, "--set", "optim.lrr=1e-3", "--dry-run"], 2)
    assert line.startswith("error: --set optim.lrr: found an unknown key"), line
    assert "default.yaml" not in line


def test_sim_generate_does_not_overwrite_an_existing_file(tmp_path):
    out = tmp_path / "site.h5"
    out.write_bytes(b"a log from last week")
    line = refused(["sim", "generate", str(out), "-n", "1"], 2)
    assert "--overwrite" in line
    assert out.read_bytes() == b"a log from last week"


def test_an_unreachable_tracking_server_fails_fast_in_one_line():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    line = refused(["--tracking-uri", f"http://127.0.0.1:{port}", "adapters", "list"], 3)
    assert time.perf_counter() - t0 < 15
    assert "unreachable" in line and "--registry-timeout" in line


# --------------------------------------------------------------------- what it is doing


def test_audit_reads_at_80_columns_and_ends_with_the_fix(fleet, monkeypatch):
    wild = ok(["finetune", fleet["logs"], "--site", "lab", "--steps", "12", *FAST,
               "--set", "optim.lr=0.3", "--set", "loss.distill_replay=0",
               "--set", "ema.enabled=false", "--set", "optim.warmup_steps=0"])  # fmt: skip
    v = wild["adapter"]["version"]
    monkeypatch.setenv("COLUMNS", "80")
    r = runner.invoke(app, ["audit", v])
    assert r.exit_code == 1, r.output
    lines = r.stdout.strip().splitlines()
    assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
    assert "…" not in r.stdout
    dev = next(x for x in lines if "action_deviation.policy_probe:" in x)
    assert "FAIL" in dev and "must stay <= 0.2000" in dev
    last = next(i for i, x in enumerate(lines) if x.startswith("failed: "))
    verdict = " ".join(x.strip() for x in lines[last:])  # the closing line, wrapped at 80
    assert verdict.startswith("failed: action_deviation.policy_probe (lab-bc"), verdict
    assert f"adapters rescale {v} --site lab" in verdict


def test_slow_steps_show_a_spinner_on_a_terminal_even_with_json(fleet, monkeypatch):
    from rich.console import Console

    import dynaflip_adapt.cli.output as output
    import dynaflip_adapt.cli.progress as progress

    def terminal() -> Console:
        import sys

        return Console(file=sys.stderr, force_terminal=True, width=100)

    monkeypatch.setattr(progress, "err_console", terminal)
    monkeypatch.setattr(output, "err_console", terminal)
    r = runner.invoke(app, ["audit", fleet["lab"], "--json"])
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)  # stdout stays parseable
    assert "auditing dynaflip-adapter" in r.stderr


def test_help_shows_no_bool_placeholder_and_reflows_docstrings():
    import typer.main

    r = runner.invoke(app, ["promote", "--help"], env={"COLUMNS": "100"})
    assert r.exit_code == 0 and "<bool>" not in r.stdout and "--allow-unaudited" in r.stdout
    root = typer.main.get_command(app)

    def commands(group, path=()):
        for name, cmd in group.commands.items():
            yield (*path, name), cmd
            if hasattr(cmd, "commands"):
                yield from commands(cmd, (*path, name))

    for path, cmd in commands(root):
        for para in (cmd.help or "").split("\n\n"):
            assert "\n" not in para.strip(), (path, para)


def test_inspect_png_labels_its_columns(fleet, tmp_path):
    import cv2

    from dynaflip_adapt.eval.attention import HEADER

    out = tmp_path / "a.png"
    ok(["inspect", fleet["logs"], "--adapter", fleet["lab"], "--out", str(out), "-n", "2"])
    img = cv2.imread(str(out))
    tile = 32 * 3  # tiny backbone input x upscale
    assert img.shape[:2] == (HEADER + 2 * tile, 3 * tile)
    strip = img[:HEADER]
    for col in range(3):  # dark text in each column's header
        assert (strip[:, col * tile : (col + 1) * tile] < 100).any(), col
    assert (img[HEADER:] < 255).any()
    line = refused(["inspect", fleet["logs"], "--out", str(out)], 2)  # exists: not overwritten
    assert "--overwrite" in line


# --------------------------------------------------------------------- MLflow, as browsed


def test_runs_and_versions_are_browsable_in_mlflow(fleet):
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL, FINETUNE_EXPERIMENT
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import AUDIT_EXPERIMENT, POLICY_EXPERIMENT, POLICY_MODEL
    from dynaflip_adapt.registry.store import resolve_store

    reg = Registry(resolve_store())
    c = reg.client
    ft = reg.search_runs(FINETUNE_EXPERIMENT, f"tags.adapter_version = '{fleet['lab']}'")
    params = ft[0].data.params
    for key in ("optim.lr", "lora.r", "lora.alpha", "loss.area", "optim.max_steps"):
        assert key in params, sorted(params)
    assert params["optim.max_steps"] == "2"
    pol = reg.search_runs(POLICY_EXPERIMENT, "")[0]
    assert pol.data.params["head"] == "bc" and pol.data.params["steps"] == "40"
    curve = c.get_metric_history(pol.info.run_id, "loss")
    assert len(curve) >= 10 and curve[-1].step == 40
    audits = reg.search_runs(AUDIT_EXPERIMENT, "")
    names = {k for r in audits for k in r.data.metrics}
    assert any(n.startswith("policy.lab-bc_v") and n.endswith("action_deviation.policy_probe")
               for n in names), names  # fmt: skip
    assert not any(" " in n for n in names)
    v = reg.resolve(ADAPTER_MODEL, fleet["lab"])
    assert v.tags["strength"] == "1"
    assert c.get_registered_model(ADAPTER_MODEL).description
    assert c.get_registered_model(POLICY_MODEL).description
    assert c.get_model_version(ADAPTER_MODEL, fleet["lab"]).description
    lineage = ok(["adapters", "show", fleet["lab"]])["manifest"]["lineage"]
    assert all(Path(p).is_absolute() for p in lineage["logs"])


def test_a_rescaled_adapter_is_tagged_with_its_strength(fleet):
    out = ok(["adapters", "rescale", fleet["lab"], "--strength", "0.5"])
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    v = Registry(resolve_store()).resolve(ADAPTER_MODEL, out["registered"]["version"])
    assert v.tags["strength"] == "0.5"


def test_a_relative_sqlite_uri_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    logs = write_native(tmp_path / "l.h5", n=2, T=8, H=32, W=32)[0]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///store/db.sqlite")
    ok(["pretrain", str(logs), "-r", "pretrain/tiny", "--set", "data.num_workers=0",
        "--set", "optim.max_steps=2", "--set", "data.gap=1", "--workdir", str(tmp_path / "run")])  # fmt: skip
    assert not (work / "mlruns").exists()
    assert (work / "store" / "artifacts").is_dir()


@pytest.mark.slow
def test_sigterm_during_finetune_is_handled_like_ctrl_c(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "DYNAFLIP_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "dynaflip_adapt"]
    logs = str(write_native(tmp_path / "l.h5", n=3, T=16, H=32, W=32)[0])
    subprocess.run([*cli, "pretrain", logs, "-r", "pretrain/tiny", "--set", "data.num_workers=0",
                    "--set", "optim.max_steps=4", "--set", "data.gap=1", "--set-base", "--json"],
                   env=env, check=True, capture_output=True)  # fmt: skip
    work = tmp_path / "run"
    proc = subprocess.Popen(
        [*cli, "finetune", logs, "--site", "s", "--steps", "100000", *FAST,
         "--set", "run.checkpoint_every=2", "--workdir", str(work), "--json"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (work / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated"
    assert (work / "checkpoint.pt").exists()

    monkeypatch.setenv("DYNAFLIP_HOME", env["DYNAFLIP_HOME"])  # restored for later tests
    from dynaflip_adapt.registry.adapters import FINETUNE_EXPERIMENT
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    runs = Registry(resolve_store()).search_runs(FINETUNE_EXPERIMENT, "")
    assert [r.info.status for r in runs] == ["KILLED"]
    assert "dynaflip.reaped" not in runs[0].data.tags  # ended by itself, not by a later reaper


def test_eval_logs_out_refuses_an_existing_file_and_writes_its_json(fleet, tmp_path):
    out = tmp_path / "eval.json"
    out.write_text("mine")
    args = ["eval", "logs", fleet["logs"], "--adapter", fleet["lab"], "--out", str(out)]
    line = refused(args, 2)
    assert "--overwrite" in line and out.read_text() == "mine"
    printed = ok([*args, "--overwrite"])
    written = json.loads(out.read_text())
    assert written["reduction"] == printed["reduction"] and written["site"] == "lab"


def test_a_policy_that_reads_no_image_is_not_held_to_the_backbone(fleet):
    """A proprio-only control pinned to a site (as the demo pins one) used to fail every audit
    on `policy_feature_dim` (it reads 0 features), so `--strength auto` fell to 0 and the demo's
    adapter was incompatible at any strength. An adapter cannot change what such a policy does:
    alone it leaves the site unaudited; beside an image policy the verdict is that policy's."""
    logs = fleet["logs"]
    ok(["policies", "train", logs, "--site", "blind", "--head", "proprio_only", "--steps", "20",
        "--name", "blind-proprio"])  # fmt: skip
    r = runner.invoke(app, ["audit", fleet["lab"], "--site", "blind", "--json"])
    assert r.exit_code == 1 and json.loads(r.stdout)["verdict"] == "unaudited", r.output
    ok(["policies", "train", logs, "--site", "blind", "--head", "bc", "--steps", "20",
        "--name", "blind-bc", "--tolerance", "0.2"])  # fmt: skip
    rep = ok(["audit", fleet["lab"], "--site", "blind"])
    assert [p["policy"].split(" ")[0] for p in rep["policies"]] == ["blind-bc"]
    assert rep["verdict"] == expected_verdict(rep) and rep["verdict"] in ("compatible", "warning")
