"""Property-based hostile input: random damage to valid site logs and random recipes.

Every input is either accepted, and then read completely and correctly, or rejected with the
documented one-line error (file, key, found, expected) and exit code 2: never a traceback,
never another exit code, and reading never modifies the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from tests.builders import write_native

runner = CliRunner()
FUZZ = settings(
    max_examples=int(os.environ.get("DYNAFLIP_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_native(tmp_path_factory.mktemp("pristine") / "site.h5", n=2)[0]


def _paths(p: Path) -> list[str]:
    out: list[str] = []
    with h5py.File(p, "r") as f:
        f.visit(out.append)
    return sorted(out)


DTYPES = [np.uint8, np.float32, np.float64, np.int64, np.bool_]


@st.composite
def damage(draw: st.DrawFn, names: list[str]) -> tuple:
    kind = draw(st.sampled_from(["delete", "replace", "attr", "truncate", "bytes"]))
    if kind in ("delete", "replace"):
        target = draw(st.sampled_from(names))
        if kind == "delete":
            return (kind, target)
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
        dtype = draw(st.sampled_from(DTYPES))
        fill = draw(st.sampled_from([0.0, 1.0, -1.0, float("nan"), float("inf"), 300.0]))
        return (kind, target, shape, dtype, fill)
    if kind == "attr":
        value = draw(
            st.one_of(
                st.integers(-3, 99),
                # What an HDF5 string attribute can hold (no NUL, no lone surrogate).
                st.text(
                    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                    max_size=8,
                ),
                st.floats(allow_nan=True),
                st.none(),
            )
        )
        return (kind, draw(st.sampled_from(["schema_version", "layout", "site"])), value)
    if kind == "truncate":
        return (kind, draw(st.floats(0.0, 0.99)))
    return (kind, draw(st.floats(0.0, 1.0)), draw(st.binary(min_size=1, max_size=64)))


def _apply(p: Path, d: tuple) -> None:
    kind = d[0]
    if kind in ("delete", "replace", "attr"):
        with h5py.File(p, "a") as f:
            if kind == "attr":
                if d[2] is None:
                    f.attrs.pop(d[1], None)
                else:
                    f.attrs[d[1]] = d[2]
                return
            target = d[1]
            if target not in f:
                return
            is_group = isinstance(f[target], h5py.Group)
            del f[target]
            if kind == "replace" and not is_group:
                _, shape, dtype, fill = d[1:]
                arr = np.full(shape, fill if dtype in (np.float32, np.float64) else 1, dtype=dtype)
                f.create_dataset(target, data=arr)
        return
    data = bytearray(p.read_bytes())
    if kind == "truncate":
        p.write_bytes(bytes(data[: int(len(data) * d[1])]))
        return
    at = int(d[1] * max(len(data) - len(d[2]), 0))
    data[at : at + len(d[2])] = d[2]
    p.write_bytes(bytes(data))


def _read_everything(p: Path) -> int:
    """Reads every frame, action and proprio of every episode; returns the frame count."""
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs

    reader = EpisodeReader()
    n = 0
    for ep in open_logs([p]).episodes:
        rgb = reader.rgb(ep, slice(0, ep.length))
        acts = reader.actions(ep, slice(0, ep.length))
        assert rgb.dtype == np.uint8 and rgb.shape[0] == ep.length
        assert np.isfinite(acts).all()
        for t in range(ep.length):
            assert np.isfinite(reader.proprio(ep, t)).all()
        n += ep.length
    return n


@given(data=st.data())
@FUZZ
def test_damaged_logs_are_read_correctly_or_refused_in_one_line(pristine, tmp_path, data):
    p = tmp_path / f"fz{data.draw(st.integers(0, 10**9))}.h5"
    shutil.copyfile(pristine, p)
    d = data.draw(damage(_paths(pristine)))
    _apply(p, d)
    before = p.read_bytes()
    r = runner.invoke(app, ["data", "validate", str(p)])
    assert r.exit_code in (0, 2), (d, r.exit_code, r.output)
    assert "Traceback" not in r.output and "internal error" not in r.output, (d, r.output)
    if r.exit_code == 2:
        first = next(line for line in r.stderr.splitlines() if line.strip())
        assert p.name in first and "found" in first and "expected" in first, (d, first)
    else:
        # Accepted: inspect agrees, and every array reads back whole and finite.
        r2 = runner.invoke(app, ["data", "inspect", str(p), "--json"])
        assert r2.exit_code == 0, (d, r2.output)
        assert _read_everything(p) > 0
    assert p.read_bytes() == before, "reading must not modify the file"


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.875, 0.95, 0.99])
def test_a_log_cut_short_is_refused_by_validate_not_by_the_first_reader(
    pristine, tmp_path, fraction
):
    """A truncation past the metadata (a copy that died mid-way) used to pass `data validate`
    and fail later, in whatever read the frames first."""
    p = tmp_path / "cut.h5"
    shutil.copyfile(pristine, p)
    _apply(p, ("truncate", fraction))
    r = runner.invoke(app, ["data", "validate", str(p)])
    if r.exit_code == 0:
        assert _read_everything(p) > 0, fraction  # accepted: then it reads whole
        return
    assert r.exit_code == 2, (fraction, r.output)
    first = next(line for line in r.stderr.splitlines() if line.strip())
    assert p.name in first and "found" in first and "expected" in first, first


RECIPE_KEYS = [
    "kind", "description", "data.gap", "data.num_workers", "data.layout", "optim.lr",
    "optim.max_steps", "optim.batch_size", "optim.betas", "loss.area", "loss.cosine_margin",
    "loss.distill_space", "lora.r", "lora.alpha", "lora.target_modules", "augment.enabled",
    "ema.decay", "replay.fraction", "run.seed", "require", "bogus.key", "model.width",
]  # fmt: skip
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-2, 5), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@given(
    base=st.sampled_from(["finetune/default", "pretrain/tiny", None]),
    edits=st.dictionaries(st.sampled_from(RECIPE_KEYS), VALUES, max_size=4),
)
@FUZZ
def test_random_recipes_validate_or_fail_in_one_line(tmp_path_factory, base, edits):
    from dynaflip_adapt.config import find_recipe

    doc: dict = {}
    if base is not None:
        doc = yaml.safe_load(find_recipe(base).read_text())
    for key, value in edits.items():
        node = doc
        *parents, leaf = key.split(".")
        for k in parents:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[leaf] = value
    p = tmp_path_factory.mktemp("r") / "recipe.yaml"
    p.write_text(yaml.safe_dump(doc))
    r = runner.invoke(app, ["recipes", "validate", str(p)])
    assert r.exit_code in (0, 2), (doc, r.exit_code, r.output)
    assert "Traceback" not in r.output and "internal error" not in r.output, (doc, r.output)
    if r.exit_code == 2:
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        # One line per problem, each naming the file and one key: a shipped recipe is valid,
        # so every problem is an edited key (or a section above one), or the missing kind.
        assert lines and all(x.startswith(f"fail {p}: ") for x in lines), lines
        keys = [x[len(f"fail {p}: ") :].split(": found ", 1)[0] for x in lines]
        assert all(x.count(", expected ") == 1 for x in lines), lines
        assert len(set(keys)) == len(keys) <= len(edits) + 1, lines
        for k in keys:
            # the edited key itself, a section above it, or an item inside its new value
            near = [e for e in edits if e == k or e.startswith(k + ".") or k.startswith(e + ".")]
            assert k == "kind" or near, (k, edits)
    else:
        assert r.stdout.strip().splitlines()[-1].startswith("ok "), r.stdout
