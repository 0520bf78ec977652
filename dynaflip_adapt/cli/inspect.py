"""``dynaflip-adapt inspect``: attention maps of the base and adapted encoders, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dynaflip_adapt.cli.common import AdapterOpt, JsonOpt, LogsArg, OverwriteOpt
from dynaflip_adapt.cli.output import console, print_json, registry


def inspect_cmd(
    ctx: typer.Context,
    logs: LogsArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write.")] = Path("attention.png"),
    adapter: AdapterOpt = None,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", "-b", help="Backbone (default: the adapter's, else base)."),
    ] = None,
    frames: Annotated[
        int, typer.Option("--frames", "-n", min=1, help="Frames, spread over the logs.")
    ] = 6,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Render where the encoder attends (attention rollout) over a few frames.

    One row per frame under labelled columns: the frame, the base encoder's map, and the
    adapted encoder's map when --adapter is given (adapter compared with the base).
    """
    from dynaflip_adapt.outputs import check_output_file

    check_output_file(out, overwrite=overwrite)
    import numpy as np
    import torch

    from dynaflip_adapt.data.frames import resize_uint8
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.eval.attention import attention_rollout, overlay, save_grid
    from dynaflip_adapt.registry.adapters import load_registered_adapter, open_adapter
    from dynaflip_adapt.registry.backbones import load_backbone

    reg = registry(ctx)
    ad = None
    if adapter is not None and backbone is None:
        bundle, ad, _ = open_adapter(reg, adapter)
    else:
        bundle, _ = load_backbone(reg, backbone)
        if adapter is not None:
            ad = load_registered_adapter(reg, adapter, bundle)[0]
    logset = open_logs(logs)
    eps = logset.episodes
    reader = EpisodeReader()
    picks = np.linspace(0, sum(e.length for e in eps) - 1, frames).round().astype(int)
    starts = np.cumsum([0] + [e.length for e in eps])
    tiles = []
    for p in picks:
        i = int(np.searchsorted(starts, p, side="right") - 1)
        rgb = reader.rgb(eps[i], int(p - starts[i]))
        tiles.append(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))))
    s = bundle.model.cfg.image_size
    batch = resize_uint8(torch.stack(tiles), s)
    x = bundle.model.preprocess(batch)
    base_maps = attention_rollout(bundle.model.image, x).numpy()
    merged_maps = attention_rollout(ad.merged(), x).numpy() if ad is not None else None
    rows = []
    for k in range(len(batch)):
        img = batch[k].permute(1, 2, 0).numpy()
        row = [img, overlay(img, base_maps[k])]
        if merged_maps is not None:
            row.append(overlay(img, merged_maps[k]))
        rows.append(row)
    labels = ["frame", "base"] + (["adapted"] if merged_maps is not None else [])
    path = save_grid(rows, out, labels=labels)
    shift = float(np.abs(base_maps - merged_maps).mean()) if merged_maps is not None else None
    if as_json:
        print_json({"png": str(path), "frames": len(rows), "mean_abs_map_change": shift})
    else:
        extra = f"; mean |map change| {shift:.3f}" if shift is not None else ""
        console().print(
            f"wrote {path}: {len(rows)} frames (frame | base | adapted){extra}", highlight=False
        )
