"""``dynaflip-adapt eval``: prove (or disprove) the out-of-distribution gain."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from dynaflip_adapt.cli.common import AdapterOpt, JsonOpt, LogsArg, OverwriteOpt, require_mujoco
from dynaflip_adapt.cli.output import (
    VERDICT_COLORS,
    console,
    err_console,
    print_json,
    progress_enabled,
    registry,
)
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.eval.ablations import BENCHMARK_DEFAULTS

app = typer.Typer(
    help="Out-of-distribution evaluation: action error with the base encoder vs adapters.",
    no_args_is_help=True,
)
EXPERIMENT = "dynaflip-eval"


def _fmt(m: dict[str, float], pct: bool = False) -> str:
    if pct:
        return f"{100 * m['mean']:+.3g}% ± {100 * m['sd']:.2g}"
    return f"{m['mean']:.3g} ± {m['sd']:.2g}"


def _mean_rate(m: dict[str, float]) -> str:
    """A success rate's mean ± sd over runs (a rate, not a change: no sign)."""
    return f"{100 * m['mean']:.0f}% ± {100 * m['sd']:.0f}"


@app.command("logs")
def logs_cmd(
    ctx: typer.Context,
    shifted: LogsArg,
    adapter: AdapterOpt = None,
    base_logs: Annotated[
        list[Path] | None,
        typer.Option("--base-logs", help="Held-out base-site logs (retention)."),
    ] = None,
    paired_logs: Annotated[
        list[Path] | None,
        typer.Option(
            "--paired-logs",
            help="The same episodes as SHIFTED rendered at the base site (paired drift).",
        ),
    ] = None,
    site: Annotated[
        str | None, typer.Option("--site", help="Policies of this site (default: the adapter's).")
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Also write the JSON here.")
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Action error of a site's policies on held-out shifted logs: base encoder vs adapter.

    Also on held-out base-site logs (retention), the paired feature drift when paired logs are
    given, and the audit verdict. Each change comes with its 95% interval from resampling
    whole episodes. Logged to MLflow (experiment dynaflip-eval). Exit code 0.
    """
    from dynaflip_adapt.cli.common import one_adapter
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.eval.offline import evaluate_encoder
    from dynaflip_adapt.outputs import check_output_file
    from dynaflip_adapt.policies import collect, instruction_embedder
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.client import metric_key
    from dynaflip_adapt.registry.lifecycle import load_policy_version, policies_for_site, run_audit

    adapter = one_adapter(None, adapter)
    if out_file is not None:
        check_output_file(out_file, overwrite=overwrite)
    reg = registry(ctx)
    bundle, ad, ainfo = open_adapter(reg, adapter)
    site = site or ad.manifest.get("site")
    pinfos = policies_for_site(reg, site) if site else []
    if not pinfos:
        raise InputError(None, "--site", repr(site), "a site with registered policies")
    policies = {
        f"v{p.version} {p.tags.get('head', 'policy')}": load_policy_version(reg, p) for p in pinfos
    }
    size = bundle.model.cfg.image_size
    # Instructions are read (and embedded) only when some policy is conditioned on them.
    embed = (
        instruction_embedder(bundle) if any(p.uses_language for p in policies.values()) else None
    )

    def frames(paths: list[Path] | None) -> Any:
        return collect(open_logs(paths), EpisodeReader(), size, language=embed) if paths else None

    sh, base, paired = frames(shifted), frames(base_logs), frames(paired_logs)
    if paired is not None and len(paired["rgb"]) != len(sh["rgb"]):
        raise InputError(
            str(paired_logs[0]) if paired_logs else None,
            None,
            f"{len(paired['rgb'])} frames",
            f"{len(sh['rgb'])} frames paired one to one with the shifted logs",
        )
    name = f"adapter v{ainfo.version}" if ainfo else "adapter"
    evals = [
        evaluate_encoder(bundle, "base", bundle.model.image, policies, sh, base, paired),
        evaluate_encoder(bundle, name, ad.merged().eval(), policies, sh, base, paired),
    ]
    report, _, audit_run = run_audit(reg, adapter, site, None, (bundle, ad, ainfo))
    evals[1].audit = report.verdict
    out = {
        "adapter": ainfo.to_dict() if ainfo else str(ad.path),
        "site": site,
        "audit": report.verdict,
        "audit_run_id": audit_run,
        "encoders": [e.to_dict() for e in evals],
    }
    # reduction = 1 - adapted / base on the shifted site; base_change = adapted / base - 1 at
    # the base site; each with its episode-bootstrap interval.
    shifted_ci = {p: evals[1].change(evals[0], "shifted", p) for p in policies}
    out["reduction"] = {p: -c for p, (c, _, _) in shifted_ci.items()}
    out["reduction_ci95"] = {p: [-hi, -lo] for p, (_, lo, hi) in shifted_ci.items()}
    if base is not None:
        base_ci = {p: evals[1].change(evals[0], "base", p) for p in policies}
        out["base_change"] = {p: c for p, (c, _, _) in base_ci.items()}
        out["base_change_ci95"] = {p: [lo, hi] for p, (_, lo, hi) in base_ci.items()}
    with reg.run(EXPERIMENT, f"eval {name} at {site}", {"site": str(site)}) as run:
        metrics = {metric_key("reduction", p): v for p, v in out["reduction"].items()}
        metrics |= {metric_key("base_change", p): v for p, v in out.get("base_change", {}).items()}
        run.log_metrics(0, metrics)
        run.log_dict(out, "eval.json")
    if out_file is not None:
        out_file.write_text(json.dumps(out, indent=1))
    if as_json:
        print_json(out)
        return
    table = Table(
        title=f"{name} at site {site}: action MSE in action-std units (change < 0: better)"
    )
    table.add_column("policy", no_wrap=True)
    for col in (
        "shifted site\nbase -> adapted",
        "change [95% CI]",
        "base site\nbase -> adapted",
        "change [95% CI]",
    ):
        table.add_column(col, justify="right", no_wrap=True)

    def change(d: float, ci: list[float]) -> str:
        # Coloured only when the interval excludes 0.
        color = "green" if ci[1] < 0 else "red" if ci[0] > 0 else "white"
        return f"[{color}]{100 * d:+.1f}%[/] [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"

    for p in policies:
        b, a = evals[0].shifted[p]["mse"], evals[1].shifted[p]["mse"]
        lo, hi = out["reduction_ci95"][p]
        row = [p, f"{b:.3f} -> {a:.3f}", change(-out["reduction"][p], [-hi, -lo])]
        if base is not None:
            bb, ba = evals[0].base[p]["mse"], evals[1].base[p]["mse"]
            row += [
                f"{bb:.3f} -> {ba:.3f}",
                change(out["base_change"][p], out["base_change_ci95"][p]),
            ]
        else:
            row += ["-", "-"]
        table.add_row(*row)
    c = console()
    c.print(table)
    if paired is not None:
        c.print(
            f"paired feature drift (1 = as far as unrelated frames): base "
            f"{evals[0].paired_drift:.3f} -> adapted {evals[1].paired_drift:.3f}",
            highlight=False,
        )
    c.print(f"audit: [{VERDICT_COLORS[report.verdict]}]{report.verdict}[/]")


@app.command("rollout")
def rollout_cmd(
    ctx: typer.Context,
    site: Annotated[
        list[str],
        typer.Option(
            "--site",
            help="Site to run at (repeatable): a preset, random-N, or SITE-camera-CAMERA.",
        ),
    ],
    policy: Annotated[
        list[str] | None,
        typer.Option("--policy", help="Policy version/alias or folder (repeatable)."),
    ] = None,
    policies_of: Annotated[
        str | None,
        typer.Option("--policies-of", help="Every active policy pinned to this site."),
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="Also run with this adapter merged in (repeatable)."),
    ] = None,
    no_base: Annotated[
        bool, typer.Option("--no-base", help="Skip the base encoder (adapters only).")
    ] = False,
    backbone: Annotated[
        str | None,
        typer.Option("--backbone", "-b", help="Backbone (default: the adapters', else base)."),
    ] = None,
    episodes: Annotated[int, typer.Option("--episodes", "-n", min=1, help="Per cell.")] = 20,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Episode seed: episode i is `sim generate --seed` episode i."),
    ] = 1000,
    horizon: Annotated[
        int, typer.Option("--horizon", min=1, help="Steps before an episode fails.")
    ] = 50,
    render_size: Annotated[
        int,
        typer.Option(
            "--render-size", min=16, max=640, help="Rendered size (that of the training logs)."
        ),
    ] = 128,
    envs: Annotated[int, typer.Option("--envs", min=1, help="Environments at once.")] = 16,
    workers: Annotated[int, typer.Option("--workers", "-j", min=1, help="Processes.")] = 2,
    expert: Annotated[
        bool, typer.Option("--expert/--no-expert", help="Also run the scripted expert.")
    ] = True,
    videos: Annotated[
        int, typer.Option("--videos", min=0, help="Episodes per cell kept as GIFs in MLflow.")
    ] = 2,
    execute: Annotated[
        int,
        typer.Option(
            "--execute",
            min=1,
            help="Diffusion heads: actions of each chunk executed before re-planning "
            "(1: receding horizon).",
        ),
    ] = 1,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Closed loop: success rates of policies in the simulator, base encoder vs adapters.

    Each (site, encoder, policy) cell runs the same episodes (scenes and instructions of `sim
    generate --seed SEED`), so cells are paired; the scripted expert on those episodes is the
    ceiling. An episode succeeds when its task's predicate holds (it then ends), and fails after
    --horizon steps. Success per task with 95% Wilson intervals; logged to MLflow (experiment
    dynaflip-eval) with labelled videos. Exit code 0 (the table says how it went).
    """
    from dynaflip_adapt.outputs import check_output_file
    from dynaflip_adapt.workflows.rollout import RolloutRequest

    request = RolloutRequest(
        sites=tuple(site),
        episodes=episodes,
        seed=seed,
        horizon=horizon,
        render_size=render_size,
        envs=envs,
        workers=workers,
        expert=expert,
        videos=videos,
        execute=execute,
    )
    request.validate()
    if not policy and not policies_of:
        raise InputError(
            None, "--policy", "no policy", "--policy V (repeatable) or --policies-of S"
        )
    if no_base and not adapter:
        raise InputError(None, "--no-base", "no --adapter", "an adapter to run instead")
    if out is not None:
        check_output_file(out, overwrite=overwrite)
    require_mujoco()

    from dynaflip_adapt import activity
    from dynaflip_adapt.cli.progress import count_progress
    from dynaflip_adapt.policies import load_policy
    from dynaflip_adapt.registry.adapters import open_adapter
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import metric_key
    from dynaflip_adapt.registry.lifecycle import (
        POLICY_MODEL,
        load_policy_version,
        policies_for_site,
    )
    from dynaflip_adapt.workflows.rollout import closed_loop

    reg = registry(ctx)
    encoders: dict[str, Any] = {}
    bundle = None
    for ref in adapter or []:
        with activity.step(f"loading adapter {ref}"):
            b, ad, info = open_adapter(reg, ref)
        if bundle is not None and b.fingerprint != bundle.fingerprint:
            raise InputError(
                None, "--adapter", f"{ref!r} on another backbone", "adapters of one backbone"
            )
        bundle = b
        encoders[f"adapter v{info.version}" if info else f"adapter {ref}"] = ad.merged().eval()
    if bundle is None or backbone is not None:
        loaded, _ = load_backbone(reg, backbone)
        if bundle is not None and loaded.fingerprint != bundle.fingerprint:
            raise InputError(
                None, "--backbone", f"{backbone!r}", "the backbone the --adapter was trained on"
            )
        bundle = loaded
    if not no_base:
        encoders = {"base": bundle.model.image.eval(), **encoders}
    policies: dict[str, Any] = {}
    with activity.step("loading the policies"):
        infos = [reg.resolve(POLICY_MODEL, r) for r in policy or [] if not Path(r).is_dir()]
        infos += policies_for_site(reg, policies_of) if policies_of else []
        for info in infos:
            label = f"{info.tags.get('name', 'policy')} (v{info.version})"
            policies[label] = load_policy_version(reg, info)
        # Folders run once each, labelled by name; folders of one name (every home's first
        # policy is dynaflip-policy-v1) by their full paths, so none replaces another.
        folders = list(dict.fromkeys(Path(r).resolve() for r in policy or [] if Path(r).is_dir()))
        names = [f.name for f in folders]
        for f in folders:
            unique = names.count(f.name) == 1 and f.name not in policies
            policies[f.name if unique else str(f)] = load_policy(f)
    if not policies:
        raise InputError(None, "--policies-of", repr(policies_of), "a site with policies")
    for name, pol in policies.items():
        fp = pol.spec["pin"].get("backbone_fingerprint")
        if pol.uses_image and fp != bundle.fingerprint:
            raise InputError(
                str(pol.path or name),
                "pin.backbone_fingerprint",
                f"{str(fp)[:19]}...",
                f"{bundle.fingerprint[:19]}... (the backbone of this run)",
            )
    n_cells = sum(len(encoders) if p.uses_image else 1 for p in policies.values()) * len(site)
    with tempfile.TemporaryDirectory() as tmp:
        video_dir = Path(tmp) / "videos" if videos else None
        with count_progress(
            "closed-loop episodes", n_cells * episodes, enabled=progress_enabled(as_json)
        ) as advance:
            report = closed_loop(
                request,
                bundle,
                policies,
                encoders,
                video_dir=video_dir,
                on_episode=lambda _label, _r: advance(),
            )
        data = report.to_dict()
        with reg.run(EXPERIMENT, "rollout", {"sites": ",".join(site)}) as run:
            run.log_params({k: v for k, v in data["request"].items() if k != "sites"})
            metrics = {}
            for c in report.cells:
                for task, row in c.table.items():
                    metrics[metric_key("success", c.site, c.encoder, c.policy, task)] = row["rate"]
            for s, table in report.expert.items():
                metrics[metric_key("success", s, "expert", "all")] = table["all"]["rate"]
            metrics["episodes_per_minute"] = report.episodes_per_minute
            run.log_metrics(0, metrics)
            run.log_dict(data, "rollout.json")
            if video_dir is not None and video_dir.exists():
                run.log_artifacts(video_dir, "videos")
            data["mlflow_run_id"] = run.run_id
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    if as_json:
        print_json(data)
        return
    print_rollout(report)


def _rate(row: dict[str, Any]) -> str:
    lo, hi = row["ci95"]
    return f"{row['successes']}/{row['episodes']} [{100 * lo:.0f}-{100 * hi:.0f}%]"


def print_rollout(report: Any) -> None:
    """The success table: one row per cell, one column per task (successes / episodes and the
    95% Wilson interval)."""
    cells = report.cells
    tasks = sorted({t for c in cells for t in c.table if t != "all"})
    table = Table(
        title=f"closed loop: success over {report.request.episodes} paired episodes "
        f"(seed {report.request.seed}), 95% Wilson intervals"
    )
    for col in ("site", "encoder", "policy", *tasks, "all"):
        table.add_column(col, no_wrap=col in ("site", "encoder"))
    for s, t in report.expert.items():
        table.add_row(
            s, "-", "scripted expert", *[_rate(t[k]) for k in tasks if k in t], _rate(t["all"])
        )
    for c in cells:
        table.add_row(
            c.site, c.encoder, c.policy, *[_rate(c.table[t]) for t in tasks], _rate(c.table["all"])
        )
    con = console()
    con.print(table)
    con.print(
        f"{sum(len(c.episodes) for c in cells)} policy episodes in {report.seconds:.0f} s "
        f"({report.episodes_per_minute:.0f} per minute)",
        highlight=False,
    )


@app.command("benchmark")
def benchmark_cmd(
    ctx: typer.Context,
    preset: Annotated[
        list[str] | None,
        typer.Option("--preset", "-p", help="Shifted site preset (repeatable; default: all)."),
    ] = None,
    seed: Annotated[
        list[int] | None, typer.Option("--seed", "-s", help="Seed (repeatable; default 0 1 2).")
    ] = None,
    ablation: Annotated[
        list[str] | None,
        typer.Option("--ablation", help="Ablation (repeatable; default: all; see --list)."),
    ] = None,
    head: Annotated[
        list[str] | None,
        typer.Option(
            "--head",
            help=f"Policy heads (default {', '.join(BENCHMARK_DEFAULTS.heads)}).",
        ),
    ] = None,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Finetune recipe the ablations start from.")
    ] = "finetune/default",
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Recipe override KEY=VALUE (repeatable).")
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Finetune steps per run.")
    ] = BENCHMARK_DEFAULTS.steps,
    episodes: Annotated[
        int,
        typer.Option("--episodes", min=1, help="Train episodes per site (policies, adapters)."),
    ] = BENCHMARK_DEFAULTS.train_episodes,
    test_episodes: Annotated[
        int, typer.Option("--test-episodes", min=1, help="Held-out episodes per site.")
    ] = BENCHMARK_DEFAULTS.test_episodes,
    language: Annotated[
        bool,
        typer.Option(
            "--language/--no-language",
            help="Condition the policies on the instruction (the tasks mix objects and goals: "
            "without it a single frame cannot say which object to move).",
        ),
    ] = BENCHMARK_DEFAULTS.language,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="The policies' declared tolerance (audit).")
    ] = BENCHMARK_DEFAULTS.tolerance,
    frames: Annotated[
        int, typer.Option("--frames", min=10, help="The most frames per episode.")
    ] = BENCHMARK_DEFAULTS.frames,
    size: Annotated[
        int, typer.Option("--size", min=16, max=640, help="Rendered image size (pixels).")
    ] = BENCHMARK_DEFAULTS.size,
    policy_steps: Annotated[
        int | None,
        typer.Option(
            "--policy-steps", min=1, help="Optimizer steps per policy head (default: each head's)."
        ),
    ] = None,
    closed_loop: Annotated[
        int,
        typer.Option(
            "--closed-loop",
            min=0,
            help="Closed-loop episodes per site and head in every run (success rates beside the "
            "offline error; 0: offline only).",
        ),
    ] = BENCHMARK_DEFAULTS.closed_loop,
    backbone: Annotated[
        str | None, typer.Option("--backbone", "-b", help="Backbone (default: base).")
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Logs and runs (reused across invocations)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write results JSON (+ PNG beside it) here.")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", help="List the ablations and exit.")] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    ablation_short: Annotated[list[str] | None, typer.Option("-a", hidden=True)] = None,
) -> None:
    """The OOD benchmark: presets x seeds x ablations on simulator logs, mean ± sd.

    Per seed, policies (bc, diffusion, image-only; controls: proprio-only, and a CNN trained
    from scratch on the frames) are trained on base-site logs, stopped on held-out episodes;
    per preset (any site: presets, random-N, SITE-camera-CAMERA), adapters are trained on the
    shifted site's logs with each ablation; every encoder is scored on held-out shifted and base
    episodes (offline error, paired drift), in closed loop on the same scenes (success rates),
    and audited. Goal: >= 22.5% lower shifted-site error (and higher success) for the
    image-reading heads, the base site kept, audit passed. Results go to MLflow (experiment
    dynaflip-eval) with a PNG. Exit code 0 whether or not the goal is met (the table says).
    """
    from dynaflip_adapt.eval.ablations import ABLATIONS
    from dynaflip_adapt.outputs import check_output_file

    # `-a` is --adapter everywhere else; the old short spelling of --ablation still works.
    ablation = [*(ablation or []), *(ablation_short or [])] or None
    if out is not None:
        check_output_file(out, overwrite=overwrite)
    if list_:
        if as_json:
            print_json({k: v.description for k, v in ABLATIONS.items()})
        else:
            for k, v in ABLATIONS.items():
                console().print(f"{k:15s} {v.description}", highlight=False)
        return
    from dynaflip_adapt.config import FinetuneRecipe, load_recipe
    from dynaflip_adapt.eval.ablations import BenchmarkConfig
    from dynaflip_adapt.eval.summary import plot
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.sim.sites import PRESETS
    from dynaflip_adapt.workflows.benchmark import run_benchmark

    if closed_loop:
        require_mujoco()

    reg = registry(ctx)
    rec, rec_path = load_recipe(recipe, overrides or [], kind="finetune")
    assert isinstance(rec, FinetuneRecipe)
    cfg = BenchmarkConfig(
        presets=list(preset or [p for p in PRESETS if p != "base"]),
        seeds=list(seed if seed is not None else [0, 1, 2]),
        ablations=list(ablation or list(ABLATIONS)),
        train_episodes=episodes,
        test_episodes=test_episodes,
        steps=steps,
        tolerance=tolerance,
        frames=frames,
        size=size,
        policy_steps=policy_steps,
        language=language,
        closed_loop=closed_loop,
    )
    if head:
        cfg.heads = list(head)
    cfg.validate()
    bundle, _ = load_backbone(reg, backbone)
    work = workdir or Path(reg.store.home) / "eval-benchmark"
    log = err_console()
    with reg.run(EXPERIMENT, "ood benchmark", {"kind": "benchmark"}) as run:
        run.log_params(
            {
                "presets": ",".join(cfg.presets),
                "seeds": ",".join(map(str, cfg.seeds)),
                "ablations": ",".join(cfg.ablations),
                "steps": cfg.steps,
                "recipe": str(rec_path),
                "backbone": bundle.fingerprint,
            }
        )

        def on_step(name: str, step: int, total: int) -> None:
            # A plain line every 25% of each finetune (these runs take minutes each).
            if step % max(1, total // 4) == 0:
                log.print(f"  {name}: finetune step {step}/{total}", highlight=False)

        result = run_benchmark(
            bundle,
            rec,
            cfg,
            work,
            on_event=None if as_json else (lambda m: log.print(f"  {m}", highlight=False)),
            on_step=None if as_json else on_step,
        )
        metrics: dict[str, float] = {}
        for ab, s in result["summary"].items():
            metrics[f"{ab}.image_heads_reduction"] = s["image_heads_reduction"]
            metrics[f"{ab}.image_heads_base_change"] = s["image_heads_base_change"]
            metrics[f"{ab}.paired_drift"] = s["paired_drift"]["mean"]
            metrics[f"{ab}.audit_passed_fraction"] = s["audit_passed"] / max(s["audit_runs"], 1)
            metrics[f"{ab}.audit_compatible_fraction"] = s["audit_compatible"] / max(
                s["audit_runs"], 1
            )
            for h, hs in s.get("closed_loop", {}).get("heads", {}).items():
                metrics[f"{ab}.{h}.shifted_success"] = hs["shifted_success"]["mean"]
                metrics[f"{ab}.{h}.base_success"] = hs["base_success"]["mean"]
        run.log_metrics(0, {k: v for k, v in metrics.items() if v == v})
        with tempfile.TemporaryDirectory() as tmp:
            dest = Path(out) if out else Path(tmp) / "ood_benchmark.json"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(json.dumps(result, indent=1, default=str))
            png = plot(result, dest.with_suffix(".png"))
            folder = Path(tmp) / "artifacts"
            folder.mkdir()
            (folder / dest.name).write_text(dest.read_text())
            if png is not None:
                (folder / png.name).write_bytes(png.read_bytes())
            run.log_artifacts(folder, "benchmark")
        result["mlflow_run_id"] = run.run_id
    if as_json:
        print_json(result)
        return
    print_summary(result)
    if png is None:
        log.print("(no PNG: install matplotlib, e.g. pip install 'dynaflip-adapt[plots]')")


def _audit_cell(s: dict[str, Any]) -> str:
    """'3/3' or '3/3 (2 with warnings)': runs whose audit would let promotion through."""
    cell = f"{s['audit_passed']}/{s['audit_runs']}"
    return cell + (f" ({s['audit_warning']} with warnings)" if s["audit_warning"] else "")


def print_summary(result: dict[str, Any]) -> None:
    """The ablation table: one row per ablation and head (shifted-site MSE, its reduction vs no
    adaptation, base-site MSE and its change), with drift and audit per ablation."""
    c = console()
    cfg = result["config"]
    heads = cfg["heads"]
    n = len(cfg["presets"]) * len(cfg["seeds"])
    table = Table(
        title=f"OOD benchmark: {', '.join(cfg['presets'])} x seeds {cfg['seeds']} (n = {n}); "
        "action MSE in action-std units, mean ± sd over runs"
    )
    for col in ("ablation", "head", "shifted MSE", "reduction", "base MSE", "base change",
                "drift", "audit passed"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("ablation", "head") else "right")
    for ab, s in result["summary"].items():
        for i, h in enumerate(heads):
            hs = s["heads"][h]
            table.add_row(
                ab if i == 0 else "",
                h,
                _fmt(hs["shifted_mse"]),
                _fmt(hs["reduction"], True),
                _fmt(hs["base_mse"]),
                _fmt(hs["base_change"], True),
                f"{s['paired_drift']['mean']:.3g}" if i == 0 else "",
                _audit_cell(s) if i == 0 else "",
                end_section=i == len(heads) - 1,
            )
    c.print(table)
    for ab, s in result["summary"].items():
        ok = "[green]goal met[/]" if s["goal_met"] else "goal not met"
        st = s.get("strength", {})
        fitted = st.get("n") and (st["mean"] not in (0.0, 1.0) or st["sd"] > 0)
        c.print(
            f"{ab}: image heads reduction {100 * s['image_heads_reduction']:+.3g}%, base change "
            f"{100 * s['image_heads_base_change']:+.3g}%, audit passed {_audit_cell(s)}"
            + (f", strength {st['mean']:.2f} ± {st['sd']:.2f}" if fitted else "")
            + f": {ok}",
            highlight=False,
        )
    if "proprio_only" in heads:
        none = result["summary"].get("none", {})
        beat = none.get("image_heads_beating_proprio_only", [])
        c.print(
            "control: image heads that beat the proprio-only head at the shifted site without "
            f"adaptation: {', '.join(beat) or 'none'}",
            highlight=False,
        )
    c.print(
        "goal: >= 22.5% lower shifted-site error for the image-reading heads, base-site error "
        "within +3%, audit passed in every run (compatible, or compatible with warnings: what "
        "promotion accepts)",
        highlight=False,
    )
    if any("closed_loop" in s for s in result["summary"].values()):
        print_success_summary(result)


def print_success_summary(result: dict[str, Any]) -> None:
    """Closed-loop success per ablation and head, beside the offline table."""
    c = console()
    cfg = result["config"]
    table = Table(
        title=f"closed loop: success rate over {cfg['closed_loop']} episodes per site and run, "
        "mean ± sd over runs (expert: the ceiling)"
    )
    for col in ("ablation", "head", "shifted site", "gain", "base site"):
        table.add_column(col, justify="left" if col in ("ablation", "head") else "right")
    for ab, s in result["summary"].items():
        loop = s.get("closed_loop")
        if not loop:
            continue
        rows = list(loop["heads"].items())
        for i, (h, hs) in enumerate(rows):
            table.add_row(
                ab if i == 0 else "",
                h,
                _mean_rate(hs["shifted_success"]),
                f"{100 * hs['success_gain']['mean']:+.0f} pts",
                _mean_rate(hs["base_success"]),
            )
        e = loop["expert"]
        table.add_row("", "expert", _mean_rate(e["shifted_success"]), "",
                      _mean_rate(e["base_success"]), end_section=True)  # fmt: skip
    c.print(table)
    for ab, s in result["summary"].items():
        loop = s.get("closed_loop")
        if loop and ab != "none":
            ok = "[green]goal met[/]" if loop["goal_met"] else "goal not met"
            gain = 100 * loop["image_heads_relative_gain"]
            kept = "yes" if loop["image_heads_base_kept"] else "no"
            c.print(
                f"{ab}: image heads' shifted-site success {gain:+.3g}% relative, base site "
                f"kept: {kept}: {ok}",
                highlight=False,
            )
