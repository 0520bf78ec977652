"""``dynaflip-adapt sim``: generate site logs with the MuJoCo tabletop simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt, OverwriteOpt, require_mujoco
from dynaflip_adapt.cli.output import console, print_json, progress_enabled

app = typer.Typer(
    help="Generate site logs in a MuJoCo tabletop "
    "(extra 'sim': pip install dynaflip-adapt\\[sim]).",
    no_args_is_help=True,
)


@app.command("generate")
def generate(
    out: Annotated[Path, typer.Argument(help="Output HDF5 file (native layout).")],
    site: Annotated[
        str,
        typer.Option(
            "--site",
            help="Site preset (see `sim sites`), 'random', 'random-N', or 'SITE@T' for a mild "
            "shift T (0..1) of the way from base to SITE (warm_dim@0.25).",
        ),
    ] = "base",
    site_seed: Annotated[
        int | None, typer.Option("--site-seed", help="Seed for --site random.")
    ] = None,
    camera: Annotated[
        str | None,
        typer.Option(
            "--camera",
            help="Camera pose and field of view of this preset or random-N instead of the "
            "site's own (one rig, new appearance: --site random --site-seed 3 --camera base).",
        ),
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1, help="Episodes.")] = 20,
    frames: Annotated[
        int,
        typer.Option(
            "--frames", min=10, help="The most frames per episode (it ends once the task is done)."
        ),
    ] = 50,
    seed: Annotated[
        int, typer.Option("--seed", help="Episode seed: same seed, other site = paired logs.")
    ] = 0,
    size: Annotated[
        int, typer.Option("--size", min=16, max=640, help="Square image size (pixels).")
    ] = 128,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="pick_place, push, reach (repeatable; default: all)."),
    ] = None,
    flow_stride: Annotated[
        list[int] | None,
        typer.Option("--flow-stride", help="Ground-truth flow stride(s) (default: 1 and 4)."),
    ] = None,
    flow_grid: Annotated[
        int, typer.Option("--flow-grid", min=1, help="Flow point grid stride.")
    ] = 4,
    noise: Annotated[
        float | None,
        typer.Option(
            "--noise",
            min=0.0,
            max=0.5,
            help="DART noise on the executed motion while recording (action units; the logged "
            "action stays the expert's), so the demonstrations show recoveries. 0: none "
            "(default 0.06).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Worker processes.")] = 2,
    compression: Annotated[
        str, typer.Option("--compression", help="none, lzf or gzip for frame datasets.")
    ] = "lzf",
    export: Annotated[
        list[str] | None,
        typer.Option("--export", help="Also write robomimic, aloha or aloha_jpeg (repeatable)."),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate site logs with scripted experts (pick-and-place, push, reach).

    Writes RGB, depth, K, camera extrinsics, proprio, actions, language and ground-truth 3D flow.
    """
    from dynaflip_adapt.outputs import check_output_file

    check_output_file(out, overwrite=overwrite, option="OUT")
    require_mujoco()
    from dynaflip_adapt.cli.progress import count_progress
    from dynaflip_adapt.sim.generate import GenerateSpec
    from dynaflip_adapt.sim.generate import generate as run
    from dynaflip_adapt.sim.sites import get_site, with_camera

    chosen = get_site(site, site_seed)
    spec = GenerateSpec(
        site=with_camera(chosen, camera) if camera else chosen,
        episodes=episodes,
        frames=frames,
        seed=seed,
        size=size,
        tasks=tuple(task) if task else GenerateSpec.tasks,
        flow_strides=tuple(flow_stride) if flow_stride else GenerateSpec.flow_strides,
        flow_grid=flow_grid,
        noise=noise,
    )
    spec.validate()
    with count_progress(
        f"site {spec.site.name}", episodes, enabled=progress_enabled(as_json)
    ) as advance:
        result = run(
            out,
            spec,
            workers=workers,
            compression=compression,
            exports=export or [],
            on_episode=lambda _ep: advance(),
        )
    if as_json:
        print_json(result.to_dict())
        return
    c = console()
    c.print(
        f"wrote {result.path}: {result.episodes} episodes, {result.frames} frames at site "
        f"'{spec.site.name}' in {result.seconds:.1f} s ({result.frames_per_second:.0f} frames/s), "
        f"expert success {result.success_rate:.0%}",
        highlight=False,
    )
    for layout, paths in result.exports.items():
        c.print(f"exported {layout}: {paths[0] if len(paths) == 1 else Path(paths[0]).parent}")


@app.command("sites")
def sites(as_json: JsonOpt = False) -> None:
    """List the site presets (appearance shifts)."""
    from dynaflip_adapt.sim.sites import PRESETS

    if as_json:
        print_json({name: s.to_dict() for name, s in PRESETS.items()})
        return
    table = Table(title="site presets ('random --site-seed N' draws more)")
    for col in ("site", "table", "light", "shadows", "camera (dist, az, el, fovy)"):
        table.add_column(col)
    for name, s in PRESETS.items():
        cam = s.camera
        table.add_row(
            name,
            s.table.kind,
            " ".join(f"{v:.2f}" for v in s.light_rgb),
            "yes" if s.shadows else "no",
            f"{cam.distance:.2f}, {cam.azimuth:.0f}, {cam.elevation:.0f}, {cam.fovy:.0f}",
        )
    console().print(table)
