"""``dynaflip-adapt recipes``: list, show, copy and validate YAML recipes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt, OverwriteOpt
from dynaflip_adapt.cli.output import console, err_console, print_json
from dynaflip_adapt.errors import EXIT_BAD_INPUT, InputError

app = typer.Typer(help="Shipped YAML recipes: list, show, copy, validate.", no_args_is_help=True)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Dotted override KEY=VALUE, e.g. optim.lr=3e-4 (repeatable)."),
]


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.readline().lstrip("# ").strip()


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List shipped recipes with the command that runs each."""
    from dynaflip_adapt.config import list_recipes, load_recipe_data

    rows = []
    for name, path in list_recipes().items():
        data = load_recipe_data(path)
        rows.append(
            {
                "name": name,
                "kind": data.get("kind"),
                "description": data.get("description", ""),
                "command": _first_line(path),
                "path": str(path),
            }
        )
    if as_json:
        print_json(rows)
        return
    table = Table(title="recipes")
    for col in ("name", "kind", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["description"])
    console().print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Recipe name or YAML path.")],
    set_: SetOpt = None,
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Show every field with defaults filled in.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe (as written, or resolved with defaults and overrides)."""
    import yaml

    from dynaflip_adapt.config import find_recipe, load_recipe, recipe_to_dict

    if not (resolved or set_ or as_json):
        console().print(
            find_recipe(name).read_text(encoding="utf-8"), highlight=False, markup=False
        )
        return
    recipe, _ = load_recipe(name, set_ or [])
    data = recipe_to_dict(recipe)
    if as_json:
        print_json(data)
    else:
        console().print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False)


@app.command("copy")
def copy(
    name: Annotated[str, typer.Argument(help="Shipped recipe name.")],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.")],
    overwrite: OverwriteOpt = False,
    force: Annotated[bool, typer.Option("--force", hidden=True)] = False,
) -> None:
    """Copy a shipped recipe to edit it."""
    from dynaflip_adapt.config import find_recipe

    src = find_recipe(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not (overwrite or force):
        raise InputError(target, None, "an existing file", "a new path (or --overwrite)")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    console().print(f"copied {src.name} -> {target}", highlight=False)


@app.command("validate")
def validate(
    paths: Annotated[list[str], typer.Argument(help="Recipe files or names.")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate recipes, listing every problem at once. Exit code 2 on any problem."""
    from dynaflip_adapt.config import RecipeError, load_recipe

    results: list[dict[str, Any]] = []
    for p in paths:
        try:
            recipe, path = load_recipe(p, set_ or [])
            kind = getattr(recipe, "kind", None)
            results.append({"recipe": str(path), "ok": True, "kind": kind, "problems": []})
        except RecipeError as exc:
            probs = [{"key": k, "found": f, "expected": e} for k, f, e in exc.problems]
            results.append({"recipe": exc.file or p, "ok": False, "problems": probs})
        except InputError as exc:
            probs = [{"key": exc.key or "", "found": exc.found, "expected": exc.expected}]
            results.append({"recipe": exc.file or p, "ok": False, "problems": probs})
    if as_json:
        print_json(results)
    else:
        for r in results:
            if r["ok"]:
                console().print(f"[green]ok[/]   {r['recipe']} ({r['kind']})", highlight=False)
            for pr in r["problems"]:
                where = ": ".join(x for x in (r["recipe"], pr["key"]) if x)
                err_console().print(
                    f"[red]fail[/] {where}: found {pr['found']}, expected {pr['expected']}",
                    highlight=False,
                )
    if not all(r["ok"] for r in results):
        raise typer.Exit(EXIT_BAD_INPUT)
