"""Reference policies conditioned on the instruction: training, saving, the CLI default, and the
one-line error for logs without instructions."""

from __future__ import annotations

import pytest
import torch

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.policies import (
    Policy,
    collect,
    load_policy,
    policy_spec,
    save_policy,
    train_head,
)


def _ambiguous_task(n: int = 400) -> dict[str, torch.Tensor]:
    """Same frames and proprio distribution under two instructions that ask for opposite
    actions: only the instruction tells them apart."""
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 2, (n,), generator=g)
    language = torch.nn.functional.one_hot(which, 2).float()
    features = torch.randn(n, 4, generator=g)
    proprio = torch.randn(n, 2, generator=g)
    actions = torch.stack([2.0 * which - 1.0, proprio[:, 0]], dim=1)
    return {"features": features, "proprio": proprio, "actions": actions, "language": language}


def _mse(policy: Policy, d: dict[str, torch.Tensor], language: bool) -> float:
    with torch.no_grad():
        a = policy.act(d["features"], d["proprio"], d["language"] if language else None)
    return float((((a - d["actions"]) / policy.action_scale) ** 2).mean())


@pytest.mark.slow
def test_a_language_conditioned_head_resolves_what_the_frame_cannot(tmp_path):
    train, test = _ambiguous_task(), _ambiguous_task(200)
    test = {k: v.flip(0) for k, v in test.items()}
    m0, s0, _ = train_head(
        train["features"], train["proprio"], train["actions"], steps=300, feature_noise=0.0
    )
    blind = Policy(None, policy_spec("bc", 4, 2, 2, 0.1, {}), m0, s0)
    m1, s1, _ = train_head(
        train["features"],
        train["proprio"],
        train["actions"],
        steps=300,
        feature_noise=0.0,
        language=train["language"],
    )
    spec = policy_spec("bc", 4, 2, 2, 0.1, {}, language_dim=2)
    cond = Policy(None, spec, m1, s1)
    # Without the instruction, dim 0 (+-1 at random) is unpredictable: half the error budget.
    assert _mse(blind, test, False) > 0.4
    assert _mse(cond, test, True) < 0.05
    with pytest.raises(ValueError, match="language-conditioned"):
        cond.act(test["features"], test["proprio"])
    # Saved and loaded: the same actions, the spec says what it reads.
    loaded = load_policy(save_policy(tmp_path / "p", cond.head, cond.spec, cond.stats))
    assert loaded.uses_language and loaded.spec["language_dim"] == 2
    assert loaded.spec["inputs"] == {
        "image": True,
        "reads": "features",
        "proprio": True,
        "language": True,
    }
    with torch.no_grad():
        a = cond.act(test["features"], test["proprio"], test["language"])
        b = loaded.act(test["features"], test["proprio"], test["language"])
    assert torch.equal(a, b)


def test_collect_with_language_embeds_each_episodes_instruction(tmp_path):
    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from tests.builders import write_native, write_robomimic_file

    path, eps = write_native(tmp_path / "a.h5", n=2)
    seen: list[list[str]] = []

    def embed(texts):
        seen.append(list(texts))
        return torch.tensor([[float(len(t)), float(i)] for i, t in enumerate(texts)])

    d = collect(open_logs([path]), EpisodeReader(), 16, language=embed)
    assert seen == [[e.language for e in eps]]
    T = eps[0].actions.shape[0]
    assert d["language"].shape == (2 * T, 2)
    assert torch.equal(d["language"][T:, 1], torch.ones(T))  # frames of episode 2 -> row 2

    # robomimic files carry no instruction.
    bare, _ = write_robomimic_file(tmp_path / "bare.h5", n=1)
    with pytest.raises(InputError) as e:
        collect(open_logs([bare]), EpisodeReader(), 16, language=embed)
    msg = str(e.value)
    assert "bare.h5" in msg and "language" in msg and "no instruction" in msg
