"""Numerics of the fake-quant primitive and of every quantizer granularity.

Exact equality (``torch.equal``) in float32 against two independent references:

* a plain Python loop over groups, each group quantized with 0-dim tensors (quant_helpers);
* ``torch.fake_quantize_per_channel_affine`` / ``torch.fake_quantize_per_tensor_affine``,
  fed with our scale and zero point. Every granularity is a per-channel quantization of some
  view (per (sample, channel): axis 0 of x.reshape(N*C, -1); per kernel: axis 0 of
  w.reshape(O*I, -1)), so torch's kernels apply to all of them.

Exactness holds because every elementwise operation is the same IEEE float32 operation in the
same order in all three: torch's kernels, like ours, multiply by ``1.0f / scale`` and round
half to even (``nearbyint``), and min/max are exact in any order.
"""

from __future__ import annotations

import pytest
import torch

from granq_search.quant import (
    ActQuantizer,
    PerChannel,
    PerSampleChannel,
    PerTensor,
    QuantConv2d,
    WeightSpec,
    calibrate,
    compute_range,
    fake_quantize,
    prepare,
    quant_params,
)
from granq_search.config import QuantConfig
from quant_helpers import loop_reference, ref_group

BITS = range(2, 9)
ACT = ["per_tensor", "per_channel", "per_sample_channel"]


def act_data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 4.0, 1.0]).view(1, 4, 1, 1)
    x[:, 3] = x[:, 3].relu()  # a non-negative channel (post-ReLU-like)
    x[1, 1] = 0.0  # an all-zero (sample, channel) group
    return x


def torch_reference(x: torch.Tensor, gran, bits: int) -> torch.Tensor:
    lo, hi = compute_range(gran, x)
    scale, zp, qmin, qmax = quant_params(lo, hi, bits)
    if isinstance(gran, PerTensor):
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(1), zp.reshape(1).to(torch.int32), qmin, qmax)
    if isinstance(gran, PerChannel):
        return torch.fake_quantize_per_channel_affine(x, scale.reshape(-1), zp.reshape(-1).to(torch.int32), 1,
                                                      qmin, qmax)
    n, c = x.shape[:2]
    flat = torch.fake_quantize_per_channel_affine(x.reshape(n * c, -1), scale.reshape(-1),
                                                  zp.reshape(-1).to(torch.int32), 0, qmin, qmax)
    return flat.reshape(x.shape)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ACT)
def test_dynamic_activation_matches_loop_and_torch(granularity, bits):
    x = act_data()
    q = ActQuantizer(bits, granularity, range_mode="dynamic")
    out = q(x)
    assert torch.equal(out, loop_reference(x, granularity, bits))
    gran = {"per_tensor": PerTensor(), "per_channel": PerChannel(), "per_sample_channel": PerSampleChannel()}
    assert torch.equal(out, torch_reference(x, gran[granularity], bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ACT)
def test_static_activation_matches_loop(granularity, bits):
    calib = [act_data(1), act_data(2) * 0.5]
    q = ActQuantizer(bits, granularity, range_mode="static")
    q.begin_calibration()
    for b in calib:
        assert q(b) is b  # observing passes the input through
    q.finalize()
    x = act_data(3) * 2.0  # wider than the calibration data: exercises clamping
    source = torch.cat(calib)
    # static per_sample_channel freezes one range per channel (samples change between batches)
    name = "per_tensor" if granularity == "per_tensor" else "per_channel"
    expected = torch.empty_like(x)
    if name == "per_tensor":
        expected = ref_group(x, source.min(), source.max(), bits)
    else:
        for c in range(x.shape[1]):
            expected[:, c] = ref_group(x[:, c], source[:, c].min(), source[:, c].max(), bits)
    assert torch.equal(q(x), expected)
    assert q.effective_granularity == ("per_tensor" if name == "per_tensor" else "per_channel (static)")


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel", "per_kernel"])
def test_weights_match_loop_and_torch(granularity, bits, symmetric):
    torch.manual_seed(bits)
    conv = QuantConv2d(3, 5, 3, spec=WeightSpec(bits, granularity, symmetric))
    w = conv.weight.detach()
    out = conv.quantized_weight().detach()
    assert torch.equal(out, loop_reference(w, "w_" + granularity, bits, symmetric))
    lo, hi = compute_range(conv._w_gran, w)
    scale, zp, qmin, qmax = quant_params(lo, hi, bits, symmetric)
    zp = torch.zeros_like(scale) if zp is None else zp
    zp = zp.reshape(-1).to(torch.int32)
    if granularity == "per_tensor":
        ref = torch.fake_quantize_per_tensor_affine(w, scale.reshape(1), zp, qmin, qmax)
    else:
        flat = w.reshape(scale.numel(), -1)
        ref = torch.fake_quantize_per_channel_affine(flat, scale.reshape(-1), zp, 0, qmin, qmax).reshape(w.shape)
    assert torch.equal(out, ref)
    assert out.unique().numel() <= 2**bits * conv.num_scale_factors()


def test_ste_gradient_is_identity_also_where_clamped():
    x = torch.linspace(-3, 3, 60).reshape(1, 3, 4, 5).requires_grad_(True)
    lo = torch.full((1, 3, 1, 1), -1.0)
    hi = torch.full((1, 3, 1, 1), 1.0)  # values beyond +-1 are clamped in the forward
    y = fake_quantize(x, lo, hi, 3)
    scale, zp, _, qmax = quant_params(lo, hi, 3)
    bottom, top = float(-zp.flatten()[0] * scale.flatten()[0]), float((qmax - zp.flatten()[0]) * scale.flatten()[0])
    assert bottom >= -1.0 - float(scale.flatten()[0]) and top <= 1.0 + float(scale.flatten()[0])
    assert torch.equal(y.detach()[x.detach() > 2], torch.full_like(y.detach()[x.detach() > 2], top))
    assert torch.equal(y.detach()[x.detach() < -2], torch.full_like(y.detach()[x.detach() < -2], bottom))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_ste_through_quantizer_modules():
    x = act_data().requires_grad_(True)
    ActQuantizer(3, "per_sample_channel")(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    conv = QuantConv2d(4, 2, 3, spec=WeightSpec(3, "per_kernel"))
    conv(x.detach()).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_static_range_clamps_to_integer_range():
    q = ActQuantizer(4, "per_tensor", range_mode="static")
    q.begin_calibration()
    q(torch.rand(2, 3, 4, 4))  # values in [0, 1)
    q.finalize()
    hi = float(q.hi)
    x = torch.tensor([-3.0, 0.0, 0.5, 5.0, 100.0]).reshape(1, 1, 1, 5)
    out = q(x)
    scale, zp, _, qmax = quant_params(q.lo, q.hi, 4)
    top = float((qmax - zp) * scale)  # the largest representable value
    assert out[0, 0, 0, 0] == 0.0  # below the range: clamped to the bottom (lo = 0 for [0, 1))
    assert out[0, 0, 0, 3] == top and out[0, 0, 0, 4] == top
    assert abs(top - hi) <= float(scale)


def test_fake_quantize_properties():
    x = act_data()
    before = x.clone()
    lo, hi = compute_range(PerSampleChannel(), x)
    out = fake_quantize(x, lo, hi, 4)
    assert torch.equal(x, before) and out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out[1, 1], torch.zeros_like(out[1, 1]))  # all-zero group stays exactly 0
    # zero is exactly representable in every group
    z = torch.zeros_like(x)
    assert torch.equal(fake_quantize(z + 0.0, lo, hi, 3), z)
    assert out.reshape(12, -1).unique(dim=None).numel() > 1
    for row in out.reshape(12, -1):
        assert row.unique().numel() <= 16
    # half precision in, half precision out
    assert fake_quantize(x.half(), lo, hi, 4).dtype == torch.float16


def test_symmetric_uses_signed_range_and_zero_point_zero():
    w = torch.tensor([[-1.0, -0.5, 0.25, 0.75]])
    lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    scale, zp, qmin, qmax = quant_params(lo, hi, 3, symmetric=True)
    assert zp is None and (qmin, qmax) == (-3, 3)
    out = fake_quantize(w, lo, hi, 3, symmetric=True)
    assert torch.equal(out, torch.round(w / scale).clamp(-3, 3) * scale)


def test_dynamic_site_in_a_prepared_student_matches_reference(hand_model):
    """The quantizer inside a student sees the ReLU output and quantizes it per (sample, channel)."""
    from granq_search.config import from_dict

    student = prepare(hand_model, from_dict({"act": {"bits": 3}}, QuantConfig))
    seen = {}
    site = student.act_quantizers.relu1
    site.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
    calibrate(student, [])  # dynamic, not threshold: a no-op
    student(torch.randn(2, 3, 8, 8))
    assert torch.equal(seen["out"], loop_reference(seen["inp"], "per_sample_channel", 3))
