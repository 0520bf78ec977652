"""``dynaflip-adapt monitor``: has a site drifted from what its production encoder fits?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynaflip_adapt.cli.common import CameraOpt, JsonOpt, LayoutOpt, LogsArg
from dynaflip_adapt.cli.output import console, err_console, print_json, state


def monitor_cmd(
    ctx: typer.Context,
    logs: LogsArg,
    site: Annotated[str, typer.Option("--site", help="The site whose encoder to check.")],
    reference: Annotated[
        list[Path] | None,
        typer.Option(
            "--reference",
            help="Logs the production encoder is known to fit (default: the production "
            "adapter's training logs, else its probe frames; required for a site never adapted).",
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", "-b", help="For a site never adapted (default: base)."),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe", "-r", help="Monitor recipe (threshold, frames): name or YAML path."
        ),
    ] = "monitor/default",
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Recipe override KEY=VALUE (drift.threshold=0.05)."),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(
            "--frames", min=8, help="Frames sampled from each side (drift.frames; default 256)."
        ),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="Drift score above which to adapt (drift.threshold; default: the recipe's, "
            "calibrated on the simulator).",
        ),
    ] = None,
    layout: LayoutOpt = None,
    camera: CameraOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score new logs against the site's production encoder: adapt again, or not?

    Two signals, no labels or paired data: the distance (MMD^2) between the distributions of
    the encoder's patch-token maps on the new logs and on frames it is known to fit, and how far
    the actions of the image policies pinned at the site move between the two (MMD^2 in units
    of each policy's action std). Either above its threshold recommends adapting. Each run is
    logged to MLflow (experiment dynaflip-monitor, tagged with the site) as a drift time series.
    Exit code 0: fits; 1: adaptation recommended; 2: bad input (cron-friendly).
    """
    from dynaflip_adapt.workflows.monitor import MonitorRequest, monitor_site

    request = MonitorRequest(
        logs=tuple(logs),
        site=site,
        reference=tuple(reference or []),
        backbone=backbone,
        recipe=recipe,
        overrides=tuple(set_ or []),
        frames=frames,
        threshold=threshold,
        layout=layout,
        camera=camera,
    )
    result = monitor_site(request, tracking_uri=state(ctx).tracking_uri)
    if as_json:
        print_json(result.to_dict())
    else:
        for note in result.notes:
            err_console().print(f"note: {note}", highlight=False)
        d = result.drift
        crossed = f": {' and '.join(result.signals)} crossed" if result.signals else ""
        console().print(
            f"site {result.site}: {result.verdict}{crossed} (drift {d.score:.4f} vs threshold "
            f"{result.threshold:.4f}; reference split-half 95th percentile {d.null_q95:.4f}) "
            f"- {result.encoder}, reference {result.reference}, {d.new_frames} new frames",
            highlight=False,
        )
        for name, value in result.actions.items():
            console().print(
                f"  policy {name}: action drift {value:.4f} vs threshold "
                f"{result.action_threshold:.4f}",
                highlight=False,
            )
    if result.drifted:
        raise typer.Exit(1)
