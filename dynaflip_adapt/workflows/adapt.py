"""Adapting the backbone to a site: the job behind ``dynaflip-adapt finetune``.

`adapt_site` takes an `AdaptRequest` and returns an `AdaptResult` (or a `DryRunResult`): it
validates the recipe candidates (the recipe, then each ``fallback``) and the logs before touching
the registry, trains a LoRA adapter in an MLflow run, audits it against the site's pinned
policies when a fallback or ``strength="auto"`` asks for it, scales it, and registers it with its
lineage. The CLI parses options into the request and renders the result; scripts call it the
same way::

    from dynaflip_adapt import AdaptRequest, adapt_site

    result = adapt_site(AdaptRequest(logs=("site_logs.h5",), site="night_shift"))
    print(result.adapter.version, result.geometry["replay_cka"])
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dynaflip_adapt.config import FinetuneRecipe
    from dynaflip_adapt.data.logs import LogSet
    from dynaflip_adapt.eval.audit import AuditedPolicy
    from dynaflip_adapt.eval.strength import StrengthFit, Trial
    from dynaflip_adapt.models.backbone import Bundle
    from dynaflip_adapt.registry.client import Registry, RunHandle, VersionInfo
    from dynaflip_adapt.train.finetune import FinetuneResult

OnStep = Callable[[int, dict[str, float]], None]
# monitor(title, total, run, log_every, keys) -> a context manager yielding on_step(step, metrics)
Monitor = Callable[
    [str, int, "RunHandle", int, tuple[str, ...]], contextlib.AbstractContextManager[OnStep]
]
# notify(level, message): "warning" for what the user should act on, "info" for what happened.
Notify = Callable[[Literal["warning", "info"], str], None]

# Frames taken from the `retain` logs by default (finetune --retain-frames, the benchmark).
RETAIN_FRAMES = 512

# Losses shown live while an adapter trains (the rest are logged to MLflow).
LIVE_KEYS = ("loss", "area", "distill_replay", "invariance", "replay_area")


@dataclass(frozen=True)
class AdaptRequest:
    """What to adapt, and how.

    Attributes:
        logs: HDF5 files or folders of them (the site's logs).
        site: Site name (default: the logs' ``site`` attribute, else the first file's name).
        recipe: Finetune recipe name or YAML path.
        overrides: Dotted recipe overrides ``KEY=VALUE``, applied to every candidate.
        backbone: Backbone version, alias or folder (default: the registry's base).
        parent: Continue from this adapter (version, alias or folder).
        steps: Optimizer steps (a recipe override of ``optim.max_steps``).
        seed: A recipe override of ``run.seed``.
        device: A recipe override of ``run.device`` (auto, cpu, cuda, mps).
        precision: A recipe override of ``run.precision`` (auto, fp32, bf16).
        workdir: Checkpoints and the trained adapter (default: under the store's
            ``runs/finetune``, keyed by logs, recipe, backbone, parent, steps and retained logs).
        resume: Continue a killed run from its checkpoint; when its training had finished (the
            job died auditing, scaling or registering), the adapter it trained is reused.
        dry_run: Validate logs, recipe, backbone and one forward pass; train nothing.
        layout, camera, orientation, depth_scale, language: How to read the logs (None: the
            recipe's, else detected).
        retain: Logs whose encoding must not change: their frames join the teacher's pool.
        retain_frames: Frames taken from the ``retain`` logs.
        fallback: Recipes tried in order when the adapter fails the audit of the site's pinned
            policies at full strength; the first that passes, or else the last, is registered.
        strength: Share of the adapter's update applied, ``"0"``..``"1"``, or ``"auto"`` (the
            largest share the site's pinned policies pass the audit with).
        budget: With ``strength="auto"``: the share of each policy's tolerance its action
            deviation may use.
    """

    logs: tuple[Path, ...]
    site: str | None = None
    recipe: str = "finetune/default"
    overrides: tuple[str, ...] = ()
    backbone: str | None = None
    parent: str | None = None
    steps: int | None = None
    seed: int | None = None
    device: str | None = None
    precision: str | None = None
    workdir: Path | None = None
    resume: bool = False
    dry_run: bool = False
    layout: str | None = None
    camera: str | None = None
    orientation: str | None = None
    depth_scale: float | None = None
    language: str | None = None
    retain: tuple[Path, ...] = ()
    retain_frames: int = RETAIN_FRAMES
    fallback: tuple[str, ...] = ()
    strength: str = "1"
    budget: float = 1.0

    def __post_init__(self) -> None:
        # Accept any sequence of str / Path from Python callers.
        object.__setattr__(self, "logs", tuple(Path(p) for p in self.logs))
        object.__setattr__(self, "retain", tuple(Path(p) for p in self.retain))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "fallback", tuple(self.fallback))
        object.__setattr__(self, "strength", str(self.strength))


@dataclass
class AdaptResult:
    """A registered adapter and how it was trained."""

    adapter: VersionInfo
    site: str
    folder: Path  # the local adapter folder that was registered (scaled when strength < 1)
    steps: int
    seconds: float
    frames_per_second: float
    final: dict[str, float]
    geometry: dict[str, float]
    anchors: dict[str, bool]
    strength: float
    strength_fit: StrengthFit | None
    recipe: Path
    fallback_rejected: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter.to_dict(),
            "site": self.site,
            "folder": str(self.folder),
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "frames_per_second": round(self.frames_per_second, 1),
            "final": self.final,
            "geometry": self.geometry,
            "anchors": self.anchors,
            "strength": self.strength,
            "strength_fit": self.strength_fit.to_dict() if self.strength_fit else None,
            "recipe": str(self.recipe),
            "fallback_rejected": self.fallback_rejected,
            "warnings": self.warnings,
        }


@dataclass
class DryRunResult:
    """What a dry run checked: nothing was trained or registered."""

    site: str
    anchors: dict[str, bool]
    warnings: list[str]
    initial: dict[str, float]
    backbone: str
    episodes: int
    workdir: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "site": self.site,
            "anchors": self.anchors,
            "warnings": self.warnings,
            "initial": self.initial,
            "backbone": self.backbone,
            "episodes": self.episodes,
            "workdir": str(self.workdir),
        }


def site_of(logs: tuple[Path, ...]) -> str:
    """The logs' ``site`` attribute (first file), else the first file's name."""
    import h5py

    from dynaflip_adapt.data.logs import expand_paths

    first = expand_paths(list(logs))[0]
    with h5py.File(first, "r") as f:
        site = f.attrs.get("site")
    if isinstance(site, bytes):
        site = site.decode()
    return str(site) if site else first.stem


@contextlib.contextmanager
def mlflow_steps(
    title: str, total: int, run: RunHandle, log_every: int, keys: tuple[str, ...]
) -> Iterator[OnStep]:
    """The default monitor: metrics to the MLflow run every `log_every` steps and at the last."""
    del title, keys

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if step % log_every == 0 or step == total:
            run.log_metrics(step, metrics)

    yield on_step


def _ignore(_level: Literal["warning", "info"], _message: str) -> None:
    return None


def adapt_site(
    request: AdaptRequest,
    *,
    tracking_uri: str | None = None,
    monitor: Monitor = mlflow_steps,
    notify: Notify = _ignore,
) -> AdaptResult | DryRunResult | None:
    """Trains, audits, scales and registers an adapter for a site (see the module docstring).

    Args:
        request: What to adapt.
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else the embedded
            sqlite store under ``$DYNAFLIP_HOME``).
        monitor: Wraps each training run; yields the per-step callback (progress, metrics).
        notify: Receives warnings and notices as they happen (the training's warnings are
            also kept in the result's ``warnings``).

    Returns:
        The registered adapter's result, a `DryRunResult` with ``request.dry_run``, or None on
        a non-main process under torchrun (rank 0 registers).

    Raises:
        InputError: Bad logs, recipe, backbone, parent or option (before anything is written).
    """
    from dynaflip_adapt.config import (
        FinetuneRecipe,
        device_overrides,
        load_recipe,
        recipe_hash,
        recipe_params,
        recipe_to_dict,
    )
    from dynaflip_adapt.data.fingerprint import logs_fingerprint
    from dynaflip_adapt.data.logs import open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.eval.strength import audit_at, parse_strength
    from dynaflip_adapt.models.adapter import load_adapter, read_adapter_manifest
    from dynaflip_adapt.registry.adapters import (
        FINETUNE_EXPERIMENT,
        register_adapter,
        registered_copy,
        resolve_adapter,
    )
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store
    from dynaflip_adapt.train.distributed import init_from_env
    from dynaflip_adapt.train.finetune import finetune as run_finetune
    from dynaflip_adapt.train.finetune import retention_frames

    req = request
    fixed = parse_strength(req.strength)  # bad input fails before any training
    overrides = list(req.overrides)
    if req.seed is not None:
        overrides.append(f"run.seed={req.seed}")
    overrides += device_overrides(req.device, req.precision)
    if req.steps is not None:
        # A recipe override, so the recipe logged with the run is the run that happened.
        overrides.append(f"optim.max_steps={req.steps}")
    # The recipe, then the fallback recipes: all validated before any training.
    candidates: list[tuple[FinetuneRecipe, Path]] = []
    for name in [req.recipe, *req.fallback]:
        loaded, loaded_path = load_recipe(name, overrides, kind="finetune")
        assert isinstance(loaded, FinetuneRecipe)
        candidates.append((loaded, loaded_path))
    # Only the last candidate is ever scaled.
    rec, rec_path = candidates[-1]
    if fixed != 1.0 and rec.lora.use_dora:
        raise InputError(
            rec_path,
            "lora.use_dora",
            f"true with --strength {req.strength}",
            "a LoRA adapter (DoRA renormalizes: its update cannot be scaled)",
        )
    settings = {
        "layout": req.layout,
        "camera": req.camera,
        "orientation": req.orientation,
        "depth_scale": req.depth_scale,
        "language": req.language,
    }
    logs = list(req.logs)
    # Bad logs fail here, before the registry is touched.
    logsets = [open_logs(logs, r.data.source_settings(**settings)) for r, _ in candidates]
    site = req.site or site_of(req.logs)
    store = resolve_store(tracking_uri)
    # Under torchrun: rank 0 loads (and may bootstrap) the base backbone first; only rank 0
    # logs to MLflow and registers the adapter.
    dist = init_from_env()
    if len(candidates) > 1 and dist.world > 1:
        raise InputError(
            None, "--fallback", f"with {dist.world} processes", "a single process (no torchrun)"
        )
    if not dist.is_main:
        dist.barrier()
    registry = Registry(store)
    bundle, base_info = load_backbone(registry, req.backbone)
    if dist.is_main:
        dist.barrier()
    parent_dir, parent_info = resolve_adapter(registry, req.parent) if req.parent else (None, None)
    if dist.is_main and not any(r.loss.distill_tokens for r, _ in candidates):
        readers = token_readers(registry, site)
        if readers:
            notify(
                "warning",
                f"policies pinned to site {site} read the patch-token map ({', '.join(readers)}) "
                "but the recipe's teacher holds the CLS feature only; --set "
                "loss.distill_tokens=true holds the tokens too (3x less action deviation for "
                "such policies, docs/results/2026-12-02-shifted-sites.md)",
            )
    fingerprint = logs_fingerprint(logs)
    held = None
    retained: dict[str, Any] = {}
    retain_logs = None
    if req.retain:
        retain_logs = open_logs(list(req.retain), candidates[0][0].data.source_settings())
        held = retention_frames(retain_logs, bundle.model.cfg.image_size, req.retain_frames)
        retained = {
            "retain_logs": [str(p.resolve()) for p in req.retain],
            "retain_fingerprint": logs_fingerprint(list(req.retain)),
            "retain_frames": len(held),
        }
    extra, held_policies = None, list[str]()
    if any(r.loss.policies > 0 for r, _ in candidates):
        from dynaflip_adapt.registry.lifecycle import audited_policies

        sources = [("site", logsets[0])] + ([("retained", retain_logs)] if retain_logs else [])
        # Every process holds the same policies; rank 0 downloads them first.
        if not dist.is_main:
            dist.barrier()
        extra, held_policies = policy_objective(
            bundle, audited_policies(registry, bundle, site), sources, notify
        )
        if dist.is_main:
            dist.barrier()
    rejected: list[dict[str, Any]] = []
    policies: list[AuditedPolicy] | None = None
    for i, (rec, rec_path) in enumerate(candidates):
        last = i == len(candidates) - 1
        logset = logsets[i]
        # The work folder's key (unchanged since the first release, so --resume finds it).
        key_parts = [
            fingerprint, recipe_hash(rec), bundle.fingerprint, str(parent_dir), str(req.steps)
        ]  # fmt: skip
        if retained:
            key_parts += [retained["retain_fingerprint"], str(retained["retain_frames"])]
        if held_policies and rec.loss.policies > 0:
            key_parts += held_policies
        key = hashlib.sha256("|".join(key_parts).encode()).hexdigest()[:12]
        if req.workdir is not None:
            work = req.workdir / f"fallback-{i}" if i else req.workdir
        else:
            work = store.home / "runs" / "finetune" / f"{site}-{key}"
        total = rec.optim.max_steps
        lineage = {
            "base_version": base_info.version if base_info else None,
            "data_fingerprint": fingerprint,
            "parent_version": parent_info.version if parent_info else None,
            "parent_fingerprint": None,
            "logs": [str(p.resolve()) for p in logs],
            **retained,
            # The pinned policies loss.policies held the adapter to.
            **({"policies_held": held_policies} if held_policies and rec.loss.policies > 0 else {}),
            # Recipes whose adapters failed the audit before this one (fallback).
            **({"fallback_rejected": list(rejected)} if rejected else {}),
        }
        if req.dry_run:
            res = run_finetune(
                bundle, logset, rec, work, site=site, parent=parent_dir, dry_run=True,
                max_steps=total, retain=held, extra=extra,
            )  # fmt: skip
            return DryRunResult(
                site=site,
                anchors=res.anchors,
                warnings=res.warnings,
                initial=res.final,
                backbone=bundle.fingerprint,
                episodes=len(logset.episodes),
                workdir=work,
            )
        if not dist.is_main:
            run_finetune(
                bundle, logset, rec, work, site=site, parent=parent_dir, resume=req.resume,
                max_steps=total, lineage=lineage, retain=held, extra=extra,
            )  # fmt: skip
            return None
        tags = {
            "site": site,
            "recipe": str(rec_path),
            "data_fingerprint": fingerprint,
            "base_fingerprint": bundle.fingerprint,
            "workdir": str(work),
        }
        # A run on this work folder whose process died (SIGKILL, power loss) is still RUNNING.
        for run_id in registry.reap_dead_runs(FINETUNE_EXPERIMENT, {"workdir": str(work)}):
            notify("info", f"marked run {run_id} KILLED (its process is gone)")
        with registry.run(FINETUNE_EXPERIMENT, f"finetune-{site}", tags) as run:
            run.log_params(
                {
                    **recipe_params(rec),
                    "recipe_hash": recipe_hash(rec),
                    "max_steps": total,
                    "site": site,
                    "workdir": str(work),
                    "world_size": dist.world,
                }
            )
            run.log_dict(recipe_to_dict(rec), "recipe.resolved.json")
            expected = {
                "recipe_hash": recipe_hash(rec),
                "steps": total,
                "base_fingerprint": bundle.fingerprint,
                "parent": str(parent_dir) if parent_dir else None,
                "data_fingerprint": fingerprint,
                "retain_fingerprint": retained.get("retain_fingerprint"),
                "retain_frames": retained.get("retain_frames"),
                "policies_held": lineage.get("policies_held"),
            }
            done = finished_adapter(work, expected) if req.resume else None
            if done is not None:
                notify("info", f"{work / 'adapter'}: training had finished; reusing its adapter")
                run.set_tags({"reused_adapter": str(work / "adapter")})
                res = done
            else:
                with monitor(
                    f"finetune {site}", total, run, rec.run.log_every, LIVE_KEYS
                ) as on_step:
                    res = run_finetune(
                        bundle, logset, rec, work, site=site, parent=parent_dir,
                        # A fallback resumes only where the killed run had got to.
                        resume=req.resume and (i == 0 or has_checkpoint(work)),
                        max_steps=total, lineage=lineage, on_step=on_step, retain=held,
                        extra=extra,
                    )  # fmt: skip
            for w in res.warnings:
                notify("warning", w)
            assert res.adapter is not None
            if policies is None and (not last or fixed is None):
                policies = _pinned(registry, bundle, site, last, fixed, notify)
            trial = None
            if not last and policies:
                adapter = load_adapter(bundle, res.adapter)
                trial = audit_at(bundle, adapter, policies, budget=req.budget)
                if not trial.passed:
                    reason = "; ".join(trial.failed)
                    run.set_tags({"fallback_rejected": reason[:4000]})
                    rejected.append({"recipe": str(rec_path), "failed": trial.failed})
                    notify(
                        "info",
                        f"recipe {rec_path.stem}: the audit fails at full strength ({reason}); "
                        f"training fallback {candidates[i + 1][1].stem}",
                    )
                    continue
            fit, chosen, folder = apply_strength(
                bundle, res.adapter, fixed, req.budget, policies or [], first=trial, notify=notify,
                parent=parent_dir,
            )  # fmt: skip
            if fit is not None:
                run.log_dict(fit.to_dict(), "strength_fit.json")
            if parent_dir is not None and chosen != 1.0:
                notify("info", f"strength {chosen:g} runs from the parent (0) to this link (1)")
            if chosen != 1.0:
                run.log_params({"strength": chosen, "strength_budget": req.budget})
                res.geometry = read_adapter_manifest(folder)["geometry"]
            if rejected:
                run.log_dict({"rejected": rejected}, "fallback_rejected.json")
            run.log_metrics(total, {f"geometry.{k}": v for k, v in res.geometry.items()})
            # A resumed job whose training had finished may have registered this folder already.
            info = registered_copy(registry, folder) if done is not None else None
            if info is not None:
                notify("info", f"{folder}: already registered as version {info.version}")
                run.set_tags({"reused_version": info.version})
            else:
                info = register_adapter(registry, run, folder, parent=parent_info)
            run.set_tags({"adapter_version": info.version})
        return AdaptResult(
            adapter=info,
            site=site,
            folder=folder,
            steps=res.steps,
            seconds=res.seconds,
            frames_per_second=res.frames_per_second,
            final=res.final,
            geometry=res.geometry,
            anchors=res.anchors,
            strength=chosen,
            strength_fit=fit,
            recipe=rec_path,
            fallback_rejected=rejected,
            warnings=res.warnings,
        )
    raise AssertionError("unreachable: the last candidate always returns")


def token_readers(registry: Registry, site: str) -> list[str]:
    """Names of the active policies pinned to `site` whose head reads the patch-token map."""
    from dynaflip_adapt.policies import HEAD_KINDS
    from dynaflip_adapt.registry.lifecycle import policies_for_site

    names = []
    for v in policies_for_site(registry, site):
        kind = HEAD_KINDS.get(v.tags.get("head", ""))
        if kind is not None and kind.reads == "tokens":
            names.append(f"{v.tags.get('name', 'policy')} (v{v.version})")
    return names


def policy_objective(
    bundle: Bundle,
    policies: list[AuditedPolicy],
    sources: list[tuple[str, LogSet]],
    notify: Notify = _ignore,
) -> tuple[Any, list[str]]:
    """``loss.policies``' objective: the `policies` pinned to the site that read the backbone it
    was trained on, and the demonstrations of `sources` ("site" logs, "retained" logs) they
    can read (logs without actions, or whose proprio the policies do not take, are left out
    with a note). Returns (`PolicyObjective` or None, what it holds, for the lineage)."""
    from dataclasses import replace

    import numpy as np

    from dynaflip_adapt.data.logs import EpisodeReader, LogSet
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.policies import HEAD_KINDS, collect, instruction_embedder
    from dynaflip_adapt.policies.adaptation import (
        MAX_DEMO_FRAMES,
        Demonstrations,
        PolicyObjective,
    )

    usable = []
    for name, pol, pinned in policies:
        if pinned is not None:
            notify("info", f"loss.policies: {name} reads an adapter's features; not held")
            continue
        usable.append((name, pol))
    if not usable:
        return None, []
    dims = {int(pol.spec["proprio_dim"]) for _, pol in usable}
    language = any(pol.uses_language for _, pol in usable)
    state = any(
        HEAD_KINDS[h].needs_state for _, pol in usable if (h := pol.spec.get("head")) in HEAD_KINDS
    )
    size = bundle.model.cfg.image_size
    demos = []
    for source, logs in sources:
        episodes = [ep for ep in logs.episodes if "actions" in ep.paths]
        if not episodes:
            notify("info", f"loss.policies: the {source} logs carry no actions; not used")
            continue
        # Whole, evenly spaced episodes up to about MAX_DEMO_FRAMES frames: never frames
        # thinned within an episode (a diffusion head's action chunks need them consecutive).
        keep = max(1, len(episodes) * MAX_DEMO_FRAMES // max(logs.num_frames, 1))
        picks = np.linspace(0, len(episodes) - 1, min(keep, len(episodes))).round()
        chosen = {id(episodes[int(k)]) for k in picks}
        subset = LogSet(
            [replace(f, episodes=[e for e in f.episodes if id(e) in chosen]) for f in logs.files]
        )
        embed = instruction_embedder(bundle) if language else None
        try:
            try:
                data = collect(subset, EpisodeReader(), size, None, embed, state, state)
            except InputError:
                if not state:
                    raise
                # No object state in these logs: the object heads are held to their actions.
                data = collect(subset, EpisodeReader(), size, None, embed)
        except InputError as exc:
            notify("info", f"loss.policies: the {source} logs are not used ({exc})")
            continue
        if dims != {int(data["proprio"].shape[1])}:
            notify(
                "info",
                f"loss.policies: the {source} logs' proprio has {data['proprio'].shape[1]} "
                f"dimensions, the policies take {sorted(dims)}; not used",
            )
            continue
        demos.append(Demonstrations.from_collected(source, data))
    if not demos:
        return None, []
    held = [f"{name} on {', '.join(d.name for d in demos)} demonstrations" for name, _ in usable]
    return PolicyObjective(usable, demos), held


def _pinned(
    registry: Registry, bundle: Bundle, site: str, last: bool, fixed: float | None, notify: Notify
) -> list[AuditedPolicy]:
    """The site's pinned policies the audits hold the adapter to (resolved once per job)."""
    from dynaflip_adapt.registry.lifecycle import audited_policies

    policies = audited_policies(registry, bundle, site)
    if not policies:
        unused = []
        if not last:
            unused.append("--fallback: the first recipe's adapter is kept")
        if fixed is None:
            unused.append("--strength auto: the adapter keeps its full strength")
        notify("warning", f"no policies pinned to site {site}; " + "; ".join(unused))
    return policies


def apply_strength(
    bundle: Bundle,
    folder: Path,
    fixed: float | None,
    budget: float,
    policies: list[AuditedPolicy],
    first: Trial | None = None,
    notify: Notify = _ignore,
    parent: Path | None = None,
) -> tuple[StrengthFit | None, float, Path]:
    """Scales the freshly trained adapter in `folder`: to `fixed`, or (None) to the largest
    strength `policies` pass the audit with (full strength when there are none; `first`: its
    audit at full strength, if already done); a link trained on from `parent` is scaled between
    the parent (0) and itself (1). A scaled adapter is written beside the trained one
    (``<folder>-scaled``), which stays as trained (a ``--resume`` reuses it). Returns (fit,
    strength, the folder to register)."""
    from dynaflip_adapt.eval.strength import fit_strength, save_scaled
    from dynaflip_adapt.models.adapter import load_adapter

    if fixed == 1.0 or (fixed is None and not policies):
        return None, 1.0, folder
    adapter = load_adapter(bundle, folder)
    start = None if parent is None else load_adapter(bundle, parent)
    fit = None
    if fixed is None:
        fit = fit_strength(bundle, adapter, policies, budget=budget, first=first, parent=start)
        chosen = fit.strength
        if chosen == 0.0:
            notify(
                "warning",
                "--strength auto: no strength above 0 passes the audit; the registered adapter "
                + ("is its parent's update" if parent else "leaves the encoder as it was"),
            )
    else:
        chosen = fixed
    if chosen == 1.0:
        return fit, chosen, folder
    scaled = folder.with_name(folder.name + "-scaled")
    return fit, chosen, save_scaled(bundle, adapter, chosen, scaled, fit=fit, parent=start)


def finished_adapter(work: Path, expected: dict[str, Any]) -> FinetuneResult | None:
    """The adapter a finished finetune left in ``work/adapter``, as its result, if its lineage
    holds every `expected` value (recipe hash, steps, backbone, parent, logs, retained logs) and
    it was not scaled; None otherwise (absent, incomplete, damaged or other training)."""
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.models.adapter import read_adapter_manifest
    from dynaflip_adapt.train.finetune import FinetuneResult

    folder = work / "adapter"
    if not (folder / "manifest.json").is_file():
        return None
    try:
        manifest = read_adapter_manifest(folder)
    except InputError:
        return None  # killed while writing, or edited since: train again
    lineage = manifest.get("lineage", {})
    if "strength" in lineage or any(lineage.get(k) != v for k, v in expected.items()):
        return None
    return FinetuneResult(
        adapter=folder,
        steps=int(lineage["steps"]),
        final={},
        seconds=0.0,
        frames_per_second=0.0,
        anchors=dict(manifest.get("anchors", {})),
        geometry=dict(manifest.get("geometry", {})),
    )


def has_checkpoint(work: Path) -> bool:
    """Whether a finetune work folder holds a checkpoint to resume from."""
    from dynaflip_adapt.train.common import CHECKPOINT, PREVIOUS

    return any((work / name).exists() for name in (CHECKPOINT, PREVIOUS))
