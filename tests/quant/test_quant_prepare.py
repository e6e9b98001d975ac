"""prepare: one quantizer per call site, untouched input model, state dicts, overrides."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from granq_search.config import QuantConfig, from_dict
from granq_search.errors import CheckpointError, ModelError
from granq_search.quant import (
    FLOAT,
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    act_quantizers,
    load_float_state_dict,
    prepare,
    site_report,
)
from quant_helpers import ManySites


def cfg(**data) -> QuantConfig:
    return from_dict(data, QuantConfig)


def test_torchvision_basic_block_gets_two_sites_for_one_relu_module():
    torch.manual_seed(0)
    block = BasicBlock(4, 4).eval()
    student = prepare(block, cfg())
    names = [n for n, _ in act_quantizers(student)]
    assert names == ["relu", "relu#1"]
    assert len(list(student.act_quantizers.children())) == 2


def test_every_call_site_kind_gets_its_own_quantizer(many_sites):
    student = prepare(many_sites, cfg(), example_input=torch.zeros(1, 3, 8, 8))
    names = [n for n, _ in act_quantizers(student)]
    # relu module twice, F.relu, torch.relu, x.relu(), x.relu_(), F.relu6, nn.ReLU6
    assert names == ["relu", "relu#1", "relu#2", "relu#3", "relu#4", "relu#5", "relu6", "act6"]
    assert all(q.last_shape is not None for _, q in act_quantizers(student))  # dry run recorded shapes
    producers = {r["name"]: r["producer"] for r in site_report(student)}
    assert producers["relu"] == "conv1" and producers["relu#1"] == "conv2" and producers["relu#2"] == "conv3"


def test_inplace_relu_method_feeds_the_quantized_value_downstream(many_sites):
    """``y.relu_()`` has no users in the graph: later readers of ``y`` must get the quantizer output."""
    student = prepare(many_sites, cfg(act={"bits": 2, "granularity": "per_tensor"}))
    site = dict(act_quantizers(student))["relu#5"]
    seen = {}
    site.register_forward_hook(lambda m, i, o: seen.update(out=o))
    student.act_quantizers.relu6.register_forward_pre_hook(lambda m, i: seen.update(relu6_in=i[0]))
    student(torch.randn(2, 3, 8, 8))
    # relu6's input is (quantized y) * 3: at most 4 distinct values
    assert seen["relu6_in"].unique().numel() <= 4
    assert seen["out"].unique().numel() <= 4


def test_input_model_is_untouched_and_weights_load(many_sites):
    before = copy.deepcopy(many_sites.state_dict())
    x = torch.randn(2, 3, 8, 8)
    y = many_sites(x)
    student = prepare(many_sites, cfg())
    assert not hasattr(many_sites, "act_quantizers")
    assert type(many_sites.conv1) is nn.Conv2d and type(many_sites.fc) is nn.Linear
    assert all(torch.equal(before[k], v) for k, v in many_sites.state_dict().items())
    assert torch.equal(many_sites(x), y)
    assert student.conv1.weight is not many_sites.conv1.weight  # a deep copy

    float_keys = set(many_sites.state_dict())
    student_keys = set(student.state_dict())
    assert float_keys <= student_keys  # unused layer and buffer carried over
    assert all(k.startswith("act_quantizers.") for k in student_keys - float_keys)

    torch.manual_seed(123)
    other = ManySites().eval()  # same architecture, other weights
    load_float_state_dict(student, other.state_dict())
    assert torch.equal(student.conv2.weight, other.conv2.weight)
    assert torch.equal(student.bn1.running_var, other.bn1.running_var)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_float_state_dict(student, {**other.state_dict(), "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="missing"):
        sd = other.state_dict()
        sd.pop("conv1.weight")
        load_float_state_dict(student, sd)


def test_every_conv_and_linear_is_replaced(many_sites):
    student = prepare(many_sites, cfg())
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 4 and all(isinstance(m, QuantConv2d) for m in convs)
    assert len(linears) == 2 and all(isinstance(m, QuantLinear) for m in linears)
    assert student.conv4.groups == 2 and student.conv3.effective_granularity == "per_channel"


def test_overrides_first_and_last_layer_at_8_bits(many_sites):
    c = cfg(weight={"bits": 3}, act={"bits": 3},
            overrides=[{"pattern": "conv1", "weight_bits": 8, "act_bits": 8},
                       {"pattern": "fc", "weight_bits": 8},
                       {"pattern": "act6", "act_granularity": "per_tensor"}])
    student = prepare(many_sites, c)
    assert student.conv1.w_bits == 8 and student.fc.w_bits == 8
    assert student.conv2.w_bits == 3 and student.conv4.w_bits == 3
    sites = dict(act_quantizers(student))
    assert sites["relu"].bits == 8  # produced by conv1
    assert sites["relu#1"].bits == 3
    assert sites["act6"].granularity == "per_tensor" and sites["relu6"].granularity == "per_sample_channel"


def test_quantize_false_leaves_layers_and_sites_in_float(many_sites):
    student = prepare(many_sites, cfg(overrides=[{"pattern": "conv1", "quantize": False},
                                                 {"pattern": "relu#3", "quantize": False}]))
    assert type(student.conv1) is nn.Conv2d
    sites = dict(act_quantizers(student))
    assert not sites["relu"].enabled and not sites["relu#3"].enabled and sites["relu#1"].enabled
    x = torch.randn(2, 8, 4, 4)
    assert sites["relu"](x) is x
    report = {r["name"]: r for r in site_report(student)}
    assert report["relu"]["effective"] == FLOAT and report["relu"]["bits"] == 32


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not traceable
            return F.relu(self.conv(x))
        return x


class OddConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class HasOddConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = OddConv(3, 3, 1)

    def forward(self, x):
        return F.relu(self.conv(x))


def test_untraceable_and_unsupported_models_raise_model_error():
    with pytest.raises(ModelError, match="Branchy"):
        prepare(Branchy(), cfg())
    with pytest.raises(ModelError, match="OddConv"):
        prepare(HasOddConv(), cfg())
    with pytest.raises(ModelError, match="does not run"):
        prepare(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), cfg(), example_input=torch.zeros(1, 5, 4, 4))


class FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3, 1, 1))

    def forward(self, x):
        return F.relu(F.conv2d(x, self.weight))


def test_functional_conv_is_refused_rather_than_left_in_float():
    with pytest.raises(ModelError, match="FunctionalConv.*conv2d"):
        prepare(FunctionalConv(), cfg())


def test_calibrated_student_round_trips_through_state_dict(many_sites):
    from granq_search.quant import calibrate

    c = cfg(act={"granularity": "threshold", "threshold": 0.3, "range_mode": "static"})
    student = prepare(many_sites, c)
    calibrate(student, [torch.randn(4, 3, 8, 8) for _ in range(2)])
    fresh = prepare(many_sites, c)
    fresh.load_state_dict(student.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh(x), student(x))
    assert site_report(fresh) == site_report(student)
    assert all(isinstance(q, ActQuantizer) and q.is_calibrated for _, q in act_quantizers(fresh))


def test_student_deep_copies_and_pickles(many_sites, tmp_path):
    student = prepare(many_sites, cfg(act={"granularity": "threshold"}))
    from granq_search.quant import calibrate

    calibrate(student, [torch.randn(2, 3, 8, 8)])
    x = torch.randn(2, 3, 8, 8)
    twin = copy.deepcopy(student)
    assert torch.equal(twin(x), student(x))
    torch.save(student, tmp_path / "student.pt")
    loaded = torch.load(tmp_path / "student.pt", weights_only=False)
    assert torch.equal(loaded(x), student(x))
