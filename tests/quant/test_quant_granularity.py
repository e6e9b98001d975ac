"""Granularity types, range computation, config-name mapping, spec validation, fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granq_search.config import QuantConfig, from_dict
from granq_search.errors import ConfigError
from granq_search.quant import (
    ActQuantizer,
    ActSpec,
    PerChannel,
    PerKernel,
    PerOutputChannel,
    PerSampleChannel,
    PerTensor,
    QuantConv2d,
    QuantLinear,
    ThresholdSelected,
    WeightSpec,
    act_granularity,
    compute_range,
    reduce_dims,
    resolve,
    weight_granularity,
)


def test_scale_shapes():
    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(6, 3, 3, 3)
    shapes = {
        PerTensor(): (x, (1, 1, 1, 1)),
        PerChannel(): (x, (1, 3, 1, 1)),
        PerSampleChannel(): (x, (2, 3, 1, 1)),
        PerOutputChannel(): (w, (6, 1, 1, 1)),
        PerKernel(): (w, (6, 3, 1, 1)),
    }
    for g, (t, shape) in shapes.items():
        lo, hi = compute_range(g, t)
        assert lo.shape == shape and hi.shape == shape, g
        assert torch.all(lo <= hi)
    lo, hi = compute_range(PerSampleChannel(), x)
    assert torch.equal(lo[1, 2, 0, 0], x[1, 2].min()) and torch.equal(hi[0, 1, 0, 0], x[0, 1].max())
    assert reduce_dims(PerSampleChannel(), torch.randn(2, 3)) == ()
    lo, hi = compute_range(PerSampleChannel(), x2 := torch.randn(2, 3))
    assert torch.equal(lo, x2) and torch.equal(hi, x2)  # one group per element, not one for all
    with pytest.raises(ValueError):
        reduce_dims(ThresholdSelected(), x)


def test_names_map_to_types_and_unknown_names_fail_with_the_field():
    assert act_granularity("per_sample_channel") == PerSampleChannel()
    assert act_granularity("threshold") == ThresholdSelected()
    assert weight_granularity("per_channel") == PerOutputChannel()
    assert weight_granularity("per_kernel") == PerKernel()
    with pytest.raises(ConfigError, match="act.granularity"):
        act_granularity("per_row")
    with pytest.raises(ConfigError, match="weight.granularity"):
        weight_granularity("per_sample_channel")


@pytest.mark.parametrize("data, field", [
    ({"act": {"bits": 1}}, "act.bits"),
    ({"act": {"bits": 9}}, "act.bits"),
    ({"weight": {"bits": 1}}, "weight.bits"),
    ({"weight": {"bits": 9}}, "weight.bits"),
    ({"act": {"granularity": "per_row"}}, "act.granularity"),
    ({"weight": {"granularity": "per_sample_channel"}}, "weight.granularity"),
    ({"act": {"threshold": 1.5}}, "act.threshold"),
    ({"act": {"threshold": -0.1}}, "act.threshold"),
    ({"act": {"range_mode": "frozen"}}, "act.range_mode"),
    ({"overrides": [{"pattern": "conv1", "act_bits": 9}]}, "overrides[0].act_bits"),
])
def test_invalid_quant_config_names_the_field(data, field):
    with pytest.raises(ConfigError) as err:
        from_dict(data, QuantConfig)
    assert field in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"granularity": "per_kernel"}, "granularity"),
    ({"threshold": 1.01}, "threshold"), ({"range_mode": "frozen"}, "range_mode"),
])
def test_invalid_module_specs_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        ActSpec(**kwargs)
    assert err.value.field == field
    with pytest.raises(ConfigError):
        ActQuantizer(**kwargs)
    with pytest.raises(ConfigError, match="granularity"):
        WeightSpec(4, "per_sample_channel")


def test_resolve_fallbacks():
    assert resolve(PerKernel(), (8, 4, 1, 1)) == (PerOutputChannel(), "1x1 fallback")
    assert resolve(PerKernel(), (8, 4)) == (PerOutputChannel(), "1x1 fallback")
    assert resolve(PerKernel(), (8, 4, 3, 3)) == (PerKernel(), None)
    assert resolve(PerSampleChannel(), (8, 4)) == (PerChannel(), "single-value fallback")
    assert resolve(PerSampleChannel(), (8, 4, 2, 2)) == (PerSampleChannel(), None)


def test_1x1_conv_is_really_quantized_under_per_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 1)
    q = QuantConv2d.from_float(conv, WeightSpec(3, "per_kernel"))
    assert q.effective_granularity == "per_channel (1x1 fallback)"
    assert q.num_scale_factors() == 4
    wq = q.quantized_weight().detach()
    assert not torch.equal(wq, conv.weight.detach())
    for o in range(4):
        assert wq[o].unique().numel() <= 2**3
    x = torch.randn(2, 8, 5, 5)
    assert not torch.allclose(q(x), conv(x))
    assert q.weight is conv.weight and q.bias is conv.bias  # same parameters, same names
    lin = QuantLinear.from_float(nn.Linear(6, 3), WeightSpec(2, "per_kernel"))
    assert lin.effective_granularity == "per_channel (1x1 fallback)"
    assert all(row.unique().numel() <= 4 for row in lin.quantized_weight().detach())


def test_per_kernel_on_3x3_has_one_scale_per_kernel():
    q = QuantConv2d(4, 6, 3, groups=2, spec=WeightSpec(4, "per_kernel"))
    assert q.effective_granularity == "per_kernel" and q.num_scale_factors() == 6 * 2
    assert QuantConv2d(4, 6, 3, spec=WeightSpec(4, "per_tensor", symmetric=True)).num_zero_points() == 0


def test_per_sample_channel_on_2d_input_falls_back_and_quantizes():
    q = ActQuantizer(2, "per_sample_channel")
    x = torch.randn(16, 3).relu() + torch.rand(16, 3)
    out = q(x)
    assert q.effective_granularity == "per_channel (single-value fallback)"
    assert not torch.equal(out, x)
    assert all(out[:, c].unique().numel() <= 4 for c in range(3))
