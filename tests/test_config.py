"""Recipes: every shipped one validates and says how to run it; errors are all reported."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.config import (
    FinetuneLoss,
    FinetuneRecipe,
    PretrainLoss,
    RecipeError,
    apply_overrides,
    list_recipes,
    load_recipe,
    recipe_hash,
)
from dynaflip_adapt.errors import InputError

runner = CliRunner()


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_every_shipped_recipe_validates_and_opens_with_its_command(name):
    path = list_recipes()[name]
    recipe, _ = load_recipe(name)
    first = path.read_text().splitlines()[0]
    kind = recipe.kind  # type: ignore[attr-defined]
    assert first.startswith(f"# dynaflip-adapt {kind} "), first
    assert f"--recipe {name}" in first
    assert name.split("/")[0] == kind


def test_there_are_pretrain_and_conservative_and_aggressive_finetune_recipes():
    names = set(list_recipes())
    assert {"finetune/conservative", "finetune/aggressive", "pretrain/small"} <= names


def test_overrides_apply_with_yaml_types():
    recipe, _ = load_recipe(
        "finetune/default", ["optim.lr=3e-4", "lora.target_modules=[qkv]", "ema.enabled=false"]
    )
    assert isinstance(recipe, FinetuneRecipe)
    assert recipe.optim.lr == 3e-4 and recipe.lora.target_modules == ["qkv"]
    assert recipe.ema.enabled is False
    assert recipe_hash(recipe) != recipe_hash(load_recipe("finetune/default")[0])


def test_every_error_is_reported_at_once(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "kind": "finetune",
                "optim": {"lr": -1, "batch_size": 1},
                "lora": {"r": 0, "targets": ["qkv"]},
                "augment": {"hue": 0.9},
            }
        )
    )
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    keys = [k for k, _, _ in e.value.problems]
    assert set(keys) == {"optim.lr", "optim.batch_size", "lora.r", "lora.targets", "augment.hue"}
    unknown = dict((k, x) for k, _, x in e.value.problems)["lora.targets"]
    assert "target_modules" in unknown and "alpha" in unknown
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_cross_field_checks():
    with pytest.raises(RecipeError, match="patch_size 7 must divide image_size 64"):
        load_recipe("pretrain/small", ["model.patch_size=7"])
    # Either field of a pair may be the edited one: the problem names their section, not the
    # untouched field (the recipe fuzzer's case: `model.width: 17` was blamed on model.heads).
    for edit in ("model.width=17", "model.heads=5", "model.image_size=60", "model.patch_size=7"):
        with pytest.raises(RecipeError) as e:
            load_recipe("pretrain/tiny", [edit])
        assert [k for k, _, _ in e.value.problems] == ["model"], (edit, e.value.problems)


def test_bad_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: finetune\noptim:\n  lr: [1, 2\n")
    with pytest.raises(InputError, match=r"bad.yaml: line \d+: found invalid YAML"):
        load_recipe(p)


def test_unknown_kind_and_unknown_name(tmp_path):
    p = tmp_path / "k.yaml"
    p.write_text("kind: distill\n")
    with pytest.raises(
        RecipeError, match="kind: found 'distill', expected one of pretrain, finetune"
    ):
        load_recipe(p)
    with pytest.raises(InputError, match="finetune/default"):
        load_recipe("finetune/nope")


def test_override_syntax_errors():
    with pytest.raises(InputError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(InputError, match="--set kind"):
        apply_overrides({"kind": "finetune"}, ["kind.x=1"])


def test_cli_list_show_copy_validate(tmp_path):
    r = runner.invoke(app, ["recipes", "list", "--json"])
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == set(list_recipes())
    r = runner.invoke(app, ["recipes", "show", "conservative", "--set", "lora.r=2", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["lora"]["r"] == 2
    r = runner.invoke(app, ["recipes", "copy", "finetune/aggressive", str(tmp_path)])
    assert r.exit_code == 0 and (tmp_path / "aggressive.yaml").exists()
    r = runner.invoke(app, ["recipes", "copy", "finetune/aggressive", str(tmp_path)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = runner.invoke(app, ["recipes", "validate", str(tmp_path / "aggressive.yaml")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        app,
        [
            "recipes",
            "validate",
            str(tmp_path / "aggressive.yaml"),
            "--set",
            "optim.lr=x",
            "--set",
            "lora.r=-2",
        ],
    )
    assert r.exit_code == 2
    assert "optim.lr" in r.stderr and "lora.r" in r.stderr


@pytest.mark.parametrize(
    ("name", "key", "other"),
    [
        ("finetune/default", "loss.temporal", "pretrain"),
        ("finetune/default", "loss.point_position", "pretrain"),
        ("finetune/default", "model.width", "pretrain"),
        ("pretrain/small", "loss.invariance", "finetune"),
        ("pretrain/small", "loss.site_style", "finetune"),
        ("pretrain/small", "lora.r", "finetune"),
    ],
)
def test_a_key_of_the_other_kind_is_refused_not_ignored(name, key, other):
    """`--set loss.temporal=1` on a finetune recipe used to validate and then do nothing."""
    with pytest.raises(RecipeError) as err:
        load_recipe(name, [f"{key}=1"])
    msg = str(err.value)
    assert msg.startswith(f"--set {key.split('.')[0]}")
    assert f"a {other} setting" in msg and "does not read" in msg


def test_a_misspelt_key_is_still_unknown():
    with pytest.raises(RecipeError, match=r"--set loss.tempral: found an unknown key"):
        load_recipe("pretrain/small", ["loss.tempral=1"])


@pytest.mark.parametrize(
    ("model", "trainer"),
    [(PretrainLoss, "train/pretrain.py"), (FinetuneLoss, "train/finetune.py")],
)
def test_every_loss_key_a_recipe_accepts_is_read_by_its_trainer(model, trainer):
    """The schema per kind lists only what that kind's training reads: each field name appears
    as an attribute or key in the trainer's source."""
    import re
    from pathlib import Path

    import dynaflip_adapt

    src = (Path(dynaflip_adapt.__file__).parent / trainer).read_text()
    unread = [k for k in model.model_fields if not re.search(rf"(\.{k}\b|\"{k}\"|'{k}')", src)]
    assert not unread, f"{trainer} never reads loss keys {unread}"


def test_recipe_hash_ignores_the_description_only():
    recipe, _ = load_recipe("finetune/default")
    same = load_recipe("finetune/default", ["description=another text"])[0]
    other = load_recipe("finetune/default", ["loss.align=0.5"])[0]
    assert recipe_hash(same) == recipe_hash(recipe) != recipe_hash(other)


def test_a_field_added_later_keeps_earlier_recipes_hashes():
    """`loss.distill_tokens` came after recipes were hashed and registered: at its default it
    leaves the hash as it was (the canonical JSON without the key), set it changes it."""
    import hashlib

    from dynaflip_adapt.config import recipe_hash, recipe_to_dict

    rec = load_recipe("finetune/default")[0]
    settings = recipe_to_dict(rec)
    settings.pop("description")
    assert settings["loss"].pop("distill_tokens") is False
    assert settings["loss"].pop("site_style") == 0.0
    assert settings["loss"].pop("site_style_band") == 0.06
    assert settings["loss"].pop("policies") == 0.0
    assert settings["loss"].pop("teacher") == "backbone"
    assert settings["loss"].pop("bct") == 0.0
    assert settings["run"].pop("precision") == "auto"
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    assert recipe_hash(rec) == "sha256:" + hashlib.sha256(blob).hexdigest()
    for key in ("loss.distill_tokens=true", "loss.site_style=0.5", "loss.site_style_band=0.1",
                "run.precision=bf16", "loss.policies=1", "loss.teacher=parent",
                "loss.bct=1"):  # fmt: skip
        assert recipe_hash(load_recipe("finetune/default", [key])[0]) != recipe_hash(rec), key


def test_a_bare_name_resolves_within_the_commands_kind():
    """`default` names finetune/default and monitor/default: each command finds its own; a
    caller that does not say the kind is told the name is ambiguous."""
    from dynaflip_adapt.errors import InputError

    assert load_recipe("default", kind="finetune")[1].as_posix().endswith("finetune/default.yaml")
    assert load_recipe("default", kind="monitor")[1].as_posix().endswith("monitor/default.yaml")
    with pytest.raises(InputError, match="ambiguous"):
        load_recipe("default")


def test_problems_inside_one_list_are_one_problem():
    """Found by the recipe fuzzer: `lora.target_modules: [0, 0, 0]` gave three problems (one
    per item); the list is one key with one problem that says how many items are wrong."""
    with pytest.raises(RecipeError) as err:
        load_recipe("finetune/default", ["lora.target_modules=[0, 0, 0]"])
    assert len(err.value.problems) == 1
    key, found, expected = err.value.problems[0]
    assert key == "--set lora.target_modules" and found == "0 at item 0 and 2 more"
    assert "string" in expected
