"""CLI plumbing: fast help without heavy imports, entry points, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from dynaflip_adapt import __version__
from dynaflip_adapt.cli.app import app
from tests.builders import write_native

HEAVY = ("torch", "peft", "mlflow", "h5py", "transformers", "kornia", "mujoco", "numpy")


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from dynaflip_adapt.cli.app import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def _command_paths() -> list[list[str]]:
    """Every group and command of the CLI, walked from the click tree (not a hand-kept list)."""
    import typer

    paths: list[list[str]] = []

    def walk(cmd, prefix):
        paths.append(prefix)
        for name, sub in getattr(cmd, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                walk(sub, [*prefix, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_every_group_and_command_has_help():
    paths = _command_paths()
    groups = {p[0] for p in paths if len(p) == 2}
    assert {"data", "sim", "flow", "backbones", "adapters", "policies", "eval", "recipes"} <= groups
    assert len(paths) > 30
    runner = CliRunner()
    for args in paths:
        r = runner.invoke(app, [*args, "--help"], terminal_width=100)
        assert r.exit_code == 0 and "Usage" in r.stdout, args
        # A one-line summary under the usage line: every command says what it does.
        body = [ln for ln in r.stdout.splitlines()[2:] if ln.strip()]
        assert body and not body[0].lstrip().startswith(("╭", "Options")), (args, body[:2])


def test_python_dash_m_and_version():
    out = subprocess.run(
        [sys.executable, "-m", "dynaflip_adapt", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"dynaflip-adapt {__version__}"


def test_usage_error_is_exit_2():
    r = CliRunner().invoke(app, ["data", "inspect"])
    assert r.exit_code == 2


def test_inspect_json(tmp_path):
    p, _ = write_native(tmp_path / "s.h5", n=2)
    r = CliRunner().invoke(app, ["data", "inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.stdout)["files"][0]
    assert f["layout"] == "native" and f["episodes"] == 2 and f["frames"] == 12
    assert f["dtypes"]["rgb"] == "uint8"


def test_inspect_warns_when_flow_anchors_cannot_exist(tmp_path):
    from tests.builders import write_robomimic_file

    p, _ = write_robomimic_file(tmp_path / "r.h5")
    r = CliRunner().invoke(app, ["data", "inspect", str(p)])
    assert r.exit_code == 0 and "flow anchors" in r.stdout


def test_command_modules_do_not_import_each_other():
    """A CLI command module reads only the shared CLI helpers (common, output, progress) and
    the library: what one command needs from another's domain lives in the library, where the
    Python API reaches it too."""
    import ast
    from pathlib import Path

    import dynaflip_adapt.cli as cli

    folder = Path(cli.__file__).parent
    shared = {"__init__", "app", "common", "output", "progress"}
    commands = {p.stem for p in folder.glob("*.py")} - shared
    assert {"evaluate", "sim", "lifecycle", "finetune", "adapters"} <= commands
    found = []
    for name in sorted(commands):
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if (
                    parts[:2] == ["dynaflip_adapt", "cli"]
                    and len(parts) > 2
                    and parts[2] in commands
                ):
                    found.append(f"{name} imports cli.{parts[2]}")
    assert found == []


# The package's layers, lowest first: a module may import its own layer and those below it.
LAYERS = (
    ("errors",),
    ("outputs", "resources", "activity", "losses", "metrics"),
    ("data",),
    ("config", "models", "flow"),
    ("train",),
    ("policies",),
    ("sim",),
    ("eval",),
    ("registry",),
    ("workflows",),
    ("cli", "__init__", "__main__"),
)


def _layer_imports(root):
    """(importing unit, imported unit, file) for every `dynaflip_adapt.X` import, where a unit is
    a top-level module or package of dynaflip_adapt."""
    import ast

    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        unit = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
                if node.module == "dynaflip_adapt":  # from dynaflip_adapt import activity
                    names = [f"dynaflip_adapt.{a.name}" for a in node.names if a.name[0] != "_"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for n in names:
                parts = n.split(".")
                if parts[0] == "dynaflip_adapt" and len(parts) > 1 and parts[1] != unit:
                    yield unit, parts[1], str(rel)


def test_every_import_points_down(tmp_path):
    """Each folder is one concern and imports only what sits below it (data below models and
    training, training below policies, the simulator, evaluation, the registry, the workflows
    and the CLI): no cycles, and a module's place says what it may depend on."""
    from pathlib import Path

    import dynaflip_adapt

    level = {u: i for i, units in enumerate(LAYERS) for u in units}

    def upward(root):
        return [f"{f}: {a} -> {b}" for a, b, f in _layer_imports(root) if level[b] > level[a]]

    root = Path(dynaflip_adapt.__file__).parent
    units = {p.name.removesuffix(".py") for p in root.iterdir() if p.suffix == ".py" or (
        p.is_dir() and (p / "__init__.py").exists())}  # fmt: skip
    assert units - set(level) == set(), "place new modules in LAYERS"
    assert upward(root) == []
    # The scan sees both import forms, lazy ones inside functions too.
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "rollout.py").write_text(
        "def f():\n    from dynaflip_adapt.eval.audit import x\n    import dynaflip_adapt.cli\n"
        "from dynaflip_adapt import registry, __version__\nfrom dynaflip_adapt.data import y\n"
    )
    assert sorted(upward(tmp_path)) == [
        "sim/rollout.py: sim -> cli",
        "sim/rollout.py: sim -> eval",
        "sim/rollout.py: sim -> registry",
    ]
