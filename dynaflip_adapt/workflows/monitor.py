"""Does a site's production encoder still fit its new logs? The job behind ``monitor``.

`monitor_site` scores new logs against the frames the site's production encoder is known to
fit (`dynaflip_adapt.eval.drift`): the production adapter (alias ``prod-<site>``) merged into
its backbone, or the base backbone for a site never adapted; the reference is ``reference`` logs
when given, else the logs the production adapter was trained on (its lineage), else its probe
frames. The verdict is ``adapt`` when the score exceeds the threshold, ``fits`` otherwise;
every run is logged to MLflow (experiment ``dynaflip-monitor``) so a site's drift reads as a
time series.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dynaflip_adapt.eval.drift import DriftScore
    from dynaflip_adapt.models.backbone import Preprocess
    from dynaflip_adapt.models.vit import VisionTransformer
    from dynaflip_adapt.registry.client import Registry

MONITOR_EXPERIMENT = "dynaflip-monitor"
# The reference size `recipes/monitor/default.yaml`'s threshold was calibrated with (base-site
# episodes). Smaller references make the score noisier: with 64 episodes, 2 of 20 same-site
# draws read `adapt` at the default threshold, against 0 of 20 with 300 (docs/design.md).
CALIBRATED_REFERENCE_EPISODES = 300


@dataclass(frozen=True)
class MonitorRequest:
    """What to score.

    Attributes:
        logs: The site's new logs (HDF5 files or folders).
        site: The site (its production adapter is ``prod-<site>``).
        reference: Logs the production encoder is known to fit (default: the production
            adapter's training logs, else its probe frames; required for a site never adapted).
        backbone: For a site never adapted: the backbone its policies read (default: base).
        recipe: Monitor recipe name or YAML path: the threshold (calibrated by default on the
            simulator) and the frames sampled.
        overrides: Dotted recipe overrides ``KEY=VALUE`` (``drift.threshold=0.05``).
        frames: Shortcut for ``drift.frames``: frames sampled from each side, over every
            episode.
        threshold: Shortcut for ``drift.threshold``: score above which the verdict is
            ``adapt``.
        layout, camera: How to read the logs (None: detected).
    """

    logs: tuple[Path, ...]
    site: str
    reference: tuple[Path, ...] = ()
    backbone: str | None = None
    recipe: str = "monitor/default"
    overrides: tuple[str, ...] = ()
    frames: int | None = None
    threshold: float | None = None
    layout: str | None = None
    camera: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logs", tuple(Path(p) for p in self.logs))
        object.__setattr__(self, "reference", tuple(Path(p) for p in self.reference))
        object.__setattr__(self, "overrides", tuple(self.overrides))


@dataclass
class MonitorResult:
    """The verdict and what it rests on: the token-map drift and, per pinned image policy, how
    far its actions moved (`actions`, MMD^2 in action-std units); `signals` names those above
    their thresholds."""

    site: str
    verdict: str  # "fits" or "adapt"
    threshold: float
    drift: DriftScore
    encoder: str
    reference: str
    mlflow_run: str | None = None
    notes: list[str] = field(default_factory=list)
    actions: dict[str, float] = field(default_factory=dict)
    action_threshold: float | None = None
    signals: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return self.verdict == "adapt"

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "verdict": self.verdict,
            "threshold": self.threshold,
            **self.drift.to_dict(),
            "encoder": self.encoder,
            "reference": self.reference,
            "actions": self.actions,
            "action_threshold": self.action_threshold,
            "signals": self.signals,
            "mlflow_run": self.mlflow_run,
            "notes": self.notes,
        }


def monitor_site(request: MonitorRequest, *, tracking_uri: str | None = None) -> MonitorResult:
    """Scores `request.logs` against the site's production encoder (see the module docstring).

    Raises:
        InputError: Bad logs or options, or no reference for a site never adapted.
    """
    import torch

    from dynaflip_adapt.config import MonitorRecipe, load_recipe, recipe_to_dict
    from dynaflip_adapt.data.fingerprint import logs_fingerprint
    from dynaflip_adapt.data.frames import sample_frames
    from dynaflip_adapt.data.logs import SourceSettings, open_logs
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.eval.drift import drift_score, token_maps
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL, open_adapter
    from dynaflip_adapt.registry.backbones import load_backbone
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.lifecycle import site_alias
    from dynaflip_adapt.registry.store import resolve_store

    req = request
    if req.frames is not None and req.frames < 8:
        raise InputError(None, "--frames", str(req.frames), ">= 8")
    if req.threshold is not None and not req.threshold > 0:
        raise InputError(None, "--threshold", str(req.threshold), "> 0")
    # The options are recipe overrides, so the recipe logged with the run is what ran.
    overrides = list(req.overrides)
    if req.frames is not None:
        overrides.append(f"drift.frames={req.frames}")
    if req.threshold is not None:
        overrides.append(f"drift.threshold={req.threshold}")
    recipe, recipe_path = load_recipe(req.recipe, overrides, kind="monitor")
    assert isinstance(recipe, MonitorRecipe)
    threshold, frames = recipe.drift.threshold, recipe.drift.frames
    alias = site_alias(req.site)
    settings = SourceSettings(layout=req.layout, camera=req.camera)
    new_logs = open_logs(list(req.logs), settings)  # bad logs fail before the registry
    ref_logs = open_logs(list(req.reference), settings) if req.reference else None
    registry = Registry(resolve_store(tracking_uri))
    prod = next((v for v in registry.versions(ADAPTER_MODEL) if alias in v.aliases), None)
    notes: list[str] = []
    adapter = None
    if prod is not None:
        bundle, adapter, _ = open_adapter(registry, prod.version)
        # merge_and_unload gives back the plain ViT: the patch-token map reads as on the base.
        encoder = cast("VisionTransformer", adapter.merged().eval())
        encoder_name = f"adapter v{prod.version} ({alias})"
        if req.backbone is not None:
            notes.append(f"--backbone ignored: {alias} is on its own backbone")
    else:
        if ref_logs is None:
            raise InputError(
                None,
                "--reference",
                f"none, and site {req.site!r} has no production adapter ({alias})",
                "--reference LOGS: logs the site's policies were trained on",
            )
        bundle, _ = load_backbone(registry, req.backbone)
        encoder = bundle.model.image.eval()
        encoder_name = f"backbone {bundle.fingerprint[:19]}"
    size = bundle.model.cfg.image_size
    reference_name = f"--reference ({len(req.reference)} path(s))"
    if ref_logs is None and adapter is not None:
        lineage_logs = [Path(p) for p in adapter.manifest.get("lineage", {}).get("logs", [])]
        if lineage_logs and all(p.exists() for p in lineage_logs):
            ref_logs = open_logs(lineage_logs, settings)
            reference_name = f"the production adapter's training logs ({len(lineage_logs)})"
        else:
            notes.append("the production adapter's training logs are gone: its probe frames")
    if ref_logs is not None:
        ref = sample_frames(ref_logs, size, frames)
        ref_frames, ref_episodes = ref.frames, ref.episodes
    else:
        assert adapter is not None
        ref_frames = adapter.probe["site_rgb0"]
        ref_episodes = torch.arange(len(ref_frames))  # unknown: each frame its own
        reference_name = f"the production adapter's probe frames ({len(ref_frames)})"
    if len(ref_frames) < 8:
        raise InputError(None, "--reference", f"{len(ref_frames)} frames", ">= 8 frames")
    new = sample_frames(new_logs, size, frames)
    if len(new.frames) < 8:
        raise InputError(str(req.logs[0]), None, f"{len(new.frames)} frames", ">= 8 frames")
    pre = bundle.model.preprocess
    score = drift_score(token_maps(encoder, pre, ref_frames), ref_episodes,
                        token_maps(encoder, pre, new.frames))  # fmt: skip
    signals = ["tokens"] if score.score > threshold else []
    actions: dict[str, float] = {}
    action_threshold = recipe.actions.threshold if recipe.actions.enabled else None
    if action_threshold is not None:
        actions, skipped = policy_action_drift(
            registry, req.site, bundle.fingerprint, encoder, pre, ref_frames, new.frames
        )
        notes += [
            f"policy {n}: trained on another backbone, action drift not scored" for n in skipped
        ]
        if not actions:
            notes.append(f"no image policy is pinned at site {req.site}: action drift not scored")
        elif max(actions.values()) > action_threshold:
            signals.append("actions")
    verdict = "adapt" if signals else "fits"
    if score.reference_episodes < CALIBRATED_REFERENCE_EPISODES:
        notes.append(
            f"the reference has {score.reference_episodes} episodes, fewer than the "
            f"{CALIBRATED_REFERENCE_EPISODES} the default threshold was calibrated with: "
            "same-site logs read `adapt` more often (2 of 20 draws with 64); pass a larger "
            "--reference or recalibrate the threshold"
        )
    result = MonitorResult(
        req.site, verdict, threshold, score, encoder_name, reference_name, notes=notes,
        actions=actions, action_threshold=action_threshold, signals=signals,
    )  # fmt: skip
    tags = {
        "site": req.site,
        "verdict": verdict,
        "encoder": encoder_name,
        "data_fingerprint": logs_fingerprint(list(req.logs)),
    }
    with registry.run(MONITOR_EXPERIMENT, f"monitor-{req.site}", tags) as run:
        run.log_params(
            {
                "threshold": threshold,
                "frames": frames,
                "reference": reference_name,
                "recipe": str(recipe_path),
            }
        )
        run.log_dict(recipe_to_dict(recipe), "recipe.resolved.json")
        metrics = {f"drift.{k}": float(v) for k, v in score.to_dict().items()}
        metrics |= {f"actions.{_metric_key(k)}": v for k, v in actions.items()}
        if actions:
            metrics["actions.max"] = max(actions.values())
        run.log_metrics(0, metrics)
        run.log_dict(result.to_dict(), "monitor.json")
        result.mlflow_run = run.run_id
    return result


def _metric_key(name: str) -> str:
    """An MLflow metric name part: letters, digits and ``_-.`` only."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def policy_action_drift(
    registry: Registry,
    site: str,
    backbone: str,
    encoder: nn.Module,
    preprocess: Preprocess,
    reference: torch.Tensor,
    new: torch.Tensor,
) -> tuple[dict[str, float], list[str]]:
    """For each policy pinned at `site` that reads the encoder (features or tokens) and was
    trained on `backbone` (its fingerprint): the MMD^2 between its actions on the reference
    frames and on the new frames, in units of its action std (`drift.action_drift`). Proprio
    and instruction are held at the policy's mean, as the audit's site probe does, so only the
    images move the actions. Returns the scores and the names of the image policies skipped for
    another backbone."""
    import torch

    from dynaflip_adapt.eval.drift import action_drift
    from dynaflip_adapt.policies import actions_on_frames
    from dynaflip_adapt.registry.lifecycle import load_policy_version, policies_for_site

    out: dict[str, float] = {}
    skipped: list[str] = []
    for info in policies_for_site(registry, site):
        policy = load_policy_version(registry, info)
        if not policy.uses_image:
            continue
        name = info.tags.get("name") or f"v{info.version}"
        if policy.spec["pin"].get("backbone_fingerprint") != backbone:
            skipped.append(name)
            continue
        with torch.no_grad():
            a_ref = actions_on_frames(policy, encoder, preprocess, reference)
            a_new = actions_on_frames(policy, encoder, preprocess, new)
        out[name] = action_drift(a_ref, a_new, policy.action_scale)
    return out, skipped
