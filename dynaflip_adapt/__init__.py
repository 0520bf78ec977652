"""dynaflip-adapt: field adaptation of DynaFLIP robot-vision backbones.

The package root stays import-light (no torch, h5py or mlflow) so that the CLI starts fast;
heavy modules are imported by the functions that need them. The Python API (the same jobs the
CLI runs, a request object in and a result object out) is importable from here::

    from dynaflip_adapt import AdaptRequest, adapt_site
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.3.0.dev0"

# Public name -> the module that defines it (imported on first use).
_API = {
    "AdaptRequest": "dynaflip_adapt.workflows.adapt",
    "AdaptResult": "dynaflip_adapt.workflows.adapt",
    "DryRunResult": "dynaflip_adapt.workflows.adapt",
    "adapt_site": "dynaflip_adapt.workflows.adapt",
    "MonitorRequest": "dynaflip_adapt.workflows.monitor",
    "MonitorResult": "dynaflip_adapt.workflows.monitor",
    "monitor_site": "dynaflip_adapt.workflows.monitor",
    "RolloutRequest": "dynaflip_adapt.workflows.rollout",
    "RolloutReport": "dynaflip_adapt.workflows.rollout",
    "closed_loop": "dynaflip_adapt.workflows.rollout",
    "AuditRequest": "dynaflip_adapt.workflows.lifecycle",
    "AuditResult": "dynaflip_adapt.workflows.lifecycle",
    "audit_adapter": "dynaflip_adapt.workflows.lifecycle",
    "PromoteRequest": "dynaflip_adapt.workflows.lifecycle",
    "PromoteResult": "dynaflip_adapt.workflows.lifecycle",
    "promote_adapter": "dynaflip_adapt.workflows.lifecycle",
    "rollback_site": "dynaflip_adapt.workflows.lifecycle",
    "PretrainRequest": "dynaflip_adapt.workflows.pretrain",
    "PretrainJobResult": "dynaflip_adapt.workflows.pretrain",
    "pretrain_backbone": "dynaflip_adapt.workflows.pretrain",
    "BenchmarkConfig": "dynaflip_adapt.eval.ablations",
    "run_benchmark": "dynaflip_adapt.workflows.benchmark",
}

__all__ = [
    "AdaptRequest",
    "AdaptResult",
    "AuditRequest",
    "AuditResult",
    "BenchmarkConfig",
    "DryRunResult",
    "MonitorRequest",
    "MonitorResult",
    "PretrainJobResult",
    "PretrainRequest",
    "PromoteRequest",
    "PromoteResult",
    "RolloutReport",
    "RolloutRequest",
    "__version__",
    "adapt_site",
    "audit_adapter",
    "closed_loop",
    "monitor_site",
    "pretrain_backbone",
    "promote_adapter",
    "rollback_site",
    "run_benchmark",
]

if TYPE_CHECKING:
    from dynaflip_adapt.eval.ablations import BenchmarkConfig
    from dynaflip_adapt.workflows.adapt import AdaptRequest, AdaptResult, DryRunResult, adapt_site
    from dynaflip_adapt.workflows.benchmark import run_benchmark
    from dynaflip_adapt.workflows.lifecycle import (
        AuditRequest,
        AuditResult,
        PromoteRequest,
        PromoteResult,
        audit_adapter,
        promote_adapter,
        rollback_site,
    )
    from dynaflip_adapt.workflows.monitor import MonitorRequest, MonitorResult, monitor_site
    from dynaflip_adapt.workflows.pretrain import (
        PretrainJobResult,
        PretrainRequest,
        pretrain_backbone,
    )
    from dynaflip_adapt.workflows.rollout import RolloutReport, RolloutRequest, closed_loop


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dynaflip_adapt' has no attribute {name!r}")
