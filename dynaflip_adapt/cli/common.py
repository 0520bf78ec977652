"""Options shared by commands that read site logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

LogsArg = Annotated[
    list[Path],
    typer.Argument(
        help="HDF5 files or folders of them (ALOHA: one file per episode).",
        metavar="LOGS...",
        show_default=False,
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


# The adapter a command acts on is its first argument (`audit 3`, `promote 3 --site lab`,
# `export 3 --out DIR`, `adapters show 3`); commands whose first argument is logs take
# `--adapter/-a`. The option spelling is still accepted (hidden) where the argument is used.
ADAPTER_HELP = (
    "Adapter: version (3 or v3), alias (prod-lab or @prod-lab), models:/dynaflip-adapter/3, "
    "models:/dynaflip-adapter@prod-lab, or an adapter folder."
)
AdapterArg = Annotated[
    str | None, typer.Argument(help=ADAPTER_HELP, metavar="ADAPTER", show_default=False)
]
AdapterOptHidden = Annotated[str | None, typer.Option("--adapter", "-a", hidden=True)]
AdapterOpt = Annotated[str | None, typer.Option("--adapter", "-a", help=ADAPTER_HELP)]


def one_adapter(argument: str | None, option: str | None) -> str:
    """The adapter reference given as the argument or (older spelling) --adapter.

    Raises:
        InputError: Neither, or both with different values.
    """
    from dynaflip_adapt.errors import InputError

    if argument is not None and option is not None and argument != option:
        raise InputError(None, "ADAPTER", f"{argument!r} and --adapter {option!r}", "one adapter")
    ref = argument if argument is not None else option
    if ref is None:
        raise InputError(None, "ADAPTER", "nothing", "an adapter version, alias or folder")
    return ref


# Training length: `--steps` everywhere (`--max-steps` kept as a hidden spelling).
StepsHelp = "Optimizer steps"
MaxStepsHidden = Annotated[int | None, typer.Option("--max-steps", min=1, hidden=True)]


def one_steps(steps: int | None, max_steps: int | None) -> int | None:
    """`--steps`, or its older spelling `--max-steps`.

    Raises:
        InputError: Both, with different values.
    """
    from dynaflip_adapt.errors import InputError

    if steps is not None and max_steps is not None and steps != max_steps:
        raise InputError(None, "--steps", f"{steps} and --max-steps {max_steps}", "one value")
    return steps if steps is not None else max_steps


OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing output (never other files).")
]


StrengthOpt = Annotated[
    str,
    typer.Option(
        "--strength",
        help="Share of the adapter's weight update to apply, in [0, 1], or 'auto': the largest "
        "share at which the audit against the site's pinned policies passes.",
    ),
]
BudgetOpt = Annotated[
    float,
    typer.Option(
        "--budget",
        help="With --strength auto: each policy's action deviation on its own frames may use at "
        "most this share of its tolerance (0.5 also clears the audit's margin warning).",
    ),
]


def require_mujoco() -> None:
    """Refuses (exit 2) a simulator command where the `sim` extra is not installed."""
    import importlib.util

    from dynaflip_adapt.errors import InputError

    if importlib.util.find_spec("mujoco") is None:
        raise InputError(
            None, "mujoco", "not installed", "the 'sim' extra: pip install 'dynaflip-adapt[sim]'"
        )


DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device", help="auto | cpu | cuda | mps (overrides run.device; auto: CUDA, MPS, CPU)."
    ),
]
PrecisionOpt = Annotated[
    str | None,
    typer.Option(
        "--precision", help="auto | fp32 | bf16 (overrides run.precision; auto: bf16 on CUDA)."
    ),
]
