"""``dynaflip-adapt policies``: train, register, list and show downstream policies."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import JsonOpt, LogsArg
from dynaflip_adapt.cli.output import console, print_json, progress_enabled, registry

app = typer.Typer(
    help="Downstream policies pinned to a backbone (+ adapter).", no_args_is_help=True
)

SiteOpt = Annotated[str, typer.Option("--site", help="Site the policy runs at (audits use it).")]
TolOpt = Annotated[
    float, typer.Option("--tolerance", help="Max mean action deviation, in units of action std.")
]


def encoder_for(registry, backbone: str | None, adapter: str | None):  # type: ignore[no-untyped-def]
    """(bundle, base version, encoder module, adapter version) for a backbone + optional adapter."""
    from dynaflip_adapt.registry.adapters import load_registered_adapter
    from dynaflip_adapt.registry.backbones import load_backbone

    bundle, binfo = load_backbone(registry, backbone)
    if adapter is None:
        return bundle, binfo, bundle.model.image, None
    ad, ainfo = load_registered_adapter(registry, adapter, bundle)
    return bundle, binfo, ad.merged().eval(), ainfo


@app.command("train")
def train(
    ctx: typer.Context,
    logs: LogsArg,
    site: SiteOpt,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", "-b", help="Backbone version/alias/folder (default base)."),
    ] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Adapter the policy reads through.")
    ] = None,
    head: Annotated[
        str,
        typer.Option(
            "--head",
            help="bc (MLP on backbone features + proprio), diffusion (action-chunk diffusion "
            "policy), tokens (attention pooling over patch tokens); controls: image_only, "
            "proprio_only (blind); references: cnn (a CNN trained from scratch on the frames, "
            "no backbone), oracle (true object positions; simulator logs only).",
        ),
    ] = "bc",
    tolerance: TolOpt = 0.1,
    steps: Annotated[
        int | None,
        typer.Option("--steps", min=1, help="Optimizer steps (default: the head's)."),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            min=0.0,
            max=0.5,
            help="Share of episodes held out: the weights with the lowest held-out error are "
            "kept and training stops when it no longer improves (0: train to the end).",
        ),
    ] = 0.1,
    name: Annotated[
        str | None, typer.Option("--name", help="Policy name (default: SITE-HEAD).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    appearance: Annotated[
        int,
        typer.Option(
            "--appearance",
            min=0,
            max=8,
            help="Also train an image head on this many relit copies of the frames (half "
            "styled after the backbone's replay frames from its pretraining sites, all with "
            "photometric jitter), so it reads what light and surfaces leave alone "
            "(0: the frames as logged).",
        ),
    ] = 0,
    language: Annotated[
        bool | None,
        typer.Option(
            "--language/--no-language",
            help="Condition the head on each episode's instruction (the backbone's language "
            "embedding). Default: when every episode has one.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a reference policy head and register it, pinned.

    A head over frozen image features (backbone + optional adapter) and proprio predicts the
    logged action (bc: an MLP; diffusion: denoises a chunk of actions; tokens: attends over
    patch tokens); the policy records its pin, input spec, action statistics, tolerance and how
    it was stopped on held-out episodes. Binary action dimensions (a gripper) are classified.
    """

    from dynaflip_adapt import activity
    from dynaflip_adapt.cli.progress import logged_training
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.policies import (
        FRAME_HEADS,
        HEAD_KINDS,
        HEADS,
        collect,
        fit_policy,
        instruction_embedder,
        save_policy,
    )
    from dynaflip_adapt.registry.lifecycle import POLICY_EXPERIMENT, register_policy

    if head not in HEADS:
        raise InputError(None, "--head", repr(head), "one of " + ", ".join(HEADS))
    if not tolerance > 0:
        raise InputError(None, "--tolerance", repr(tolerance), "a positive number")
    if appearance and head not in FRAME_HEADS:
        raise InputError(
            None,
            "--appearance",
            f"{appearance} with head {head} (it reads no image)",
            "0, or a head that reads the image: " + ", ".join(FRAME_HEADS),
        )
    logset = open_logs(logs)
    reg = registry(ctx)
    bundle, binfo, encoder, ainfo = encoder_for(reg, backbone, adapter)
    if language is None:
        language = all(ep.language for ep in logset.episodes)
    embed = instruction_embedder(bundle) if language else None
    with activity.step(f"reading {len(logset.episodes)} episodes"):
        data = collect(
            logset,
            EpisodeReader(),
            bundle.model.cfg.image_size,
            max_frames=20000,
            language=embed,
            state=HEAD_KINDS[head].reads == "state" or HEAD_KINDS[head].needs_state,
            objects=HEAD_KINDS[head].needs_state,
        )
    steps = steps or HEAD_KINDS[head].steps
    pin = {
        "backbone_fingerprint": bundle.fingerprint,
        "backbone_version": binfo.version if binfo else None,
        "adapter_version": ainfo.version if ainfo else None,
    }
    name = name or f"{site}-{head}"
    params = {
        "head": head,
        "steps": steps,
        "seed": seed,
        "tolerance": tolerance,
        "val_fraction": val_fraction,
        "appearance": appearance,
        "language": bool(language),
        "episodes": len(logset.episodes),
        "frames": len(data["rgb"]),
        "backbone_fingerprint": bundle.fingerprint,
        "adapter_version": pin["adapter_version"] or "",
        "logs": ",".join(str(p.resolve()) for p in logs),
    }
    with reg.run(POLICY_EXPERIMENT, f"policy-{name}", {"site": site}) as run:
        run.log_params(params)
        with logged_training(
            f"policy {name}", steps, run, max(1, steps // 100), enabled=progress_enabled(as_json)
        ) as on_step:
            policy, mse = fit_policy(
                encoder,
                bundle.model.preprocess,
                data,
                head=head,
                tolerance=tolerance,
                pin=pin,
                steps=steps,
                seed=seed,
                extra={"site": site, "preprocessing": bundle.model.cfg.preprocessing()},
                val_fraction=val_fraction,
                on_step=lambda step, loss: on_step(step, {"loss": loss}),
                appearance=appearance,
                styles=bundle.replay.get("rgb0"),
            )
        frames = int(policy.spec["train_frames"])
        tmp = Path(tempfile.mkdtemp(prefix="dynaflip-policy-"))
        try:
            save_policy(tmp / "policy", policy.head, policy.spec, policy.stats)
            info = register_policy(reg, tmp / "policy", site=site, name=name, run=run)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    val = policy.spec.get("validation", {})
    out = {"policy": info.to_dict(), "train_loss": mse, "frames": frames, "validation": val}
    if as_json:
        print_json(out)
    else:
        stop = (
            f"; kept step {val['best_step']} of {steps} (held-out error {val['val_mse']:.3f} on "
            f"{val['val_episodes']} episodes)"
            if "best_step" in val
            else ""
        )
        adapter_pin = f" + adapter v{pin['adapter_version']}" if pin["adapter_version"] else ""
        console().print(
            f"registered dynaflip-policy version {info.version} ({info.tags['name']}, head {head}"
            f"{', language-conditioned' if language else ''}) "
            f"pinned to backbone v{pin['backbone_version']}{adapter_pin}; "
            f"train loss {mse:.4f} on {frames} frames{stop}",
            highlight=False,
        )


@app.command("register")
def register(
    ctx: typer.Context,
    policy_dir: Annotated[
        Path, typer.Argument(help="Folder with policy.json + policy.safetensors.")
    ],
    site: SiteOpt,
    name: Annotated[
        str | None, typer.Option("--name", help="Policy name (default: folder name).")
    ] = None,
    backbone: Annotated[
        str | None, typer.Option("--backbone", "-b", help="Pin: backbone version/alias.")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Pin: adapter version/alias.")
    ] = None,
    tolerance: Annotated[
        float | None, typer.Option("--tolerance", help="Override the declared tolerance.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Record an existing policy folder in the registry with its pin and tolerance."""
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.outputs import sha256_file
    from dynaflip_adapt.policies import SPEC, WEIGHTS, read_policy_spec
    from dynaflip_adapt.registry.lifecycle import register_policy

    reg = registry(ctx)
    spec = read_policy_spec(policy_dir)
    if backbone is not None or adapter is not None:
        bundle, binfo, _, ainfo = encoder_for(reg, backbone, adapter)
        if spec["feature_dim"] != bundle.model.cfg.width:
            raise InputError(
                policy_dir / SPEC,
                "feature_dim",
                str(spec["feature_dim"]),
                f"{bundle.model.cfg.width} (the backbone's)",
            )
        spec["pin"] = {
            "backbone_fingerprint": bundle.fingerprint,
            "backbone_version": binfo.version if binfo else None,
            "adapter_version": ainfo.version if ainfo else None,
        }
    if tolerance is not None:
        spec["tolerance"] = tolerance
    tmp = Path(tempfile.mkdtemp(prefix="dynaflip-policy-"))
    try:
        dst = tmp / "policy"
        dst.mkdir()
        shutil.copyfile(policy_dir / WEIGHTS, dst / WEIGHTS)
        spec["files"] = {WEIGHTS: "sha256:" + sha256_file(dst / WEIGHTS)}
        (dst / SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
        read_policy_spec(dst)
        info = register_policy(reg, dst, site=site, name=name or policy_dir.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        print_json(info.to_dict())
    else:
        console().print(
            f"registered dynaflip-policy version {info.version} for site {site}", highlight=False
        )


@app.command("list")
def list_(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option("--site", help="Only this site's policies.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Registered policies with their pins and tolerances."""
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL

    versions = [
        v
        for v in registry(ctx).versions(POLICY_MODEL)
        if site is None or v.tags.get("site") == site
    ]
    if as_json:
        print_json([v.to_dict() for v in versions])
        return
    table = Table(title=POLICY_MODEL)
    for col in ("version", "name", "site", "head", "tolerance", "backbone", "adapter"):
        table.add_column(col)
    for v in versions:
        t = v.tags
        table.add_row(
            v.version,
            t.get("name", ""),
            t.get("site", ""),
            t.get("head", ""),
            t.get("tolerance", ""),
            t.get("backbone_version", ""),
            t.get("adapter_version", ""),
        )
    console().print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    version: Annotated[str, typer.Argument(help="Policy version.")],
    as_json: JsonOpt = False,
) -> None:
    """A policy's spec: head, inputs, pin, tolerance."""
    from dynaflip_adapt.policies import read_policy_spec
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL

    reg = registry(ctx)
    info = reg.resolve(POLICY_MODEL, version)
    folder = reg.download(info, "policies", read_policy_spec)
    spec = read_policy_spec(folder)
    if as_json:
        print_json({"version": info.to_dict(), "spec": spec, "path": str(folder)})
    else:
        console().print_json(
            json.dumps(
                {
                    "version": info.version,
                    **{k: spec[k] for k in ("head", "inputs", "pin", "tolerance")},
                }
            )
        )
