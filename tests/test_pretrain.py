"""Pretraining: deterministic, resumable bit for bit, logged and registered in MLflow."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.config import load_recipe
from dynaflip_adapt.data.logs import open_logs
from dynaflip_adapt.models.backbone import Backbone, load_bundle, save_bundle
from dynaflip_adapt.train.pretrain import pretrain
from tests.builders import write_native

TINY = [
    "data.gap=1",
    "data.num_workers=0",
    "model.flow_points=8",
    "optim.batch_size=4",
    "optim.max_steps=12",
    "optim.warmup_steps=2",
    "run.checkpoint_every=5",
    "replay.frames=6",
]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    d = tmp_path_factory.mktemp("logs")
    write_native(d / "a.h5", n=3)
    write_native(d / "b.h5", n=2, language="push the block")
    return d


def _recipe(extra=()):
    return load_recipe("pretrain/tiny", [*TINY, *extra])[0]


def _weights(bundle):
    return load_bundle(bundle).model.state_dict()


def test_seeded_run_is_deterministic_and_pins_its_first_loss(logs, tmp_path):
    r1 = pretrain(open_logs(logs), _recipe(), tmp_path / "a")
    r2 = pretrain(open_logs(logs), _recipe(), tmp_path / "b")
    w1, w2 = _weights(r1.bundle), _weights(r2.bundle)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert [h["loss"] for h in r1.history] == [h["loss"] for h in r2.history]
    # Pinned on torch 2.13 CPU: a change here means the objective or the data path changed.
    assert r1.history[0]["loss"] == pytest.approx(PINNED_FIRST_LOSS, rel=1e-4)
    r3 = pretrain(open_logs(logs), _recipe(["run.seed=1"]), tmp_path / "c")
    assert r3.history[0]["loss"] != r1.history[0]["loss"]


PINNED_FIRST_LOSS = 1.591043472290039


def test_resume_after_interrupt_gives_the_same_backbone(logs, tmp_path):
    straight = pretrain(open_logs(logs), _recipe(), tmp_path / "straight")

    def crash(step, _metrics):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(open_logs(logs), _recipe(), tmp_path / "crashed", on_step=crash)
    resumed = pretrain(open_logs(logs), _recipe(), tmp_path / "crashed", resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[5:]]
    w1, w2 = _weights(straight.bundle), _weights(resumed.bundle)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_replay_set_is_stored_at_input_size(logs, tmp_path):
    res = pretrain(open_logs(logs), _recipe(), tmp_path / "r")
    b = load_bundle(res.bundle)
    assert b.replay["rgb0"].shape == (6, 3, 32, 32) and b.replay["rgb0"].dtype == torch.uint8
    assert b.replay["text"].shape == (6, 384)
    assert len(b.instructions) == 6 and set(b.instructions) <= {
        "pick up the red cube",
        "push the block",
    }
    assert b.manifest["provenance"]["steps"] == 12


def test_cli_pretrain_registers_a_backbone_with_lineage(logs, tmp_path):
    runner = CliRunner()
    sets = [arg for s in TINY for arg in ("--set", s)]
    r = runner.invoke(
        app,
        [
            "pretrain",
            str(logs),
            "--recipe",
            "pretrain/tiny",
            *sets,
            "--max-steps",
            "6",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    tags = out["backbone"]["tags"]
    bundle = load_bundle(out["bundle"])
    assert tags["fingerprint"] == bundle.fingerprint
    # --max-steps is recorded in the bundle's recipe: the recipe reproduces the run.
    prov = bundle.manifest["provenance"]
    assert prov["steps"] == 6 and prov["recipe"]["optim"]["max_steps"] == 6
    assert tags["data_fingerprint"].startswith("sha256:") and tags["recipe_hash"].startswith(
        "sha256:"
    )
    r = runner.invoke(app, ["backbones", "list", "--json"])
    assert r.exit_code == 0, r.output
    versions = json.loads(r.stdout)
    mine = [v for v in versions if v["tags"].get("fingerprint") == tags["fingerprint"]]
    assert len(mine) == 1
    r = runner.invoke(app, ["backbones", "show", "--backbone", mine[0]["version"], "--json"])
    assert (
        r.exit_code == 0 and json.loads(r.stdout)["manifest"]["fingerprint"] == tags["fingerprint"]
    )
    r = runner.invoke(
        app,
        ["backbones", "eval", str(logs), "--backbone", mine[0]["version"], "--gap", "1", "--json"],
    )
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["triplets"] == 25 and 0.0 <= ev["img_to_flow_top1"] <= 1.0
    # 3 + 2 episodes in two files: the bootstrap clusters are episodes, not files or triplets.
    assert ev["episodes"] == 5
    assert all(0.0 <= lo <= hi <= 1.0 for lo, hi in ev["ci95"].values())
    # --against: a random-init twin and the backbone itself, scored on the same triplets.
    twin = save_bundle(Backbone(bundle.model.cfg), tmp_path / "twin")
    r = runner.invoke(
        app,
        ["backbones", "eval", str(logs), "--backbone", mine[0]["version"], "--gap", "1",
         "--against", str(twin), "--against", mine[0]["version"], "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    cmp = json.loads(r.stdout)
    first, other, same = cmp["encoders"]
    assert first == ev == same and other["episodes"] == 5
    vs_twin, vs_self = cmp["margins"]
    for m in ("img_to_flow_top1", "img_to_flow_top5", "img_to_lang_top1", "img_to_lang_top5"):
        d, lo, hi = vs_twin[m]
        assert d == pytest.approx(first[m] - other[m]) and lo <= hi
        assert vs_self[m] == [0.0, 0.0, 0.0]
    r = runner.invoke(app, ["backbones", "show", "--backbone", "99", "--json"])
    assert r.exit_code == 2 and "no version or alias '99'" in r.stderr


def test_pretrain_from_python_is_the_cli_job(logs, tmp_path):
    """`pretrain_backbone` (no CLI) trains, registers and installs the bundle as `pretrain`
    does: the same seed and recipe give the CLI's weights; a bad export folder is refused before
    anything trains."""
    from dynaflip_adapt import PretrainRequest, pretrain_backbone
    from dynaflip_adapt.errors import InputError

    sets = [arg for s in TINY for arg in ("--set", s)]
    r = CliRunner().invoke(app, ["pretrain", str(logs), "--recipe", "pretrain/tiny", *sets,
                                 "--steps", "4", "--workdir", str(tmp_path / "cli"), "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    cli = json.loads(r.stdout)
    request = PretrainRequest(
        logs=(logs,), recipe="pretrain/tiny", overrides=tuple(TINY), steps=4,
        workdir=tmp_path / "api", export_bundle=tmp_path / "mine",
    )  # fmt: skip
    out = pretrain_backbone(request)
    assert out is not None and out.backbone.version != cli["backbone"]["version"]
    assert out.backbone.tags["fingerprint"] == cli["backbone"]["tags"]["fingerprint"]
    assert out.to_dict().keys() == cli.keys() and out.steps == cli["steps"] == 4
    assert load_bundle(tmp_path / "mine").fingerprint == out.backbone.tags["fingerprint"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    taken = PretrainRequest(logs=(logs,), recipe="pretrain/tiny", overrides=tuple(TINY),
                            export_bundle=tmp_path / "taken", workdir=tmp_path / "never")  # fmt: skip
    with pytest.raises(InputError):
        pretrain_backbone(taken)
    assert not (tmp_path / "never").exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_cli_default_work_folder_lives_under_home_and_resumes_a_killed_run(logs):
    import tempfile
    from pathlib import Path

    from dynaflip_adapt.registry.store import resolve_store

    leaked = set(Path(tempfile.gettempdir()).glob("dynaflip-pretrain-*"))
    runner = CliRunner()
    sets = [arg for s in [*TINY, "run.checkpoint_every=4"] for arg in ("--set", s)]
    args = ["pretrain", str(logs), "--recipe", "pretrain/tiny", *sets, "--max-steps", "6"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    bundle = Path(json.loads(r.stdout)["bundle"])
    # Keyed by logs + recipe under $DYNAFLIP_HOME, not a temp folder left behind per run.
    assert bundle.parent.parent == resolve_store().home / "runs" / "pretrain"
    assert bundle.parent.name.startswith("tiny-")
    assert set(Path(tempfile.gettempdir()).glob("dynaflip-pretrain-*")) == leaked
    straight = _weights(bundle)
    # The step-4 checkpoint stands for a killed run: --resume needs no --workdir to find it,
    # and finishing from it gives the uninterrupted run's weights.
    r = runner.invoke(app, [*args, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert Path(resumed["bundle"]) == bundle and len(resumed["final"]) > 0
    w = _weights(bundle)
    assert all(torch.equal(w[k], straight[k]) for k in w)
    # Another recipe gets another folder: no run resumes a different run's checkpoint.
    r = runner.invoke(app, [*args, "--set", "run.seed=1", "--resume"])
    assert r.exit_code == 2 and "no checkpoint to resume from" in r.stderr


def test_a_diverging_run_registers_nothing_and_is_marked_failed(logs, tmp_path):
    from mlflow import MlflowClient

    from dynaflip_adapt.registry.store import resolve_store

    runner = CliRunner()
    sets = [arg for s in [*TINY, "optim.lr=1e30", "optim.grad_clip=1e30"] for arg in ("--set", s)]
    r = runner.invoke(app, ["pretrain", str(logs), "--recipe", "pretrain/tiny", *sets])
    assert r.exit_code == 3, r.output
    assert "loss is" in r.stderr
    client = MlflowClient(resolve_store().tracking_uri)
    exp = client.get_experiment_by_name("dynaflip-pretrain")
    runs = client.search_runs([exp.experiment_id])
    assert [run.info.status for run in runs if run.info.run_name.startswith("pretrain-")] == [
        "FAILED"
    ]
    assert client.search_model_versions("name='dynaflip-backbone'") == [] or all(
        mv.tags.get("source") == "shipped"
        for mv in client.search_model_versions("name='dynaflip-backbone'")
    )


def test_shipped_backbone_bootstraps_an_empty_registry():
    from dynaflip_adapt.models.backbone import read_manifest
    from dynaflip_adapt.registry.backbones import SHIPPED

    runner = CliRunner()
    r = runner.invoke(app, ["backbones", "list", "--json"])
    assert r.exit_code == 0, r.output
    versions = json.loads(r.stdout)
    assert len(versions) == 1 and versions[0]["aliases"] == ["base"]
    assert versions[0]["tags"]["source"] == "shipped"
    assert versions[0]["tags"]["fingerprint"] == read_manifest(SHIPPED)["fingerprint"]
    # Idempotent: a second call registers nothing new.
    r = runner.invoke(app, ["backbones", "list", "--json"])
    assert len(json.loads(r.stdout)) == 1
    shipped = load_bundle(SHIPPED)
    assert shipped.manifest["architecture"]["text_encoder"] == "minilm"
    assert shipped.replay["rgb0"].shape[1:] == (3, 64, 64)
    assert shipped.manifest["provenance"]["steps"] >= 700


def test_shipped_backbone_was_trained_with_the_shipped_recipe():
    """The README's reproduce command runs `pretrain --recipe pretrain/small`: every setting the
    shipped bundle recorded must still be what that recipe resolves to (keys added to the recipe
    schema since then are not in the manifest and must keep their neutral defaults)."""
    from dynaflip_adapt.config import FinetuneLoss, recipe_to_dict
    from dynaflip_adapt.registry.backbones import SHIPPED

    recorded = load_bundle(SHIPPED).manifest["provenance"]["recipe"]
    recipe, _ = load_recipe("pretrain/small")
    current = recipe_to_dict(recipe)
    for section, values in recorded.items():
        if not isinstance(values, dict):
            assert current[section] == values, section
            continue
        for key, value in values.items():
            if section == "loss" and key not in current["loss"]:
                # Recorded when both kinds shared one loss schema: a finetune-only key, which
                # pretraining never read.
                assert key in FinetuneLoss.model_fields, key
                continue
            assert current[section][key] == value, f"{section}.{key}"
    assert current["loss"].get("variance", 0.0) == 0.0


def test_temperature_init_sets_the_learnable_infonce_scale(logs, tmp_path):
    """loss.temperature_init is where the learnable scale starts (it was once ignored)."""
    import math

    for t in (0.07, 0.02):
        res = pretrain(open_logs(logs), _recipe([f"loss.temperature_init={t}"]), tmp_path / str(t))
        scale = float(load_bundle(res.bundle).model.logit_scale)
        # 12 steps of AdamW at lr <= 1e-3 move it by at most ~0.012.
        assert scale == pytest.approx(math.log(1 / t), abs=0.02)


def test_augmented_pretraining_is_seeded_and_changes_what_is_learned(logs, tmp_path):
    """augment.enabled: kornia draws from the seeded torch RNG, so two runs give the same
    weights, and a run without it gives other ones."""
    aug = ["augment.enabled=true"]
    r1 = pretrain(open_logs(logs), _recipe(aug), tmp_path / "a")
    r2 = pretrain(open_logs(logs), _recipe(aug), tmp_path / "b")
    plain = pretrain(open_logs(logs), _recipe(), tmp_path / "c")
    w1, w2, w0 = _weights(r1.bundle), _weights(r2.bundle), _weights(plain.bundle)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not all(torch.equal(w1[k], w0[k]) for k in w1)
    assert r1.history[0]["loss"] != plain.history[0]["loss"]


def test_grouped_sampler_fills_chunks_from_one_group_and_resumes_mid_epoch():
    """data.batch_groups: each chunk comes from one group (log file), every index appears once
    per epoch, and `start` continues the same stream (what --resume relies on)."""
    import itertools

    from dynaflip_adapt.train.common import ResumableSampler

    groups = [0] * 7 + [1] * 5 + [2] * 9  # 21 pairs in 3 files
    s = ResumableSampler(21, seed=3, groups=groups, chunk=4)
    stream = list(itertools.islice(iter(s), 63))
    for epoch in range(3):
        assert sorted(stream[21 * epoch : 21 * (epoch + 1)]) == list(range(21))
    first = stream[:21]
    # Cut the epoch into runs of one group: each group's runs total its size and are at most
    # 4 long; with chunks of 4, group 2 (9 pairs) needs at least 3 runs.
    runs, i = [], 0
    while i < 21:
        j = i
        while j < 21 and groups[first[j]] == groups[first[i]] and j - i < 4:
            j += 1
        runs.append((groups[first[i]], j - i))
        i = j
    assert all(n <= 4 for _, n in runs)
    assert sorted(g for g, _ in runs).count(2) >= 3
    assert sum(n for g, n in runs if g == 1) == 5
    assert stream[21:42] != first  # a fresh draw per epoch
    resumed = list(itertools.islice(iter(ResumableSampler(21, 3, 30, groups, 4)), 33))
    assert resumed == stream[30:63]
    plain = list(itertools.islice(iter(ResumableSampler(21, 3)), 21))
    assert sorted(plain) == list(range(21)) and plain != first


def test_file_groups_name_each_pairs_log_file(logs):
    from dynaflip_adapt.data.dataset import FramePairDataset

    pairs = FramePairDataset(open_logs(logs), gap=1, fields=[])
    groups = pairs.file_groups()
    assert len(groups) == len(pairs) and set(groups.tolist()) == {0, 1}
    files = [str(pairs.episodes[int(pairs[i]["episode"])].file) for i in range(len(pairs))]
    for g in (0, 1):
        assert len({f for f, k in zip(files, groups, strict=True) if k == g}) == 1


def test_point_tokens_sample_the_patch_grid_at_pixel_centres():
    from dynaflip_adapt.models.backbone import Backbone, BackboneConfig

    model = Backbone(BackboneConfig(32, 8, 16, 1, 2, 2.0, 8, "hashed", 8, 16, point_heads=True))
    g = 4  # 32 px / patch 8
    B, D = 2, 3
    grid = torch.randn(B, D, g, g)
    tokens = torch.cat([torch.zeros(B, 1, D), grid.flatten(2).transpose(1, 2)], dim=1)

    def uv(px: float, py: float) -> torch.Tensor:  # pixel coordinates -> normalized
        return torch.tensor([(px + 0.5) / 32 * 2 - 1, (py + 0.5) / 32 * 2 - 1])

    # The centre of patch (row 1, col 2) is pixel (2 * 8 + 3.5, 1 * 8 + 3.5).
    at_centre = torch.stack([uv(19.5, 11.5), uv(23.5, 11.5)])[None].expand(B, -1, -1)
    out = model.point_tokens(tokens, at_centre)
    torch.testing.assert_close(out[:, 0], grid[:, :, 1, 2])
    # Halfway between the centres of columns 2 and 3: their mean.
    torch.testing.assert_close(out[:, 1], 0.5 * (grid[:, :, 1, 2] + grid[:, :, 1, 3]))


def test_point_losses_match_their_definitions():
    from dynaflip_adapt.config import load_recipe
    from dynaflip_adapt.models.backbone import Backbone, BackboneConfig
    from dynaflip_adapt.models.flow_encoder import DELTA_SCALE
    from dynaflip_adapt.train.pretrain import POSITION_SCALE, point_losses

    torch.manual_seed(0)
    model = Backbone(BackboneConfig(32, 8, 16, 1, 2, 2.0, 8, "hashed", 8, 16, point_heads=True))
    weights = load_recipe("pretrain/spatial")[0].loss
    B, P = 3, 5
    tokens = torch.randn(2 * B, 17, 16)
    pts, delta = torch.randn(B, P, 3), torch.randn(B, P, 3) * 0.01
    mask = torch.rand(B, P) > 0.3
    mask[:, 0] = True
    has = torch.tensor([True, True, False])
    uv = torch.rand(B, P, 2) * 2 - 1
    batch = {"flow_points": pts, "flow_delta": delta, "flow_mask": mask, "flow_pixels": uv,
             "flow_has_pixels": has}  # fmt: skip
    got = point_losses(model, tokens, batch, weights)
    # Independently, item by item, over the items whose flow has pixels.
    num_p = num_m = den = 0.0
    for i in range(B):
        if not has[i]:
            continue
        m = mask[i]
        centre = pts[i][m].mean(0)
        t0 = model.point_tokens(tokens[i : i + 1], uv[i : i + 1])[0]
        t1 = model.point_tokens(tokens[B + i : B + i + 1], uv[i : i + 1])[0]
        with torch.no_grad():
            pos = model.point_position(t0)
            mot = model.point_motion(torch.cat([t0, t1 - t0], -1))
        num_p += float((((pos - (pts[i] - centre) / POSITION_SCALE) ** 2)[m]).sum())
        num_m += float((((mot - delta[i] * DELTA_SCALE) ** 2)[m]).sum())
        den += 3 * float(m.sum())
    assert float(got["point_position"]) == pytest.approx(num_p / den, rel=1e-5)
    assert float(got["point_motion"]) == pytest.approx(num_m / den, rel=1e-5)


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_grouped_sampler_batches_hold_whole_chunks_of_one_group(epoch):
    """The property the grouped batches exist for, which a sampler ignoring `groups` breaks:
    with group sizes that are multiples of the chunk, every aligned chunk of the stream is one
    group; otherwise the group changes at most (number of chunks - 1) times per epoch (a random
    permutation of these 21 pairs changes group ~14 times)."""
    import itertools
    import math

    from dynaflip_adapt.train.common import ResumableSampler

    groups = [0] * 8 + [1] * 4 + [2] * 12
    stream = list(itertools.islice(iter(ResumableSampler(24, seed=5, groups=groups, chunk=4)), 72))
    ep = stream[24 * epoch : 24 * (epoch + 1)]
    assert sorted(ep) == list(range(24))
    for k in range(0, 24, 4):
        assert len({groups[i] for i in ep[k : k + 4]}) == 1, (k, ep[k : k + 4])

    uneven = [0] * 7 + [1] * 5 + [2] * 9
    s = list(itertools.islice(iter(ResumableSampler(21, seed=3, groups=uneven, chunk=4)), 63))
    ep = s[21 * epoch : 21 * (epoch + 1)]
    switches = sum(uneven[a] != uneven[b] for a, b in itertools.pairwise(ep))
    chunks = sum(math.ceil(uneven.count(g) / 4) for g in (0, 1, 2))
    assert switches <= chunks - 1


def test_token_invariance_is_zero_for_the_frame_itself_and_relative_to_the_token_spread():
    from dynaflip_adapt.train.pretrain import token_invariance

    g = torch.Generator().manual_seed(0)
    own = torch.randn(4, 5, 6, generator=g) * 3.0
    assert float(token_invariance(own.clone(), own)) == 0.0
    view = own + torch.randn(4, 5, 6, generator=g)
    spread = own.reshape(-1, 6).var(dim=0).mean()  # per channel over batch and positions
    want = float(((view - own) ** 2).mean() / spread)
    assert float(token_invariance(view, own)) == pytest.approx(want, rel=1e-5)
    # Scaling both by c leaves it unchanged (relative to the spread); the target gets no
    # gradient, the view does.
    assert float(token_invariance(2 * view, 2 * own)) == pytest.approx(want, rel=1e-5)
    v, o = view.clone().requires_grad_(), own.clone().requires_grad_()
    token_invariance(v, o).backward()
    assert o.grad is None and v.grad is not None and float(v.grad.abs().sum()) > 0


def test_pretraining_with_token_invariance_holds_relit_tokens_and_resumes_bit_for_bit(
    logs, tmp_path
):
    """The term trains (it is in the losses, and a run with it moves relit copies' tokens
    closer to their frames' than the same run without it), and its relit copies are drawn
    without touching the global RNG: a resumed run gives the same backbone."""
    from dynaflip_adapt.train.augment import appearance_views
    from dynaflip_adapt.train.pretrain import token_invariance

    extra = ["loss.token_invariance=5.0", "optim.max_steps=12", "optim.lr=3e-3"]
    rec = _recipe(extra)
    res = pretrain(open_logs(logs), rec, tmp_path / "a")
    assert all("token_invariance" in h for h in res.history)

    def crash(step, _metrics):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(open_logs(logs), rec, tmp_path / "b", on_step=crash)
    resumed = pretrain(open_logs(logs), rec, tmp_path / "b", resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in res.history[5:]]
    wa, wb = _weights(res.bundle), _weights(resumed.bundle)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    without = pretrain(open_logs(logs), _recipe(["optim.max_steps=12", "optim.lr=3e-3"]),
                       tmp_path / "c")  # fmt: skip

    def relit_gap(bundle_path):
        b = load_bundle(bundle_path)
        frames = b.replay["rgb0"]
        view = appearance_views(frames, frames, seed=123)
        with torch.no_grad():
            own = b.model.image.tokens(b.model.preprocess(frames))
            relit = b.model.image.tokens(b.model.preprocess(view))
        return float(token_invariance(relit, own))

    assert relit_gap(res.bundle) < relit_gap(without.bundle)
