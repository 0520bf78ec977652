"""Retrieval hits and episode-bootstrap intervals against hand computations and closed forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynaflip_adapt.eval.retrieval import (
    METRICS,
    RetrievalReport,
    cluster_bootstrap,
    margin_cell,
    paired_difference,
    topk_accuracy,
    topk_hits,
)


def test_topk_hits_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.4], [0.0, 0.8, 0.1]])
    target = torch.tensor([2, 0, 1])
    # row 0 ranks 0, 2, 1; row 1 ranks 2, 1, 0; row 2 ranks 1, 2, 0.
    assert topk_hits(sim, target, 1).tolist() == [False, False, True]
    assert topk_hits(sim, target, 2).tolist() == [True, False, True]
    assert topk_hits(sim, target, 5).tolist() == [True, True, True]  # k capped at the gallery
    assert topk_accuracy(sim, target, 2) == pytest.approx(2 / 3)


def test_constant_values_give_a_zero_width_interval():
    assert cluster_bootstrap(np.full(30, 0.25), np.arange(30) // 3) == (0.25, 0.25, 0.25)


def test_resamples_weight_clusters_by_their_size():
    # Clusters {1} and {0, 0, 0}. Drawing two clusters: A twice (p 1/4) -> mean 1; B twice (1/4)
    # -> 0; one of each (1/2) -> 1/4 of the pooled triplets (not 1/2, the mean of cluster means).
    values, clusters = np.array([1.0, 0, 0, 0]), np.array([7, 3, 3, 3])
    mean, lo, hi = cluster_bootstrap(values, clusters, level=0.4, reps=20000)
    assert mean == 0.25 and lo == hi == 0.25  # the 30% and 70% quantiles sit on the 1/2 atom
    _, lo, hi = cluster_bootstrap(values, clusters, level=0.95, reps=20000)
    assert (lo, hi) == (0.0, 1.0)


def test_one_value_per_cluster_matches_the_normal_interval_of_a_proportion():
    rng = np.random.default_rng(1)
    n, p = 3000, 0.3
    x = (rng.random(n) < p).astype(float)
    mean, lo, hi = cluster_bootstrap(x, np.arange(n))
    half = 1.96 * np.sqrt(mean * (1 - mean) / n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert lo < mean < hi


def test_correlated_triplets_widen_the_interval():
    # 60 episodes, each 5 identical triplets: the interval is the 60 episodes' interval, wider
    # by about sqrt(5) than if the 300 triplets were independent.
    rng = np.random.default_rng(2)
    per_episode = (rng.random(60) < 0.4).astype(float)
    values = np.repeat(per_episode, 5)
    episodes = np.repeat(np.arange(60), 5)
    clustered = cluster_bootstrap(values, episodes)
    assert clustered == cluster_bootstrap(per_episode, np.arange(60))
    naive = cluster_bootstrap(values, np.arange(300))
    ratio = (clustered[2] - clustered[1]) / (naive[2] - naive[1])
    assert 1.7 < ratio < 2.8


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="must be equal"):
        cluster_bootstrap(np.ones(4), np.arange(3))
    with pytest.raises(ValueError, match="non-empty"):
        cluster_bootstrap(np.ones(0), np.arange(0))


def _report(name, hits, clusters):
    return RetrievalReport(
        name=name,
        triplets=len(clusters),
        instructions=3,
        **{m: float(np.mean(hits)) for m in METRICS},
        mean_area=0.1,
        chance_flow_top1=1 / len(clusters),
        chance_lang_top1=1 / 3,
        episodes=len(set(clusters.tolist())),
        hits={m: np.asarray(hits, bool) for m in METRICS},
        clusters=clusters,
    )


def test_paired_difference():
    clusters = np.repeat(np.arange(10), 4)
    hits = np.tile([True, False, True, False], 10)
    a = _report("a", hits, clusters)
    assert paired_difference(a, a, "img_to_lang_top1") == (0.0, 0.0, 0.0)
    fewer = hits.copy()
    fewer[0] = False
    d, lo, hi = paired_difference(a, _report("b", fewer, clusters), "img_to_lang_top5")
    assert d == pytest.approx(1 / 40) and 0.0 <= lo <= d <= hi
    # Every difference sits in episode 0, so resamples without it see none: lo is 0.
    assert lo == 0.0
    with pytest.raises(ValueError, match="same triplets"):
        paired_difference(a, _report("c", hits, np.repeat(np.arange(20), 2)), "img_to_flow_top1")


def test_report_serialises_with_its_intervals():
    clusters = np.repeat(np.arange(10), 4)
    rep = _report("a", np.tile([True, False], 20), clusters)
    out = json.loads(json.dumps(rep.to_dict()))
    assert out["episodes"] == 10 and "hits" not in out and "clusters" not in out
    for m in METRICS:
        lo, hi = out["ci95"][m]
        assert lo <= out[m] <= hi


def test_margin_cell_marks_intervals_that_exclude_zero_on_either_side():
    row = {"up": [0.1, 0.05, 0.2], "down": [-0.1, -0.2, -0.01], "touch": [0.04, 0.0, 0.08]}
    assert margin_cell(row, "up") == ("+0.100 [+0.050, +0.200]", True)
    assert margin_cell(row, "down") == ("-0.100 [-0.200, -0.010]", True)
    assert margin_cell(row, "touch") == ("+0.040 [+0.000, +0.080]", False)
