"""``dynaflip-adapt data``: inspect, validate and fingerprint site logs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import (
    CameraOpt,
    DepthScaleOpt,
    JsonOpt,
    LanguageOpt,
    LayoutOpt,
    LogsArg,
    OrientationOpt,
    ProprioOpt,
    source_settings,
)
from dynaflip_adapt.cli.output import console, err_console, print_json
from dynaflip_adapt.errors import EXIT_BAD_INPUT

app = typer.Typer(help="Inspect, validate and fingerprint HDF5 site logs.", no_args_is_help=True)


def _yes(v: bool) -> str:
    return "[green]yes[/]" if v else "[dim]no[/]"


@app.command("inspect")
def inspect(
    logs: LogsArg,
    layout: LayoutOpt = None,
    camera: CameraOpt = None,
    orientation: OrientationOpt = None,
    depth_scale: DepthScaleOpt = None,
    language: LanguageOpt = None,
    proprio_key: ProprioOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Summarize logs: layout, episodes, frames, cameras, shapes, supervision present.

    Shows dtypes and whether language, depth, intrinsics, extrinsics and 3D flow are present.
    Reads metadata and small arrays only.
    """
    from dynaflip_adapt.data.logs import open_logs, summarize

    settings = source_settings(layout, camera, orientation, depth_scale, language, proprio_key)
    summary = summarize(open_logs(logs, settings))
    if as_json:
        print_json({"files": summary})
        return
    table = Table(title="site logs", show_lines=False)
    for col in ("file", "layout", "episodes", "frames", "camera", "image", "A", "proprio"):
        table.add_column(col, overflow="fold")
    for col in ("language", "depth", "K", "extr.", "flow"):
        table.add_column(col)
    for s in summary:
        sup = s["supervision"]
        hw = s["image_hw"]
        table.add_row(
            Path(s["file"]).name,
            s["layout"],
            str(s["episodes"]),
            str(s["frames"]),
            f"{s['camera']} (of {len(s['cameras'])})",
            f"{hw[0]}x{hw[1]}" if hw else "-",
            str(s["action_dim"]),
            str(s["proprio_dim"]),
            _yes(sup["language"]),
            _yes(sup["depth"]),
            _yes(sup["intrinsics"]),
            _yes(sup["extrinsics"]),
            ", ".join(sup["flow"]) or "[dim]no[/]",
        )
    c = console()
    c.print(table)
    missing = [
        k
        for k in ("depth", "intrinsics", "extrinsics")
        if not all(s["supervision"][k] for s in summary)
    ]
    if missing and not any(s["supervision"]["flow"] for s in summary):
        c.print(
            f"[yellow]note:[/] no {', '.join(missing)}: 3D flow cannot be extracted, so the flow "
            "anchors (simplex area, cosine, contrastive) will be unavailable; language and "
            "teacher terms still apply."
        )


@app.command("validate")
def validate(
    logs: LogsArg,
    layout: LayoutOpt = None,
    camera: CameraOpt = None,
    orientation: OrientationOpt = None,
    depth_scale: DepthScaleOpt = None,
    language: LanguageOpt = None,
    proprio_key: ProprioOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every file fully (structure and every value) and list every problem.

    Exit code 2 when any file has a problem.
    """
    from dynaflip_adapt.data.validate import validate_logs

    settings = source_settings(layout, camera, orientation, depth_scale, language, proprio_key)
    reports = validate_logs(logs, settings)
    bad = [r for r in reports if not r.ok]
    if as_json:
        print_json({"ok": not bad, "files": [r.to_dict() for r in reports]})
    else:
        c = console()
        for r in reports:
            if r.ok:
                what = f"{r.layout}, {r.episodes} episodes, {r.frames} frames"
                c.print(f"[green]ok[/]   {r.file} ({what})")
        e = err_console()
        for r in bad:
            for p in r.problems:
                e.print(f"[red]fail[/] {p}", highlight=False)
        n_problems = sum(len(r.problems) for r in bad)
        c.print(f"{len(reports) - len(bad)} ok, {len(bad)} with problems ({n_problems} problems)")
    if bad:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command("fingerprint")
def fingerprint(logs: LogsArg, as_json: JsonOpt = False) -> None:
    """Content fingerprint of a log set, as recorded in lineage.

    Stable across renames, file order, chunking and compression.
    """
    from dynaflip_adapt.data.fingerprint import file_fingerprint, logs_fingerprint
    from dynaflip_adapt.data.logs import expand_paths

    files = expand_paths(logs)
    fp = logs_fingerprint(files)
    if as_json:
        print_json(
            {"fingerprint": fp, "files": {str(p): "sha256:" + file_fingerprint(p) for p in files}}
        )
    else:
        console().print(fp, highlight=False)
