"""The drift score: MMD^2 against an explicit double sum, the token-map signature, the
episode-level null, and `monitor` end to end (fits / adapt / refused) on simulator logs."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dynaflip_adapt.eval.drift import (
    GRID,
    Signature,
    action_drift,
    drift_score,
    median_distance,
    mmd2,
    token_maps,
)
from dynaflip_adapt.models.vit import VisionTransformer


def _mmd2_by_loops(x: torch.Tensor, y: torch.Tensor, bw: float) -> float:
    """The unbiased estimator written as its definition: mean kernel over distinct pairs."""

    def k(a: torch.Tensor, b: torch.Tensor) -> float:
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * bw * bw))

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd2_is_the_unbiased_estimator():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) + 0.5
    assert mmd2(x, y, 1.3) == pytest.approx(_mmd2_by_loops(x, y, 1.3), abs=1e-6)
    # Same distribution: near 0 (unbiased: either sign); shifted: clearly positive.
    a, b = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    assert abs(mmd2(a, b, 2.0)) < 0.01
    assert mmd2(a, b + 1.0, 2.0) > 0.1
    with pytest.raises(ValueError):
        mmd2(x[:1], y, 1.0)


def test_action_drift_is_mmd2_in_action_std_units():
    g = torch.Generator().manual_seed(2)
    scale = torch.tensor([0.5, 4.0])
    ref, new = torch.randn(6, 2, generator=g) * scale, torch.randn(5, 2, generator=g) * scale
    # By hand: divide by the scale, bandwidth = the median distance between reference rows.
    r, n = ref / scale, new / scale
    bw = sorted(float((r[i] - r[j]).norm()) for i, j in itertools.combinations(range(6), 2))[7]
    assert action_drift(ref, new, scale) == pytest.approx(_mmd2_by_loops(r, n, bw), abs=1e-6)
    # Units: the same actions in other units (and their std) give the same drift.
    assert action_drift(3 * ref, 3 * new, 3 * scale) == pytest.approx(
        action_drift(ref, new, scale), abs=1e-6
    )
    # A policy whose actions moved by one std reads far above one whose actions did not.
    big = torch.randn(300, 2, generator=g) * scale
    moved, still = big + scale, torch.randn(300, 2, generator=g) * scale
    assert action_drift(big, moved, scale) > 10 * abs(action_drift(big, still, scale))


def test_median_distance_of_distinct_pairs():
    x = torch.tensor([[0.0], [1.0], [3.0]])  # distances 1, 3, 2
    assert median_distance(x) == pytest.approx(2.0)


def test_token_maps_pool_the_patch_grid_and_signature_standardises():
    vit = VisionTransformer(32, 8, 16, 1, 2, 2.0).eval()  # 4 x 4 patches, width 16
    frames = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)

    def pre(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    maps = token_maps(vit, pre, frames, batch=4)
    assert maps.shape == (6, GRID * GRID * 16)
    with torch.no_grad():
        tokens = vit(pre(frames), all_tokens=True)[:, 1:]  # (6, 16 patches, 16)
    # A 4 x 4 grid pooled to 4 x 4 is the grid itself, channel-major.
    torch.testing.assert_close(maps, tokens.transpose(1, 2).flatten(1))
    sig = Signature.fit(maps, dims=8)
    z = (maps - maps.mean(0)) / sig.scale
    torch.testing.assert_close(sig(maps), z @ sig.projection)
    assert sig.projection.shape == (maps.shape[1], 8)


def test_drift_score_null_splits_the_reference_by_episode():
    g = torch.Generator().manual_seed(1)
    # 20 episodes of 8 frames; each episode has its own offset (frames within one correlate).
    offsets = torch.randn(20, 1, 12, generator=g)
    ref = (offsets + 0.1 * torch.randn(20, 8, 12, generator=g)).reshape(160, 12)
    episodes = torch.arange(20).repeat_interleave(8)
    same = torch.randn(20, 1, 12, generator=g) + 0.1 * torch.randn(20, 8, 12, generator=g)
    shifted = same + 1.5
    a = drift_score(ref, episodes, same.reshape(160, 12), splits=40)
    b = drift_score(ref, episodes, shifted.reshape(160, 12), splits=40)
    assert a.reference_episodes == 20 and a.new_frames == 160
    assert b.score > 5 * a.score and b.score > b.null_q95 and b.p_value < 0.05
    # Frame-level splits would put correlated frames on both sides: a smaller null.
    frames = drift_score(ref, torch.arange(160), same.reshape(160, 12), splits=40)
    assert frames.null_q95 < a.null_q95


needs_sim = pytest.mark.skipif(
    importlib.util.find_spec("mujoco") is None, reason="needs the sim extra"
)


@needs_sim
@pytest.mark.slow
def test_monitor_reads_new_episodes_as_fitting_and_a_shifted_site_as_drift(tmp_path):
    from dynaflip_adapt.cli.app import app

    runner = CliRunner()
    logs = {}
    for name, site, seed in (("ref", "base", 1), ("same", "base", 2), ("night", "night_shift", 3)):
        logs[name] = str(tmp_path / f"{name}.h5")
        r = runner.invoke(app, ["sim", "generate", logs[name], "--site", site, "-n", "16",
                                "--size", "64", "--workers", "1", "--seed", str(seed)])  # fmt: skip
        assert r.exit_code == 0, r.output

    def monitor(name, *extra):
        return runner.invoke(app, ["monitor", logs[name], "--site", "lab", *extra, "--json"])

    # A policy pinned at the site: its actions are the second signal.
    r = runner.invoke(app, ["policies", "train", logs["ref"], "--site", "lab", "--name", "lab-bc",
                            "--steps", "60", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    # A site never adapted needs the frames its encoder is known to fit: one line, exit 2.
    r = monitor("same")
    assert r.exit_code == 2 and "--reference" in r.stderr and len(r.stderr.splitlines()) == 1
    fits = monitor("same", "--reference", logs["ref"])
    assert fits.exit_code == 0, fits.output
    drift = monitor("night", "--reference", logs["ref"])
    assert drift.exit_code == 1, drift.output
    a, b = json.loads(fits.stdout), json.loads(drift.stdout)
    assert a["verdict"] == "fits" and b["verdict"] == "adapt"
    assert b["score"] > 10 * max(a["score"], 1e-3)
    assert a["signals"] == [] and b["signals"][0] == "tokens"
    assert set(a["actions"]) == set(b["actions"]) == {"lab-bc"}
    assert b["actions"]["lab-bc"] > a["actions"]["lab-bc"]
    # Either signal decides: with the token threshold out of reach, the action threshold alone
    # reads the shifted logs as drift (exit 1, named); and switched off there is no action score.
    only = [
        "--set",
        "drift.threshold=1000",
        "--set",
        f"actions.threshold={b['actions']['lab-bc'] / 2}",
    ]
    r = monitor("night", "--reference", logs["ref"], *only)
    assert r.exit_code == 1 and json.loads(r.stdout)["signals"] == ["actions"], r.output
    off = json.loads(monitor("same", "--reference", logs["ref"], "--set",
                             "actions.enabled=false").stdout)  # fmt: skip
    assert off["actions"] == {} and off["action_threshold"] is None
    # A reference this small (a few episodes) is flagged: the default threshold assumes 300.
    assert any(f"has {a['reference_episodes']} episodes" in n for n in a["notes"]), a["notes"]
    # The threshold is the recipe's: a recipe file (or --set) above the shifted score reads
    # the same logs as fitting, and the run records the recipe it used.
    mine = tmp_path / "lenient.yaml"
    act = 2 * b["actions"]["lab-bc"]
    mine.write_text(f"kind: monitor\ndrift:\n  threshold: {2 * b['score']}\n"
                    f"actions:\n  threshold: {act}\n")  # fmt: skip
    for extra in (["--recipe", str(mine)], ["--set", f"drift.threshold={2 * b['score']}",
                                            "--set", f"actions.threshold={act}"]):  # fmt: skip
        lenient = monitor("night", "--reference", logs["ref"], *extra)
        assert lenient.exit_code == 0, lenient.output
        assert json.loads(lenient.stdout)["threshold"] == pytest.approx(2 * b["score"])
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    run = Registry(resolve_store()).client.get_run(b["mlflow_run"])
    assert run.data.tags["site"] == "lab" and run.data.tags["verdict"] == "adapt"
    assert run.data.metrics["drift.score"] == pytest.approx(b["score"], rel=1e-5)
    # Once the site has a production adapter, its training logs are the reference.
    r = runner.invoke(app, ["finetune", logs["ref"], "--site", "lab", "--steps", "2", "--set",
                            "data.num_workers=0", "--set", "optim.batch_size=4", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    version = json.loads(r.stdout)["adapter"]["version"]
    r = runner.invoke(app, ["promote", version, "--site", "lab", "--allow-unaudited"])
    assert r.exit_code == 0, r.output
    adapted = monitor("night")
    assert adapted.exit_code == 1, adapted.output
    out = json.loads(adapted.stdout)
    assert (
        out["encoder"] == f"adapter v{version} (prod-lab)" and "training logs" in out["reference"]
    )
    # Its training logs gone: the probe frames it keeps, said in a note.
    (tmp_path / "ref.h5").unlink()
    out = json.loads(monitor("same").stdout)
    assert "probe frames" in out["reference"]
    assert any("training logs are gone" in n for n in out["notes"]), out["notes"]


def test_monitor_bad_input_is_one_line_and_writes_nothing(tmp_path):
    """A threshold <= 0, a logs file that is not HDF5, and a site never adapted without a
    reference: exit 2, one line naming the option or file, and no MLflow run."""
    from dynaflip_adapt.cli.app import app
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store
    from tests.builders import write_native

    logs, _ = write_native(tmp_path / "site.h5", n=2)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    runner = CliRunner()
    cases = [
        ([str(logs), "--site", "lab", "--threshold", "0", "--reference", str(logs)], "--threshold"),
        ([str(junk), "--site", "lab", "--reference", str(logs)], "junk.h5"),
        ([str(logs), "--site", "lab"], "--reference"),
        ([str(logs), "--site", "lab", "--set", "drift.threshold=-1", "--reference", str(logs)],
         "drift.threshold"),
        ([str(logs), "--site", "lab", "--recipe", "finetune/default", "--reference", str(logs)],
         "kind"),
    ]  # fmt: skip
    for args, named in cases:
        r = runner.invoke(app, ["monitor", *args])
        assert r.exit_code == 2, r.output
        assert named in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    client = Registry(resolve_store()).client
    assert client.get_experiment_by_name("dynaflip-monitor") is None
