"""Activation placement: quantizers at ReLU outputs vs at every conv/linear input, with the
residual stream in float or at ``residual_bits``. Numerics against a hand-written reference
forward (loop reference of the quantizer), cost accounting against a hand count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from granq_search.config import ConfigError, QuantConfig, from_dict
from granq_search.quant import efficiency, prepare, site_report
from quant_helpers import loop_reference


class TinyResNet(nn.Module):
    """conv(3->4) -> relu -> [conv(4->4) -> relu -> conv(4->4)] + identity -> relu -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        y = self.conv3(self.relu2(self.conv2(x)))
        x = self.relu3(y + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _cfg(**act) -> QuantConfig:
    return from_dict({"weight": {"bits": 8, "granularity": "per_channel"},
                      "act": {"bits": 3, "granularity": "per_sample_channel", **act}}, QuantConfig)


def _wq(layer: nn.Module) -> torch.Tensor:
    """The student's own quantized weight (weight numerics are tested elsewhere)."""
    return layer.quantized_weight()


def _reference(student: nn.Module, x: torch.Tensor, placement: str, residual_bits: int | None) -> torch.Tensor:
    """The same network written out by hand, with the loop-reference activation quantizer."""
    q = lambda t, b=3: loop_reference(t, "per_sample_channel" if t.dim() == 4 else "per_channel", b)  # noqa: E731
    conv = lambda name, t: F.conv2d(t, _wq(getattr(student, name)), getattr(student, name).bias, padding=1)  # noqa: E731
    if placement == "relu_output":
        a1 = q(F.relu(conv("conv1", x)))
        y = conv("conv3", q(F.relu(conv("conv2", a1))))
        a3 = q(F.relu(y + a1))
        pooled = F.adaptive_avg_pool2d(a3, 1).flatten(1)
        return F.linear(pooled, _wq(student.fc), student.fc.bias)
    res = (lambda t: t) if residual_bits is None else (lambda t: q(t, residual_bits))
    a1 = res(F.relu(conv("conv1", x)))  # the residual stream: float or residual_bits
    y = conv("conv3", q(res(F.relu(conv("conv2", q(a1))))))  # every conv reads a 3-bit input
    a3 = res(F.relu(y + a1))
    pooled = F.adaptive_avg_pool2d(a3, 1).flatten(1)
    return F.linear(q(pooled), _wq(student.fc), student.fc.bias)  # (N, C): per-channel fallback


@pytest.mark.parametrize("placement,residual_bits", [("relu_output", None), ("layer_input", None),
                                                     ("layer_input", 8), ("layer_input", 5)])
def test_numerics_match_hand_written_reference(placement, residual_bits):
    torch.manual_seed(0)
    model = TinyResNet().eval()
    student = prepare(model, _cfg(placement=placement, residual_bits=residual_bits)).eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        got, want = student(x), _reference(student, x, placement, residual_bits)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sites_and_roles():
    torch.manual_seed(0)
    relu = {r["name"]: r for r in site_report(prepare(TinyResNet(), _cfg()))}
    assert set(relu) == {"relu1", "relu2", "relu3"} and {r["role"] for r in relu.values()} == {"relu_output"}
    inputs = {r["name"]: r for r in site_report(prepare(TinyResNet(), _cfg(placement="layer_input")))}
    # the first conv reads the image: never quantized; the ReLU outputs stay float
    assert set(inputs) == {"conv2.input", "conv3.input", "fc.input"}
    assert {r["role"] for r in inputs.values()} == {"layer_input"} and inputs["conv2.input"]["bits"] == 3
    both = {r["name"]: r for r in site_report(prepare(TinyResNet(), _cfg(placement="layer_input", residual_bits=8)))}
    assert set(both) == set(inputs) | set(relu)
    assert {both[n]["role"] for n in relu} == {"residual"} and {both[n]["bits"] for n in relu} == {8}


def test_overrides_reach_input_sites():
    torch.manual_seed(0)
    cfg = from_dict({"act": {"bits": 3, "placement": "layer_input"},
                     "overrides": [{"pattern": "fc.input", "quantize": False},
                                   {"pattern": "conv2.input", "act_bits": 6}]}, QuantConfig)
    sites = {r["name"]: r for r in site_report(prepare(TinyResNet(), cfg))}
    assert sites["fc.input"]["enabled"] is False and sites["conv2.input"]["bits"] == 6
    assert sites["conv3.input"]["bits"] == 3


def test_residual_bits_needs_layer_input():
    with pytest.raises(ConfigError, match="residual_bits"):
        from_dict({"act": {"residual_bits": 8}}, QuantConfig)
    with pytest.raises(ConfigError, match="residual_bits"):
        from_dict({"act": {"placement": "layer_input", "residual_bits": 9}}, QuantConfig)


# ---------------------------------------------------------------------------- cost accounting

# one 3x6x6 image: every conv output is 4x6x6 = 144 values; pooled 4 values; image 108 values
MAP, POOLED, IMAGE = 144, 4, 108
MACS_CONV1, MACS_CONV = 144 * 27, 144 * 36
MACS_FC = 5 * 4


def _eff(**act):
    torch.manual_seed(0)
    return efficiency(prepare(TinyResNet(), _cfg(**act)), (1, 3, 6, 6))


def test_cost_relu_output():
    eff = _eff()
    assert [(r["name"], r["a_bits"]) for r in eff["layers"]] == [("conv1", 32), ("conv2", 3), ("conv3", 3), ("fc", 32)]
    assert eff["bitops"] == MACS_CONV1 * 8 * 32 + 2 * MACS_CONV * 8 * 3 + MACS_FC * 8 * 32
    # read by layers or the residual add: image (32), relu1 out (3, read by conv2 AND the add:
    # once), relu2 out (3), conv3 out (32, read by the add), pooled (32)
    assert eff["act_memory_bits"] == IMAGE * 32 + MAP * 3 + MAP * 3 + MAP * 32 + POOLED * 32
    assert eff["residual_bits"] == 3 and eff["act_placement"] == "relu_output"


def test_cost_layer_input_float_residual():
    eff = _eff(placement="layer_input")
    assert [(r["name"], r["a_bits"]) for r in eff["layers"]] == [("conv1", 32), ("conv2", 3), ("conv3", 3), ("fc", 3)]
    assert eff["bitops"] == MACS_CONV1 * 8 * 32 + 2 * MACS_CONV * 8 * 3 + MACS_FC * 8 * 3
    # image; conv2 reads a 3-bit copy of relu1's output while the add reads the float one;
    # conv3 reads a 3-bit input; the add reads conv3's output; fc reads a 3-bit copy
    assert eff["act_memory_bits"] == IMAGE * 32 + MAP * 3 + MAP * 32 + MAP * 3 + MAP * 32 + POOLED * 3
    assert eff["residual_bits"] == 32 and eff["act_placement"] == "layer_input"
    assert eff["act_sites"] == 3 and eff["act_scale_factors"] == 4 + 4 + 4


def test_cost_layer_input_residual_bits():
    eff = _eff(placement="layer_input", residual_bits=8)
    assert eff["act_memory_bits"] == IMAGE * 32 + MAP * 3 + MAP * 8 + MAP * 3 + MAP * 32 + POOLED * 3
    assert eff["residual_bits"] == 8 and eff["act_sites"] == 6
    # the stream costs more memory than the relu_output placement, less than a float stream
    assert _eff()["act_memory_bits"] < eff["act_memory_bits"] < _eff(placement="layer_input")["act_memory_bits"]


def test_real_resnet20_placement_costs():
    """Option-A ResNet-20 (the shared teacher's architecture), W3A3: same conv BitOPs either
    way, the linear layer reads 3-bit inputs only at layer inputs; a float residual stream costs
    more activation memory than an 8-bit one, which costs more than the 3-bit stream."""
    from granq_search.models import create_model

    model = create_model("resnet20", num_classes=10).eval()
    costs = {}
    for key, act in {"relu": {}, "fp": {"placement": "layer_input"},
                     "r8": {"placement": "layer_input", "residual_bits": 8}}.items():
        q = from_dict({"weight": {"bits": 3, "granularity": "per_kernel"}, "act": {"bits": 3, **act}}, QuantConfig)
        costs[key] = efficiency(prepare(model, q), (1, 3, 32, 32))
    assert costs["relu"]["act_memory_bits"] < costs["r8"]["act_memory_bits"] < costs["fp"]["act_memory_bits"]
    fc_macs = 10 * 64
    assert costs["relu"]["bitops"] - costs["fp"]["bitops"] == fc_macs * 3 * (32 - 3)
    assert costs["fp"]["act_sites"] == 19 + 1 - 1  # 19 convs + fc, minus the first conv
