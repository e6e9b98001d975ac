"""BN-statistics recorder and L_BNS."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granq_search.config import GeneratorConfig
from granq_search.generator import build_generator
from granq_search.losses import BNStatsHook, batch_stats, bn_stats_recorder, bns_loss


def _teacher_bn_with_stats_of(x: torch.Tensor) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(x.shape[1]).eval()
    with torch.no_grad():
        bn.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        bn.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
    return bn


def test_records_mean_and_biased_var_per_channel():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    teacher = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)).eval()
    with bn_stats_recorder(teacher) as rec:
        h = teacher[2](teacher[1](teacher[0](x)))
        teacher[3](h)
    assert rec.num_layers == 2 and len(rec.stats) == 2
    mean, var, rm, rv = rec.stats[0]
    assert torch.allclose(mean, x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(var, x.var(dim=(0, 2, 3), unbiased=False), atol=1e-5)
    assert torch.equal(rm, teacher[0].running_mean) and torch.equal(rv, teacher[0].running_var)
    assert torch.allclose(rec.stats[1].mean, h.mean(dim=(0, 2, 3)), atol=1e-6)


@pytest.mark.parametrize("shape,dims", [((6, 4), (0,)), ((6, 4, 7), (0, 2))])
def test_batchnorm1d_inputs(shape, dims):
    x = torch.randn(*shape)
    bn = nn.BatchNorm1d(4).eval()
    with bn_stats_recorder(bn) as rec:
        bn(x)
    assert torch.allclose(rec.stats[0].mean, x.mean(dim=dims), atol=1e-6)
    assert torch.allclose(rec.stats[0].var, x.var(dim=dims, unbiased=False), atol=1e-5)
    m, v = batch_stats(x)
    assert m.shape == v.shape == (4,)


def test_zero_when_batch_stats_equal_running_stats_and_positive_otherwise():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 2
    bn = _teacher_bn_with_stats_of(x)
    with bn_stats_recorder(bn) as rec:
        bn(x)
    assert bns_loss(rec.stats).item() == pytest.approx(0.0, abs=1e-10)
    assert bns_loss(rec).item() == pytest.approx(0.0, abs=1e-10)  # the recorder itself works too
    with bn_stats_recorder(bn) as rec:
        bn(x + 0.5)
    # mean shifted by 0.5 in each channel, var unchanged: loss = 0.25
    assert bns_loss(rec.stats).item() == pytest.approx(0.25, rel=1e-4)
    assert torch.equal(bns_loss(rec), bns_loss(rec.stats))
    fresh = nn.BatchNorm2d(3).eval()  # running stats 0 / 1
    with bn_stats_recorder(fresh) as rec:
        fresh(x)
    assert bns_loss(rec.stats).item() > 1.0


def test_loss_is_mean_over_layers_of_mse_sums():
    stats_a = (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), torch.zeros(2), torch.ones(2))
    stats_b = (torch.tensor([0.0, 0.0]), torch.tensor([3.0, 1.0]), torch.zeros(2), torch.ones(2))
    from granq_search.losses import BNStat
    loss = bns_loss([BNStat(*stats_a), BNStat(*stats_b)])
    # layer a: mse mean = (1 + 4)/2 = 2.5, var 0 -> 2.5; layer b: mean 0, var (4 + 0)/2 = 2
    assert loss.item() == pytest.approx((2.5 + 2.0) / 2)


def test_teacher_without_bn_gives_zero():
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with bn_stats_recorder(teacher) as rec:
        teacher(torch.randn(2, 3, 8, 8))
    assert rec.num_layers == 0 and rec.stats == []
    loss = bns_loss(rec.stats)
    assert loss.shape == () and loss.item() == 0.0
    assert bns_loss(rec).item() == 0.0
    assert bns_loss([], dtype=torch.float64).dtype == torch.float64


def test_untracked_bn_is_skipped():
    teacher = nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm2d(3)).eval()
    with bn_stats_recorder(teacher) as rec:
        teacher(torch.randn(2, 3, 4, 4))
    assert rec.num_layers == 1 and len(rec.stats) == 1


def test_hooks_removed_on_exit_and_on_error():
    bn = nn.BatchNorm2d(3).eval()
    rec = bn_stats_recorder(bn)
    assert isinstance(rec, BNStatsHook)
    with rec:
        assert len(bn._forward_pre_hooks) == 1
        bn(torch.randn(2, 3, 4, 4))
    assert len(bn._forward_pre_hooks) == 0 and len(bn._forward_hooks) == 0
    bn(torch.randn(2, 3, 4, 4))
    assert len(rec.stats) == 1  # readable after exit, nothing recorded outside the block
    rec.clear()
    assert rec.stats == []
    with pytest.raises(RuntimeError, match="boom"):
        with bn_stats_recorder(bn):
            raise RuntimeError("boom")
    assert len(bn._forward_pre_hooks) == 0


def test_running_stats_snapshot_before_update_in_train_mode():
    bn = nn.BatchNorm2d(3).train()
    with bn_stats_recorder(bn) as rec:
        bn(torch.randn(4, 3, 4, 4) + 5)
    assert torch.equal(rec.stats[0].running_mean, torch.zeros(3))
    assert not torch.equal(bn.running_mean, torch.zeros(3))


def test_gradient_reaches_generator():
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(latent_dim=16, channels=8), num_classes=10, image_size=8, channels=3)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                            nn.Flatten(), nn.Linear(4 * 64, 10), nn.BatchNorm1d(10)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    z, y = gen.sample_inputs(6)
    with bn_stats_recorder(teacher) as rec:
        teacher(gen(z, y))
    loss = bns_loss(rec.stats)
    assert loss.item() > 0
    loss.backward()
    assert gen.fc.weight.grad is not None and gen.fc.weight.grad.abs().sum() > 0
    assert gen.out[0].weight.grad.abs().sum() > 0
