"""``dynaflip-adapt flow``: extract 3D flow from RGB-D logs and evaluate it."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import (
    CameraOpt,
    DepthScaleOpt,
    JsonOpt,
    LayoutOpt,
    LogsArg,
    OrientationOpt,
    source_settings,
)
from dynaflip_adapt.cli.output import console, err_console, print_json, progress_enabled

app = typer.Typer(help="3D flow from RGB-D logs: extract, evaluate.", no_args_is_help=True)


@app.command("extract")
def extract(
    logs: LogsArg,
    stride: Annotated[int, typer.Option("--stride", help="Frames between the pair's ends.")] = 1,
    grid: Annotated[int, typer.Option("--grid", help="Pixel stride of the point grid.")] = 4,
    preset: Annotated[
        str, typer.Option("--preset", help="DIS preset: ultrafast, fast, medium.")
    ] = "medium",
    fb_check: Annotated[
        bool, typer.Option("--fb-check/--no-fb-check", help="Forward-backward consistency.")
    ] = True,
    fb_threshold: Annotated[
        float, typer.Option("--fb-threshold", help="Forward-backward error limit (pixels).")
    ] = 1.5,
    edge_tolerance: Annotated[
        float, typer.Option("--edge-tolerance", help="Relative depth spread marking an edge.")
    ] = 0.06,
    source: Annotated[
        str | None, typer.Option("--source", help="Group name (default dis / dis_sK).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing group of that name.")
    ] = False,
    layout: LayoutOpt = None,
    camera: CameraOpt = None,
    orientation: OrientationOpt = None,
    depth_scale: DepthScaleOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract world-frame 3D flow from RGB-D logs into flow/<source> groups.

    OpenCV DIS optical flow + depth + K + extrinsics, with provenance attributes. Logs without
    depth or K are reported and skipped (their flow anchors will be unavailable).
    """
    from dynaflip_adapt.cli.progress import count_progress
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.flow.extract import ExtractConfig, extract_logs

    settings = source_settings(layout, camera, orientation, depth_scale)
    cfg = ExtractConfig(stride, grid, preset, fb_check, fb_threshold, edge_tolerance, source)
    total = len(open_logs(logs, settings).episodes)
    with count_progress("extracting flow", total, enabled=progress_enabled(as_json)) as advance:
        reports = extract_logs(
            logs,
            cfg,
            settings=settings,
            overwrite=overwrite,
            on_episode=lambda _e: advance(),
        )
    if as_json:
        print_json([r.to_dict() for r in reports])
        return
    c = console()
    for r in reports:
        if r.skipped:
            err_console().print(f"[yellow]skipped[/] {r.file}: {r.skipped}", highlight=False)
        else:
            rate = r.pairs / max(r.seconds, 1e-9)
            c.print(
                f"{r.file}: flow/{cfg.group_name} for {r.episodes} episodes, {r.pairs} pairs "
                f"({rate:.0f} pairs/s), {r.valid_fraction:.0%} of points valid",
                highlight=False,
            )


@app.command("eval")
def eval_(
    logs: LogsArg,
    source: Annotated[str, typer.Option("--source", help="Extracted group.")] = "dis",
    reference: Annotated[
        str, typer.Option("--reference", help="Ground-truth group.")
    ] = "ground_truth",
    moving_threshold: Annotated[
        float, typer.Option("--moving-threshold", help="Metres of motion that count as moving.")
    ] = 0.002,
    as_json: JsonOpt = False,
) -> None:
    """Compare extracted flow with the simulator's ground truth.

    End-point error (median, p90, mm) on moving points and the fraction of moving points
    recovered.
    """
    from dynaflip_adapt.flow.evaluate import evaluate_flow

    ev = evaluate_flow(logs, source=source, reference=reference, moving_threshold=moving_threshold)
    if as_json:
        print_json(ev.to_dict())
        return
    table = Table(title=f"flow/{source} vs flow/{reference} (stride {ev.stride})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("pairs", f"{ev.pairs}"),
        ("moving points", f"{ev.moving_points}"),
        ("moving points recovered", f"{ev.found_fraction:.1%}"),
        ("EPE median (mm)", f"{ev.epe_median_mm:.2f}"),
        ("EPE p90 (mm)", f"{ev.epe_p90_mm:.2f}"),
        ("within 5 mm", f"{ev.acc_5mm:.1%}"),
        ("within 10 mm", f"{ev.acc_10mm:.1%}"),
        ("static EPE median (mm)", f"{ev.static_epe_median_mm:.3f}"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console().print(table)
