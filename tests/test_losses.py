"""Losses against closed forms and fp64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynaflip_adapt.losses import (
    area_infonce,
    bct_influence,
    cosine_infonce,
    cosine_regularizer,
    gram_area,
    masked_mse,
    pairwise_area,
    triangle_area,
    vocabulary_infonce,
)


def _unit(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def test_known_triangles():
    e = torch.eye(3)
    # The three unit axes: an equilateral triangle with side sqrt(2): area sqrt(3)/2.
    assert triangle_area(e[:1], e[1:2], e[2:3]).item() == pytest.approx(math.sqrt(3) / 2, rel=1e-6)
    # Right triangle with legs 3 and 4 (not on the sphere: the edge form works anywhere).
    a, b, c = torch.tensor([[0.0, 0, 0]]), torch.tensor([[3.0, 0, 0]]), torch.tensor([[0.0, 4, 0]])
    assert triangle_area(a, b, c).item() == pytest.approx(6.0, rel=1e-6)


def test_matches_gram_determinant_in_fp64():
    a, b, c = (_unit(64, 16, seed=s, dtype=torch.float64) for s in (1, 2, 3))
    torch.testing.assert_close(triangle_area(a, b, c), gram_area(a, b, c), rtol=1e-9, atol=1e-9)


def test_fp32_edge_form_tracks_fp64_near_alignment():
    a = _unit(32, 16, seed=4, dtype=torch.float64)
    b = F.normalize(a + 1e-2 * _unit(32, 16, seed=5, dtype=torch.float64), dim=-1)
    c = F.normalize(a + 1e-2 * _unit(32, 16, seed=6, dtype=torch.float64), dim=-1)
    ref = gram_area(a, b, c)
    got = triangle_area(a.float(), b.float(), c.float()).double()
    assert ref.min().item() > 1e-5  # tiny, but above the clamp floor 0.5 * sqrt(1e-12)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0.0)
    # Below the floor the clamp takes over: areas read as 5e-7, never 0, gradients stay finite.
    tiny = triangle_area(a[:1].float(), a[:1].float(), a[:1].float())
    assert tiny.item() == pytest.approx(0.5 * math.sqrt(1e-12))


@pytest.mark.parametrize("case", ["two", "three"])
def test_gradients_are_finite_when_vertices_coincide(case):
    a = _unit(4, 8, seed=7).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    c = (a.detach().clone() if case == "three" else _unit(4, 8, seed=8)).requires_grad_(True)
    area = triangle_area(a, b, c)
    area.sum().backward()
    for t in (a, b, c):
        assert torch.isfinite(t.grad).all()
    assert area.max().item() < 1e-5


def test_invariant_to_a_shared_rotation():
    a, b, c = (_unit(16, 8, seed=s, dtype=torch.float64) for s in (9, 10, 11))
    q, _ = torch.linalg.qr(
        torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    )
    torch.testing.assert_close(triangle_area(a @ q, b @ q, c @ q), triangle_area(a, b, c))
    torch.testing.assert_close(pairwise_area(a @ q, b @ q, c @ q), pairwise_area(a, b, c))


def test_pairwise_area_equals_explicit_triangles():
    a, b, c = (_unit(6, 5, seed=s) for s in (12, 13, 14))
    E = pairwise_area(a, b, c)
    for i in range(6):
        for j in range(6):
            assert E[i, j].item() == pytest.approx(
                triangle_area(a[i : i + 1], b[j : j + 1], c[j : j + 1]).item(), abs=1e-5
            )


def test_infonce_equals_a_hand_computation():
    a, b, c = (_unit(3, 4, seed=s, dtype=torch.float64) for s in (15, 16, 17))
    scale = torch.tensor(math.log(10.0), dtype=torch.float64)
    got = area_infonce(a, b, c, scale, label_smoothing=0.0)
    # By hand: rows are images, columns the (language, flow) pairs.
    E = [
        [triangle_area(a[i : i + 1], b[j : j + 1], c[j : j + 1]).item() for j in range(3)]
        for i in range(3)
    ]

    def ce(rows):
        total = 0.0
        for i, row in enumerate(rows):
            logits = [-10.0 * e for e in row]
            m = max(logits)
            lse = m + math.log(sum(math.exp(x - m) for x in logits))
            total += lse - logits[i]
        return total / len(rows)

    cols = [[E[i][j] for i in range(3)] for j in range(3)]
    expected = 0.5 * (ce(E) + ce(cols))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_infonce_with_label_smoothing_matches_torch_definition():
    a, b, c = (_unit(5, 4, seed=s) for s in (18, 19, 20))
    scale = torch.tensor(2.0)
    logits = -pairwise_area(a, b, c) * math.exp(2.0)
    t = torch.arange(5)
    ref = 0.5 * (
        F.cross_entropy(logits, t, label_smoothing=0.1)
        + F.cross_entropy(logits.T, t, label_smoothing=0.1)
    )
    assert area_infonce(a, b, c, scale, 0.1).item() == pytest.approx(ref.item(), rel=1e-6)


def test_coinciding_anchors_make_every_triangle_degenerate():
    # Why the anti-degeneracy margin exists: with b == c the energy ignores the image entirely.
    a = _unit(6, 8, seed=32)
    b = _unit(6, 8, seed=33)
    E = pairwise_area(a, b, b)
    assert E.max().item() < 1e-3


def test_perfect_alignment_beats_random():
    a = _unit(16, 32, seed=21)
    # b and c near a but distinct: with b_j == c_j every triangle would be degenerate (area 0).
    b = F.normalize(a + 0.1 * _unit(16, 32, seed=29), dim=-1)
    c = F.normalize(a + 0.1 * _unit(16, 32, seed=30), dim=-1)
    aligned = area_infonce(a, b, c, torch.tensor(math.log(20.0)), 0.0)
    shuffled = area_infonce(
        a, _unit(16, 32, seed=22), _unit(16, 32, seed=23), torch.tensor(math.log(20.0)), 0.0
    )
    assert aligned.item() < 0.5 * shuffled.item()


def test_cosine_terms():
    b = _unit(8, 4, seed=24)
    assert cosine_regularizer(b, b).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_regularizer(b, -b).item() == pytest.approx(2.0, abs=1e-6)
    # With a margin it penalises only pairs closer than the margin (anti-degeneracy).
    assert cosine_regularizer(b, b, margin=0.5).item() == pytest.approx(0.5, abs=1e-6)
    assert cosine_regularizer(b, -b, margin=0.5).item() == pytest.approx(0.0, abs=1e-6)
    c = _unit(8, 4, seed=31)
    cos = F.cosine_similarity(b, c, dim=-1)
    assert cosine_regularizer(b, c, margin=0.1).item() == pytest.approx(
        F.relu(cos - 0.1).mean().item(), abs=1e-6
    )
    x = _unit(8, 4, seed=25)
    loss = cosine_infonce(x, x, torch.tensor(math.log(100.0)))
    assert loss.item() < 0.1


def test_masked_mse_ignores_masked_points():
    pred = torch.zeros(2, 3, 3)
    target = torch.ones(2, 3, 3)
    target[0, 0] = 100.0
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.0)


def test_bf16_inputs_are_computed_in_fp32():
    """bf16 inputs (autocast) are upcast before the arithmetic, not after: the result matches
    the fp64 Gram-determinant area of the same (bf16-rounded) vectors to fp32 precision. Doing
    the sums in bf16 and casting the result (8 mantissa bits) misses by ~1e-2 relative."""
    a, b, c = (_unit(64, 128, seed=s) for s in (26, 27, 28))
    a16, b16, c16 = a.bfloat16(), b.bfloat16(), c.bfloat16()
    out = triangle_area(a16, b16, c16)
    assert out.dtype == torch.float32
    ref = gram_area(a16.double(), b16.double(), c16.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    u, v = b16 - a16, c16 - a16  # what bf16 arithmetic gives
    in_bf16 = 0.5 * torch.sqrt((u * u).sum(-1) * (v * v).sum(-1) - ((u * v).sum(-1)) ** 2)
    assert float((in_bf16.double() - ref).abs().max()) > 1e-4  # the check can tell them apart


def _tiny_backbone_and_batch(seed: int, text_ids: torch.Tensor):
    """A 16x16 backbone (eval mode) and a random triplet batch with instruction ids `text_ids`,
    drawn from `seed`."""
    from dynaflip_adapt.models.backbone import Backbone, BackboneConfig

    torch.manual_seed(seed)
    cfg = BackboneConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2, embed_dim=8,
                         text_encoder="hashed", flow_points=8, flow_width=8)  # fmt: skip
    model = Backbone(cfg).eval()
    B = len(text_ids)
    batch = {
        "rgb0": torch.randint(0, 255, (B, 3, 16, 16), dtype=torch.uint8),
        "rgb1": torch.randint(0, 255, (B, 3, 16, 16), dtype=torch.uint8),
        "text": text_ids,
        "flow_points": torch.randn(B, 8, 3),
        "flow_delta": 0.01 * torch.randn(B, 8, 3),
        "flow_mask": torch.ones(B, 8, dtype=torch.bool),
    }
    return model, batch


def test_temporal_term_in_feature_space_is_infonce_on_the_encoder_outputs():
    """temporal_space=features: symmetric InfoNCE of frames t and t+k on the image encoder's own
    features (hand-computed here), not through the single-frame head."""
    from dynaflip_adapt.config import PretrainLoss
    from dynaflip_adapt.train.pretrain import trimodal_losses

    B = 5
    model, batch = _tiny_backbone_and_batch(0, torch.arange(B) % 3)
    text = torch.randn(3, 384)
    with torch.no_grad():
        _, feat = trimodal_losses(
            model, batch, text, PretrainLoss(temporal=1.0, temporal_space="features")
        )
        _, head = trimodal_losses(model, batch, text, PretrainLoss(temporal=1.0))
        f0 = F.normalize(model.features(batch["rgb0"]), dim=-1).double()
        f1 = F.normalize(model.features(batch["rgb1"]), dim=-1).double()
        logits = f0 @ f1.T * math.exp(float(model.temporal_scale))
    target = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    assert feat["temporal"] == pytest.approx(float(expected), rel=1e-5)
    assert abs(head["temporal"] - feat["temporal"]) > 1e-4


def test_vocabulary_infonce_equals_a_hand_computation():
    """Each query against every instruction (not the batch), duplicates in the batch allowed."""
    x = _unit(4, 6, seed=40, dtype=torch.float64)
    vocab = 3.0 * _unit(3, 6, seed=41, dtype=torch.float64)  # not unit: the loss normalizes
    target = torch.tensor([2, 0, 2, 1])  # instruction 2 twice: both are positives
    got = vocabulary_infonce(x, vocab, target, torch.tensor(math.log(5.0)), 0.0)
    v = vocab / vocab.norm(dim=-1, keepdim=True)
    total = 0.0
    for i in range(4):
        logits = [5.0 * float(x[i] @ v[k]) for k in range(3)]
        total += math.log(sum(math.exp(z) for z in logits)) - logits[int(target[i])]
    assert got.item() == pytest.approx(total / 4, rel=1e-9)
    # A query on its instruction beats one on another.
    aligned = vocabulary_infonce(v[target], vocab, target, torch.tensor(math.log(20.0)))
    wrong = vocabulary_infonce(v[(target + 1) % 3], vocab, target, torch.tensor(math.log(20.0)))
    assert aligned.item() < wrong.item()


def test_pairwise_term_is_image_flow_and_image_instruction_infonce():
    """loss.pairwise: the mean of in-batch cosine InfoNCE (transition <-> flow) and the
    instruction-vocabulary InfoNCE of the transition, recomputed here from the embeddings."""
    from dynaflip_adapt.config import PretrainLoss
    from dynaflip_adapt.models.flow_encoder import flow_features
    from dynaflip_adapt.train.pretrain import trimodal_losses

    B = 6
    model, batch = _tiny_backbone_and_batch(1, torch.tensor([0, 1, 1, 2, 0, 2]))
    text = torch.randn(3, 384)
    with torch.no_grad():
        _, parts = trimodal_losses(
            model, batch, text, PretrainLoss(pairwise=1.0, label_smoothing=0)
        )
        _, off = trimodal_losses(model, batch, text, PretrainLoss(label_smoothing=0))
        f0, f1 = model.features(batch["rgb0"]), model.features(batch["rgb1"])
        a = model.embed_transition(f0, f1).double()
        feats = flow_features(batch["flow_points"], batch["flow_delta"], batch["flow_mask"])
        c = model.embed_flow(feats, batch["flow_mask"]).double()
        vocab = model.embed_text(text).double()
        s = math.exp(float(model.logit_scale))
    t = torch.arange(B)
    flow = 0.5 * (F.cross_entropy(s * a @ c.T, t) + F.cross_entropy(s * c @ a.T, t))
    lang = F.cross_entropy(s * a @ vocab.T, batch["text"])
    assert parts["pairwise"] == pytest.approx(float(0.5 * (flow + lang)), rel=1e-5)
    assert "pairwise" not in off


def test_bct_influence_is_cross_entropy_over_scaled_cosines():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    targets = torch.tensor([2, 0, 3])
    got = bct_influence(q, gal, targets, 0.1)
    # By hand: cosines, then -log softmax of each query's target entry.
    want = 0.0
    for i in range(3):
        cos = [float(q[i] @ gal[j] / (q[i].norm() * gal[j].norm())) for j in range(4)]
        z = [c / 0.1 for c in cos]
        want += -(z[int(targets[i])] - math.log(sum(math.exp(v) for v in z))) / 3
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Queries equal to their targets in a gallery of orthogonal entries: near zero at a low
    # temperature.
    eye = torch.eye(4)
    assert float(bct_influence(eye[[1, 3]], eye, torch.tensor([1, 3]), 0.01)) < 1e-6
