"""The finetune step objective on its own (no training run): each term against a computation
that does not go through the objective, on synthetic logs and the shipped backbone."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dynaflip_adapt.config import load_recipe
from dynaflip_adapt.data.logs import open_logs
from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import load_bundle
from dynaflip_adapt.registry.backbones import SHIPPED
from dynaflip_adapt.train.distributed import Dist
from dynaflip_adapt.train.finetune import (
    StepObjective,
    active_terms,
    build_student,
    site_triplets,
)
from tests.builders import write_native

# No augmentation: the objective's first random draw is then the teacher-pool sample.
SET = ["data.gap=1", "augment.enabled=false", "optim.batch_size=8", "replay.fraction=0.5"]


def _setup(tmp_path, extra=()):
    logs, _ = write_native(tmp_path / "site.h5", n=3, varied_language=True, T=8, H=64, W=64)
    bundle = load_bundle(SHIPPED)
    recipe = load_recipe("finetune/default", [*SET, *extra])[0]
    ds, text, anchors, _ = site_triplets(bundle, open_logs([logs]), recipe)
    active, warnings = active_terms(recipe, anchors, bundle, pooled=True, retained=False)
    student = build_student(bundle.model.image, recipe, None, False)
    pool = bundle.replay["rgb0"]
    objective = StepObjective(
        bundle, student, student, recipe, active, text, pool, torch.device("cpu"), Dist()
    )
    batch = next(iter(DataLoader(ds, batch_size=8)))
    return bundle, student, objective, active, batch, pool, warnings


def _perturb(student, seed=0):
    """Non-zero LoRA B matrices: the student no longer equals the teacher."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _drawn(pool, n, seed):
    torch.manual_seed(seed)
    return pool[torch.randint(0, pool.shape[0], (n,))]


def test_terms_are_weighted_and_a_fresh_adapter_is_its_teacher(tmp_path):
    """A fresh LoRA adapter (B = 0) is the base encoder: source-replay distillation is exactly
    0; the loss is the active weights times the parts; invariance is off without augment."""
    _, _, objective, active, batch, _, warnings = _setup(tmp_path)
    assert active["invariance"] == 0 and any("invariance term needs" in w for w in warnings)
    with torch.no_grad():
        loss, parts = objective(batch)
    assert parts["distill_replay"] == 0.0
    assert {"area", "contrastive", "cosine", "single_frame"} <= parts.keys()
    assert float(loss) == pytest.approx(sum(active[k] * v for k, v in parts.items()), rel=1e-5)


@pytest.mark.parametrize("tokens", [False, True])
def test_replay_distillation_equals_the_drift_from_the_base_encoder(tmp_path, tokens):
    """With the adapter moved, `distill_replay` is the relative drift of the student's
    features of the drawn pool frames from the bundle's own (unwrapped) base encoder's; with
    `loss.distill_tokens` plus the patch tokens' relative drift."""
    bundle, student, objective, _, batch, pool, _ = _setup(
        tmp_path, [f"loss.distill_tokens={str(tokens).lower()}"]
    )
    _perturb(student)
    n = objective.n_replay
    assert n == 4
    with torch.no_grad():
        torch.manual_seed(11)
        _, parts = objective(batch)
        frames = bundle.model.preprocess(_drawn(pool, n, 11))
        new = student(frames, all_tokens=True)
        old = bundle.model.image.tokens(frames)

    def rel(s, t):
        return float(((s - t) ** 2).mean() / (t**2).mean())

    want = rel(new[:, 0], old[:, 0]) + (rel(new[:, 1:], old[:, 1:]) if tokens else 0.0)
    assert want > 1e-4
    assert parts["distill_replay"] == pytest.approx(want, rel=1e-4)


def test_no_active_term_is_refused(tmp_path):
    off = ["loss.area=0", "loss.contrastive=0", "loss.cosine=0", "loss.single_frame=0",
           "loss.distill_replay=0", "loss.invariance=0"]  # fmt: skip
    with pytest.raises(InputError, match="no active loss term"):
        _setup(tmp_path, off)
