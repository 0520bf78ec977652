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


def _object_scenes(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Token maps (4 x 4 grid) showing three coloured objects, a plate and the gripper at
    random cells; the instruction (one-hot) names one object; the action moves the grasp point
    towards it. Only the instruction says which object, only the tokens say where."""
    from dynaflip_adapt.policies import oracle_features

    g = torch.Generator().manual_seed(seed)
    cells = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(n)])
    xy = torch.stack([cells % 4, cells // 4], dim=-1).float() * 0.1  # metres, 10 cm grid
    tokens = 0.1 * torch.randn(n, 16, 8, generator=g)
    rows = torch.arange(n)[:, None]
    # channel k marks entity k: objects 0-2, the plate (3), the gripper (4)
    tokens[rows, cells, torch.arange(5)[None]] += 1.0
    which = torch.randint(0, 3, (n,), generator=g)
    objects = torch.cat([xy[:, :3], torch.full((n, 3, 1), 0.02)], dim=-1)  # (n, 3, 3)
    eef = torch.cat([xy[:, 4], torch.full((n, 1), 0.1)], dim=1)
    others = torch.stack([objects[i, [k for k in range(3) if k != which[i]]] for i in range(n)])
    state = torch.cat([objects[rows[:, 0], which], xy[:, 3], others.flatten(1)], dim=1)
    return {
        "tokens": tokens,
        "proprio": eef,
        "language": torch.nn.functional.one_hot(which, 3).float(),
        "actions": (objects[rows[:, 0], which] - eef)[:, :2] * 10,
        "state": oracle_features(state, eef),
        "target_index": which,
        "episode": torch.arange(n) // 10,
    }


@pytest.mark.slow
def test_object_head_learns_where_the_instructed_object_is_from_the_logged_state():
    from dynaflip_adapt.policies import fit_head
    from dynaflip_adapt.policies.heads import ESTIMATE_COLUMNS, ESTIMATE_UNIT
    from dynaflip_adapt.policies.policy import head_inputs
    from dynaflip_adapt.policies.training import estimate_rmse_cm

    d = _object_scenes(1200, 0)
    kw = {"head": "objects", "language": d["language"], "episode": d["episode"]}
    fit = fit_head(d["tokens"], d["proprio"], d["actions"], state=d["state"], val_fraction=0.1,
                   target_index=d["target_index"], feature_noise=0.0, steps=1200, lr=3e-3, batch=64,
                   **kw)  # fmt: skip
    test = _object_scenes(300, 1)
    f, p = head_inputs(fit.stats, test["tokens"], test["proprio"], test["language"], "tokens", True)
    # Slot k is object k, and the instruction selects the right one.
    with torch.no_grad():
        chosen = fit.model.select_logits(p).argmax(-1)
    assert float((chosen == test["language"].argmax(-1)).float().mean()) > 0.9
    # Where it is, relative to the grasp point: the mean of the three objects (what a head
    # that cannot tell which is meant tends to) misses by ~10 cm; this head by a few.
    target = test["state"][:, list(ESTIMATE_COLUMNS)] * ESTIMATE_UNIT
    rmse = estimate_rmse_cm(fit.model, f, p, target)
    objects = torch.cat([test["state"][:, :3], test["state"][:, 5:11]], 1).view(-1, 3, 3)
    mean_miss = (objects.mean(1) - test["state"][:, :3])[:, :2].pow(2).mean(0).sqrt() * 100
    assert mean_miss.min() > 8
    assert rmse["object_x"] < 0.6 * mean_miss[0] and rmse["object_y"] < 0.6 * mean_miss[1], rmse
    plate_spread = test["state"][:, 14:16].std(0) * 100  # what knowing nothing costs, cm
    assert rmse["plate_x"] < 0.4 * plate_spread[0] and rmse["plate_y"] < 0.4 * plate_spread[1]
    assert fit.info["val_estimate_rmse_cm"]["object_x"] < 0.6 * mean_miss[0]
    # It acts on its estimate: action error well under the spread of the actions.
    pol = Policy(None, policy_spec("objects", 8, 3, 2, 0.1, {}, language_dim=3), fit.model,
                 fit.stats)  # fmt: skip
    with torch.no_grad():
        a = pol.act(test["tokens"], test["proprio"], test["language"])
    assert float(((a - test["actions"]) ** 2).mean() / test["actions"].var(0).mean()) < 0.15

    # Without the logged state there is nothing to hold the estimate to: refused.
    with pytest.raises(ValueError, match="object state"):
        fit_head(d["tokens"], d["proprio"], d["actions"], steps=2, **kw)


def test_object_heads_refuse_logs_without_object_state(tmp_path):
    """Logs that do not record where the objects are cannot train an object head: one line
    naming the file and key, exit 2, nothing registered."""
    import json

    from typer.testing import CliRunner

    from dynaflip_adapt.cli.app import app
    from tests.builders import write_native

    path, _ = write_native(tmp_path / "site.h5", n=2)
    runner = CliRunner()
    r = runner.invoke(app, ["policies", "train", str(path), "--site", "lab", "--head",
                            "cnn_objects", "--steps", "2"])  # fmt: skip
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "obs/object_state" in lines[0], r.output
    listed = runner.invoke(app, ["policies", "list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.stdout) == [], listed.output


def test_appearance_views_teach_a_head_what_a_shift_leaves_alone():
    """`fit_head(views=...)`: in the logged frames a nuisance feature (the light, say) copies
    the signal exactly, so a head can read either; the view of the same frames re-draws the
    nuisance. At a site where the nuisance is unrelated to the action, the head trained with
    the view is far more accurate than the one trained on the logged frames alone."""
    from dynaflip_adapt.policies.training import fit_head

    def task(n: int, seed: int, nuisance_follows: bool) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        signal = torch.randn(n, 1, generator=g)
        nuisance = signal.clone() if nuisance_follows else torch.randn(n, 1, generator=g)
        features = torch.cat([signal, nuisance, torch.randn(n, 2, generator=g)], dim=1)
        proprio = torch.randn(n, 2, generator=g)
        return features, proprio, 2.0 * signal

    feats, proprio, actions = task(600, 0, nuisance_follows=True)
    relit = feats.clone()
    relit[:, 1] = torch.randn(600, generator=torch.Generator().manual_seed(1))
    site_f, site_p, site_a = task(300, 2, nuisance_follows=False)
    err = {}
    for name, views in (("logged", ()), ("with view", (relit,))):
        fit = fit_head(feats, proprio, actions, head="bc", steps=600, seed=0, views=views)
        policy = Policy(None, policy_spec("bc", 4, 2, 1, 0.1, {}), fit.model, fit.stats)
        with torch.no_grad():
            a = policy.act(site_f, site_p)
        err[name] = float(((a - site_a) ** 2).mean() / site_a.var())
    assert err["with view"] < 0.3 * err["logged"], err


def test_appearance_views_relight_without_moving_anything():
    """`appearance_views`: same shape and dtype, deterministic in its seed, the global RNG left
    as it was; the light changes (mean colour moves) but an edge stays where it was."""
    from dynaflip_adapt.train.augment import appearance_views

    rgb = torch.full((16, 3, 32, 32), 60, dtype=torch.uint8)
    rgb[:, :, :, 16:] = 200  # a vertical edge at column 16
    styles = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(3),
                           dtype=torch.uint8)  # fmt: skip
    state = torch.get_rng_state()
    a = appearance_views(rgb, styles, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, appearance_views(rgb, styles, seed=5))
    assert not torch.equal(a, appearance_views(rgb, styles, seed=6))
    assert a.shape == rgb.shape and a.dtype == torch.uint8
    assert float((a.float() - rgb.float()).abs().mean()) > 5
    step = a.float().mean((1, 2)).diff(dim=-1).abs()  # column-to-column change per frame
    assert bool((step.argmax(-1) == 15).float().mean() >= 0.9), step.argmax(-1)


def test_appearance_with_a_head_that_reads_no_image_is_refused(tmp_path):
    """`--appearance` relights frames: a head that reads no image would ignore it silently, so
    the option is refused (one line, exit 2) before any logs are read or anything registered."""
    from typer.testing import CliRunner

    from dynaflip_adapt.cli.app import app

    for head in ("proprio_only", "oracle"):
        r = CliRunner().invoke(app, ["policies", "train", str(tmp_path / "none.h5"), "--site",
                                     "s", "--head", head, "--appearance", "2"])  # fmt: skip
        assert r.exit_code == 2, r.output
        line = r.stderr.strip()
        assert "--appearance" in line and "reads no image" in line and "\n" not in line, line
