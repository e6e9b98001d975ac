"""Margin, disagreement/agreement, generator and student losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from granq_search.config import GeneratorConfig, LossConfig
from granq_search.generator import build_generator
from granq_search.losses import (
    bn_stats_recorder,
    bns_loss,
    disagreement_agreement_loss,
    entropy_student_loss,
    generator_loss,
    kl_student_loss,
    margin_loss,
    normalized_entropy,
    softmax_entropy,
    student_loss,
)


def _entropy(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return -sum((v / s) * math.log(v / s) for v in e)


def _margin_by_hand(d_rows, lam_l, lam_u):
    h = [_entropy(r) for r in d_rows]
    c = len(d_rows[0])
    hmin = min(h)
    hn = [(v - hmin) / (math.log(c) - hmin) for v in h]
    return (sum(max(lam_l - v, 0.0) for v in hn) / len(hn)
            + sum(max(v - lam_u, 0.0) for v in hn) / len(hn))


def test_margin_three_samples_by_hand():
    z_t = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.0, 0.1], [5.0, -3.0, 0.0, 1.0]],
                       dtype=torch.float64)
    z_s = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]],
                       dtype=torch.float64)
    d = (z_t - z_s).tolist()
    for lam_l, lam_u in [(0.1, 0.8), (0.4, 0.8), (0.9, 0.95), (0.0, 0.5)]:
        expect = _margin_by_hand(d, lam_l, lam_u)
        got = margin_loss(z_t, z_s, lam_l, lam_u)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expect, rel=1e-12, abs=1e-12)
    # the sample with the lowest entropy maps to 0, the near-uniform one close to 1
    hn = normalized_entropy(z_t - z_s)
    assert hn[2].item() == 0.0 and 0.9 < hn[1].item() <= 1.0


def test_margin_batch_one_is_lambda_l_without_gradient():
    z_t = torch.randn(1, 5, requires_grad=True)
    z_s = torch.randn(1, 5)
    loss = margin_loss(z_t, z_s, 0.3, 0.8)
    assert loss.item() == pytest.approx(0.3)
    loss.backward()
    assert torch.all(z_t.grad == 0)


def test_margin_all_uniform_is_guarded():
    z = torch.zeros(4, 10)
    hn = normalized_entropy(z)
    assert torch.all(hn == 0)
    assert margin_loss(z, z, 0.1, 0.8).item() == pytest.approx(0.1)
    assert torch.isfinite(margin_loss(torch.zeros(3, 1), torch.zeros(3, 1), 0.1, 0.8))


@pytest.mark.parametrize("n", [7, 200, 13])
def test_margin_any_batch_size(n):
    torch.manual_seed(n)
    z_t = torch.randn(n, 10, dtype=torch.float64) * 3
    z_s = torch.randn(n, 10, dtype=torch.float64)
    expect = _margin_by_hand((z_t - z_s).tolist(), 0.1, 0.8)
    assert margin_loss(z_t, z_s, 0.1, 0.8).item() == pytest.approx(expect, rel=1e-10)
    hn = normalized_entropy(z_t - z_s)
    assert hn.min().item() == 0.0 and hn.max().item() <= 1.0


def test_entropy_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]])
    h = softmax_entropy(logits)
    assert torch.isfinite(h).all()
    assert h[0].item() == pytest.approx(0.0, abs=1e-6)
    assert h[1].item() == pytest.approx(math.log(3), rel=1e-6)


def test_ce_parts_match_cross_entropy():
    torch.manual_seed(0)
    z_t, z_s = torch.randn(9, 6), torch.randn(9, 6)
    y = torch.randint(0, 6, (9,))
    got = disagreement_agreement_loss(z_t, z_s, y, 0.2, 0.1)
    expect = 0.2 * F.cross_entropy(z_t - z_s, y) + 0.1 * F.cross_entropy(z_t + z_s, y)
    assert torch.allclose(got, expect)
    assert torch.allclose(disagreement_agreement_loss(z_t, z_s, y, 1.0, 0.0), F.cross_entropy(z_t - z_s, y))
    assert torch.allclose(disagreement_agreement_loss(z_t, z_s, y, 0.0, 1.0), F.cross_entropy(z_t + z_s, y))


def test_generator_loss_weighting_and_parts():
    torch.manual_seed(0)
    z_t, z_s = torch.randn(8, 5), torch.randn(8, 5)
    y = torch.randint(0, 5, (8,))
    bn = torch.tensor(0.7)
    cfg = LossConfig(beta=0.0, gamma=0.0)
    total, parts = generator_loss(z_t, z_s, y, bn, cfg)
    margin = margin_loss(z_t, z_s, cfg.lambda_l, cfg.lambda_u)
    assert torch.allclose(total, margin)
    assert set(parts) == {"g_total", "g_margin", "g_ce", "g_bns"}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["g_bns"] == pytest.approx(0.7) and parts["g_ce"] > 0

    cfg = LossConfig(beta=2.0, gamma=3.0, alpha_ds=0.2, alpha_as=0.1)
    total, parts = generator_loss(z_t, z_s, y, bn, cfg)
    ce = disagreement_agreement_loss(z_t, z_s, y, 0.2, 0.1)
    assert total.item() == pytest.approx((margin + 2.0 * ce + 3.0 * 0.7).item(), rel=1e-6)
    assert parts["g_total"] == pytest.approx(total.item())
    assert parts["g_margin"] == pytest.approx(margin.item())
    assert parts["g_ce"] == pytest.approx(ce.item())
    # a plain float BN loss (e.g. a teacher without BN) is accepted
    total_f, _ = generator_loss(z_t, z_s, y, 0.0, LossConfig())
    assert torch.isfinite(total_f)


def test_student_entropy_mode_matches_hand_formula():
    torch.manual_seed(0)
    z_t, z_s = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    t = 20.0
    rows = ((z_t - z_s) / t).tolist()
    expect = -t * t * sum(_entropy(r) for r in rows) / len(rows)
    got = student_loss(z_t, z_s, LossConfig(student_loss="entropy", temperature=t))
    assert got.item() == pytest.approx(expect, rel=1e-12)
    assert torch.allclose(got, entropy_student_loss(z_t, z_s, t))


def test_student_kl_mode():
    torch.manual_seed(0)
    cfg = LossConfig(student_loss="kl", temperature=4.0)
    z = torch.randn(6, 7)
    assert student_loss(z, z.clone(), cfg).item() == pytest.approx(0.0, abs=1e-6)
    z_t, z_s = torch.randn(6, 7), torch.randn(6, 7)
    expect = 16.0 * F.kl_div(F.log_softmax(z_s / 4, dim=1), F.softmax(z_t / 4, dim=1), reduction="batchmean")
    got = student_loss(z_t, z_s, cfg)
    assert got.item() > 0
    assert torch.allclose(got, expect, atol=1e-6)
    assert torch.allclose(got, kl_student_loss(z_t, z_s, 4.0))


@pytest.mark.parametrize("mode", ["entropy", "kl"])
def test_student_loss_detaches_teacher(mode):
    z_t = torch.randn(4, 5, requires_grad=True)
    z_s = torch.randn(4, 5, requires_grad=True)
    student_loss(z_t, z_s, LossConfig(student_loss=mode, temperature=5.0)).backward()
    assert z_t.grad is None
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="logits"):
        margin_loss(torch.randn(3, 4), torch.randn(3, 5), 0.1, 0.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_follows_inputs(dtype):
    z_t, z_s = torch.randn(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    y = torch.tensor([0, 1, 2])
    assert margin_loss(z_t, z_s, 0.1, 0.8).dtype == dtype
    assert disagreement_agreement_loss(z_t, z_s, y, 0.2, 0.1).dtype == dtype
    assert student_loss(z_t, z_s, LossConfig()).dtype == dtype
    assert student_loss(z_t, z_s, LossConfig(student_loss="kl")).dtype == dtype
    assert generator_loss(z_t, z_s, y, torch.tensor(0.0, dtype=dtype), LossConfig())[0].dtype == dtype


def _pipeline(seed=0):
    torch.manual_seed(seed)
    gen = build_generator(GeneratorConfig(latent_dim=16, channels=8), num_classes=5, image_size=8, channels=3)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    student = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    for p in [*teacher.parameters(), *student.parameters()]:
        p.requires_grad_(False)
    z, y = gen.sample_inputs(7, rng=torch.Generator().manual_seed(seed))
    images = gen(z, y)
    with bn_stats_recorder(teacher) as rec:
        z_t = teacher(images)
    z_s = student(images)
    return gen, z_t, z_s, y, rec


def _grad_norm(gen):
    return sum(p.grad.abs().sum().item() for p in gen.parameters() if p.grad is not None)


@pytest.mark.parametrize("which", ["margin", "ce", "bns", "total"])
def test_each_generator_loss_reaches_generator(which):
    gen, z_t, z_s, y, rec = _pipeline()
    if which == "margin":
        loss = margin_loss(z_t, z_s, 0.9, 0.95)
    elif which == "ce":
        loss = disagreement_agreement_loss(z_t, z_s, y, 0.2, 0.1)
    elif which == "bns":
        loss = bns_loss(rec.stats)
    else:
        loss, _ = generator_loss(z_t, z_s, y, bns_loss(rec.stats), LossConfig())
    loss.backward()
    assert _grad_norm(gen) > 0
    assert gen.fc.weight.grad.abs().sum() > 0


def test_student_loss_on_detached_images_leaves_generator_alone():
    gen = _pipeline()[0]
    student = nn.Linear(3 * 64, 5)
    teacher = nn.Linear(3 * 64, 5)
    z, y = gen.sample_inputs(4)
    images = gen(z, y).detach().flatten(1)
    student_loss(teacher(images), student(images), LossConfig()).backward()
    assert _grad_norm(gen) == 0
    assert teacher.weight.grad is None
    assert student.weight.grad.abs().sum() > 0
