"""``dynaflip-adapt backbones``: list, show, import and evaluate registered backbones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt, LogsArg
from dynaflip_adapt.cli.output import console, print_json, registry

app = typer.Typer(help="Registered backbones: list, show, import, eval.", no_args_is_help=True)

BackboneOpt = Annotated[
    str | None,
    typer.Option("--backbone", "-b", help="Version, alias or bundle folder (default: base)."),
]


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Registered backbone versions (the shipped one is bootstrapped on an empty registry)."""
    from dynaflip_adapt.registry.backbones import ensure_base
    from dynaflip_adapt.registry.client import BACKBONE_MODEL

    reg = registry(ctx)
    ensure_base(reg)
    versions = reg.versions(BACKBONE_MODEL)
    if as_json:
        print_json([v.to_dict() for v in versions])
        return
    table = Table(title=BACKBONE_MODEL)
    for col in ("version", "aliases", "fingerprint", "embed", "features", "objective", "source"):
        table.add_column(col)
    for v in versions:
        t = v.tags
        table.add_row(
            v.version,
            ", ".join(v.aliases),
            t.get("fingerprint", "")[:19] + "...",
            t.get("embed_dim", ""),
            t.get("feature_dim", ""),
            t.get("objective", ""),
            t.get("source", "pretrain"),
        )
    console().print(table)


@app.command("show")
def show(ctx: typer.Context, backbone: BackboneOpt = None, as_json: JsonOpt = False) -> None:
    """A backbone's manifest: architecture, preprocessing, fingerprint, provenance."""
    from dynaflip_adapt.registry.backbones import load_backbone

    bundle, info = load_backbone(registry(ctx), backbone)
    data = {
        "version": info.to_dict() if info else None,
        "path": str(bundle.path),
        "manifest": bundle.manifest,
    }
    if as_json:
        print_json(data)
        return
    m = bundle.manifest
    c = console()
    c.print(
        f"backbone {info.version if info else bundle.path}  {m['fingerprint']}", highlight=False
    )
    c.print(f"architecture : {m['architecture']}", highlight=False)
    c.print(f"preprocessing: {m['preprocessing']}", highlight=False)
    c.print(f"replay set   : {len(bundle.instructions)} triplets", highlight=False)


def _triple(key: str, text: str | None) -> tuple[float, float, float] | None:
    from dynaflip_adapt.errors import InputError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise InputError(None, key, repr(text), "three comma-separated numbers, R,G,B")
    return values


@app.command("import")
def import_(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, help="A timm-named ViT checkpoint (.safetensors)."
        ),
    ],
    arch: Annotated[
        str,
        typer.Option(
            "--arch",
            help="vit_tiny_patch16_224 | vit_small_patch16_224 | vit_base_patch16_224.",
        ),
    ],
    image_size: Annotated[
        int | None,
        typer.Option("--image-size", help="Input size (default 224; pos_embed is resized)."),
    ] = None,
    mean: Annotated[
        str | None,
        typer.Option("--mean", help="Normalization mean R,G,B the checkpoint was trained with."),
    ] = None,
    std: Annotated[
        str | None, typer.Option("--std", help="Normalization std R,G,B (default 0.5,0.5,0.5).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="An alias for the new version (e.g. my-vits).")
    ] = None,
    set_base: Annotated[
        bool, typer.Option("--set-base", help="Make the new version the registry's base backbone.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the untrained heads.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Register a ViT pretrained elsewhere (timm names) as a backbone version.

    The encoder takes the checkpoint's weights; classifier heads and register tokens are
    ignored (listed). The DynaFLIP heads start untrained: `finetune` then trains on the teacher
    terms alone, and `pretrain --from VERSION` trains the heads (and the encoder) on triplets.
    Pickle checkpoints (.pth/.bin) are refused: convert them with safetensors first.
    """
    from dynaflip_adapt.registry.backbones import TIMM_MEAN, import_checkpoint
    from dynaflip_adapt.registry.client import BASE_ALIAS

    res = import_checkpoint(
        registry(ctx),
        checkpoint,
        arch,
        image_size=image_size,
        mean=_triple("--mean", mean) or TIMM_MEAN,
        std=_triple("--std", std) or TIMM_MEAN,
        alias=name,
        make_base=set_base,
        seed=seed,
    )
    if as_json:
        print_json(res.to_dict())
        return
    c = console()
    info = res.info
    c.print(
        f"registered backbone version {info.version} ({info.tags['fingerprint'][:19]}...)"
        f"{' as base' if BASE_ALIAS in info.aliases else ''}: {res.arch} at {res.image_size} px, "
        f"from {checkpoint.name} ({res.checkpoint_sha256[:19]}...)",
        highlight=False,
    )
    if res.ignored:
        c.print(f"ignored: {', '.join(res.ignored)}", highlight=False)
    c.print(
        f"untrained heads ({', '.join(res.untrained)}): finetune uses the teacher terms only; "
        f"`pretrain LOGS --from {info.version}` trains them on triplets",
        highlight=False,
    )


@app.command("eval")
def eval_(
    ctx: typer.Context,
    logs: LogsArg,
    backbone: BackboneOpt = None,
    against: Annotated[
        list[str] | None,
        typer.Option(
            "--against",
            help="Another backbone (version, alias or folder) scored on the same triplets; "
            "prints the margin with a paired 95% interval. Repeatable.",
        ),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Held-out triplets.")] = 300,
    gap: Annotated[
        int | None, typer.Option("--gap", help="Frame gap (default: the backbone's).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tri-modal retrieval on held-out logs, with 95% intervals (bootstrap over episodes).

    Image transition -> its 3D flow among all test flows, and -> its instruction among the
    distinct ones (top-1/top-5); mean simplex area. With --against, every backbone is scored on
    the same triplets (the first one's gap) and the margins over the others are printed.
    """
    from dynaflip_adapt.eval.backbone import heldout_retrieval
    from dynaflip_adapt.eval.retrieval import margins
    from dynaflip_adapt.registry.backbones import load_backbone

    reg = registry(ctx)
    loaded = [load_backbone(reg, spec) for spec in [backbone, *(against or [])]]
    named = [
        (f"backbone {info.version if info else bundle.path}", bundle) for bundle, info in loaded
    ]
    reports = heldout_retrieval(named, logs, samples=samples, gap=gap)
    rows = margins(reports[:1], reports[1:])
    if as_json:
        if against:
            print_json({"encoders": [r.to_dict() for r in reports], "margins": rows})
        else:
            print_json(reports[0].to_dict())
        return
    print_retrieval_table(reports)
    if rows:
        print_margin_table(rows)


def print_margin_table(rows: list[dict[str, Any]]) -> None:
    from dynaflip_adapt.eval.retrieval import METRICS, margin_cell

    table = Table(title="margin, first minus other (95% paired interval; * excludes zero)")
    for col in ("backbone - other", "img->flow top1", "top5", "img->lang top1", "top5"):
        table.add_column(col, justify="right")
    for row in rows:
        cells = []
        for m in METRICS:
            cell, clear = margin_cell(row, m)
            cells.append(cell + ("*" if clear else " "))
        table.add_row(f"{row['backbone']} - {row['baseline']}", *cells)
    console().print(table)


def print_retrieval_table(reports: list[Any]) -> None:
    from dynaflip_adapt.eval.retrieval import METRICS

    table = Table(title="held-out tri-modal retrieval (95% intervals: bootstrap over episodes)")
    for col in ("encoder", "n", "img->flow top1", "top5", "img->lang top1", "top5", "mean area"):
        table.add_column(col, justify="right")
    for r in reports:
        cells = []
        for m in METRICS:
            lo, hi = r.interval(m)
            cells.append(f"{getattr(r, m):.3f} [{lo:.3f}, {hi:.3f}]")
        table.add_row(r.name, f"{r.triplets} ({r.episodes} ep.)", *cells, f"{r.mean_area:.3f}")
    console().print(table)
    if reports:
        r = reports[0]
        console().print(
            f"chance: flow top1 {r.chance_flow_top1:.3f}, language top1 {r.chance_lang_top1:.3f}"
        )
