"""Efficiency accounting against a hand count on
conv(3->4, 3x3, pad 1) -> relu -> conv(4->8, 1x1) -> relu -> pool -> linear(8->10), 1x3x8x8."""

from __future__ import annotations

import pytest
import torch

from granq_search.config import QuantConfig, from_dict
from granq_search.quant import calibrate, efficiency, prepare
from quant_helpers import HandCount

# MACs per layer for one 3x8x8 image
MACS_CONV1 = 4 * 8 * 8 * (3 * 3 * 3)  # 6912
MACS_CONV2 = 8 * 8 * 8 * 4  # 2048
MACS_FC = 10 * 8  # 80


def test_hand_count_avg_pool(hand_model):
    student = prepare(hand_model, from_dict({}, QuantConfig))  # W4 per channel, A4 per (sample, channel)
    eff = efficiency(student, (1, 3, 8, 8))
    layers = {r["name"]: r for r in eff["layers"]}
    assert [(r["macs"], r["w_bits"], r["a_bits"]) for r in eff["layers"]] == [
        (MACS_CONV1, 4, 32),  # the image is not quantized
        (MACS_CONV2, 4, 4),  # fed by the relu1 site
        (MACS_FC, 4, 32),  # average pooling leaves the grid: full-precision input
    ]
    assert eff["macs"] == MACS_CONV1 + MACS_CONV2 + MACS_FC
    assert eff["bitops"] == MACS_CONV1 * 4 * 32 + MACS_CONV2 * 4 * 4 + MACS_FC * 4 * 32
    assert eff["bitops_fp"] == (MACS_CONV1 + MACS_CONV2 + MACS_FC) * 32 * 32
    # weights at 4 bits + (scale + zero point) at 32 bits per output channel + biases at 32 bits
    size = (108 * 4 + 4 * 64 + 4 * 32) + (32 * 4 + 8 * 64 + 8 * 32) + (80 * 4 + 10 * 64 + 10 * 32)
    assert eff["size_bits"] == size
    assert eff["size_bits_fp"] == (108 + 4 + 32 + 8 + 80 + 10) * 32
    assert eff["compression"] == pytest.approx(eff["size_bits_fp"] / size)
    assert eff["weight_params"] == 108 + 32 + 80
    assert eff["act_sites"] == 2 and eff["act_scale_factors"] == 4 + 8 and eff["fine_fraction"] == 1.0
    assert layers["conv2"]["w_granularity"] == "per_channel"


def test_hand_count_max_pool_keeps_bits_and_per_tensor_scales():
    torch.manual_seed(0)
    model = HandCount(pool="max").eval()
    c = from_dict({"act": {"granularity": "per_tensor", "bits": 3},
                   "weight": {"symmetric": True},
                   "overrides": [{"pattern": "conv1", "weight_bits": 8}]}, QuantConfig)
    eff = efficiency(prepare(model, c), (1, 3, 8, 8))
    assert [(r["w_bits"], r["a_bits"]) for r in eff["layers"]] == [(8, 32), (4, 3), (4, 3)]  # max pool keeps the grid
    assert eff["bitops"] == MACS_CONV1 * 8 * 32 + MACS_CONV2 * 4 * 3 + MACS_FC * 4 * 3
    assert eff["act_scale_factors"] == 2 and eff["fine_fraction"] == 0.0
    size = (108 * 8 + 4 * 32 + 4 * 32) + (32 * 4 + 8 * 32 + 8 * 32) + (80 * 4 + 10 * 32 + 10 * 32)  # no zero points
    assert eff["size_bits"] == size


def test_threshold_and_static_counts(hand_model):
    c = from_dict({"act": {"granularity": "threshold", "threshold": 1.0, "range_mode": "static"}}, QuantConfig)
    student = prepare(hand_model, c)
    with pytest.raises(RuntimeError, match="calibrate"):
        efficiency(student, (1, 3, 8, 8))
    calibrate(student, [torch.randn(4, 3, 8, 8)])
    eff = efficiency(student, (1, 3, 8, 8))
    assert eff["act_scale_factors"] == 2 and eff["fine_fraction"] == 0.0  # tau = 1: per tensor
    weights = (108 * 4 + 4 * 96) + (32 * 4 + 8 * 96) + (80 * 4 + 10 * 96)
    assert eff["size_bits"] == weights + 2 * 64  # two frozen per-tensor activation ranges
    assert student.training is False


def test_float_override_counts_32_bits(hand_model):
    c = from_dict({"overrides": [{"pattern": "conv2", "quantize": False}]}, QuantConfig)
    eff = efficiency(prepare(hand_model, c), (1, 3, 8, 8))
    # conv2 (float) still reads the quantized relu1 site; the site after conv2 is switched off
    assert [(r["w_bits"], r["a_bits"]) for r in eff["layers"]] == [(4, 32), (32, 4), (4, 32)]
    assert eff["act_sites"] == 1
