"""Options shared by commands that read site logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

LogsArg = Annotated[
    list[Path],
    typer.Argument(
        help="HDF5 files or folders of them (ALOHA: one file per episode).", show_default=False
    ),
]
LayoutOpt = Annotated[
    str | None,
    typer.Option("--layout", help="Force a layout: native, robomimic, libero, aloha, aloha_jpeg."),
]
CameraOpt = Annotated[str | None, typer.Option("--camera", help="Camera to read.")]
OrientationOpt = Annotated[
    str | None,
    typer.Option(
        "--orientation",
        help="Image orientation fix: none, flip_vertical, flip_horizontal, rotate180 "
        "(default: the layout's; LIBERO is rotate180).",
    ),
]
DepthScaleOpt = Annotated[
    float | None,
    typer.Option("--depth-scale", help="Multiplier from stored depth to metres (0.001 for mm)."),
]
LanguageOpt = Annotated[
    str | None, typer.Option("--language", help="Instruction for logs that carry none.")
]
ProprioOpt = Annotated[
    list[str] | None,
    typer.Option("--proprio-key", help="Low-dim observation key for proprio (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts).")]


def source_settings(
    layout: str | None = None,
    camera: str | None = None,
    orientation: str | None = None,
    depth_scale: float | None = None,
    language: str | None = None,
    proprio_keys: list[str] | None = None,
    flow_source: str | None = None,
) -> Any:
    """Builds `SourceSettings` from CLI options (imports the data module lazily)."""
    from dynaflip_adapt.data.logs import SourceSettings

    return SourceSettings(
        layout=layout,
        camera=camera,
        orientation=orientation,
        depth_scale=depth_scale,
        language=language,
        proprio_keys=tuple(proprio_keys) if proprio_keys else None,
        flow_source=flow_source,
    )
