"""The export modules: a prepared student rewritten with ops that export one to one to ONNX.

:func:`export_copy` swaps every quantizer of a copy of the student for an export module
(:func:`granq_search.export.onnx_export.export_onnx` writes the result).

How the student is expressed in ONNX
------------------------------------

**Weights** (every :class:`QuantConv2d` / :class:`QuantLinear`) are stored as k-bit integer
codes in 8-bit containers with their scales and zero points, and turned into the float weight
by ``DequantizeLinear`` in the graph; the float32 weight is not in the file.

* Asymmetric (the default): codes ``q + zp`` in ``[0, 2^k - 1]`` as **uint8**, zero points
  (integers in ``[0, 2^k - 1]``) as **uint8**.
* Symmetric: codes in ``[-(2^(k-1) - 1), 2^(k-1) - 1]`` as **int8**, zero points int8 0.
* Per output channel: ``DequantizeLinear(codes, scale[O], zp[O], axis=0)`` on the (O, I, kh, kw)
  or (O, I) codes. Per tensor: scalar scale and zero point. Per kernel (one range per (output,
  input) kernel): the codes are stored as (O * I, kh * kw), dequantized per axis 0 with O * I
  scales, and ``Reshape``-d back to (O, I, kh, kw). On 1x1 convs and linear layers per kernel
  falls back to per output channel, exactly as in the student.

``DequantizeLinear`` computes ``(code - zp) * scale`` in float32: the integer ``code - zp`` is
the student's rounded and clamped integer, so the weight the Conv / Gemm sees is bit for bit the
student's fake-quantized weight. Layers an override leaves in float stay plain float layers.

**Activations** are quantized at run time at the sites ``prepare`` placed (ReLU outputs, layer
inputs, residual stream), with their own bits and the granularity in use:

* dynamic ranges (per (sample, channel) = GranQ, per channel, per tensor; a threshold site uses
  the granularity its calibration chose): ``ReduceMin`` / ``ReduceMax`` over the group's axes
  (H, W for GranQ; N, H, W per channel; all axes per tensor; the single-value fallback of GranQ
  on (N, C) inputs is per channel, as in the student), then the arithmetic of ``fake_quant.py``
  op for op: ``Clip`` the range to contain 0, ``scale = Clip(hi - lo, EPS) / (2^k - 1)``,
  ``zp = Clip(Round(-lo / scale), 0, 2^k - 1)``, ``q = Round(x * Reciprocal(scale))``,
  ``Max(q, 0 - zp)``, ``Min(q, 2^k - 1 - zp)``, ``q * scale``. ``Round`` is half-to-even in ONNX
  as in torch, and every op is an exactly rounded IEEE operation, so a site alone gives exactly
  the student's values (tested bit for bit); in a network it sees the float differences of the
  layers before it (convolution summation order, BatchNormalization), see "Agreement" below.
  Per-tensor and per-channel dynamic ranges are taken over the batch (also the batch axis), so,
  as in the student, their result depends on the batch the model is run with.
* static (calibrated) ranges, per tensor: ``QuantizeLinear`` -> ``Clip`` ->
  ``DequantizeLinear`` with the frozen scalar scale and uint8 zero point. ``QuantizeLinear``
  saturates to the uint8 range [0, 255] only, so for k < 8 a ``Clip`` on the uint8 codes to
  [0, 2^k - 1] follows it (k = 8 needs none). ``QuantizeLinear`` divides by the scale where the
  student multiplies by its reciprocal; the two differ by at most one ulp before rounding, which
  changes a code only for a value within one ulp of a rounding tie. ONNX Runtime may fuse these
  pairs with the op between two sites (e.g. ``QLinearAveragePool``).
* static ranges, per channel (static GranQ and static per channel): the frozen per-channel
  constants in the same explicit ops as the dynamic case, ``Round(x * inv_scale)``, ``Max`` /
  ``Min`` against ``-zp`` / ``2^k - 1 - zp``, ``* scale`` (bit for bit the student's
  arithmetic). Not ``QuantizeLinear(axis=1)``: ONNX Runtime's QDQ fusions assume per-tensor
  activation scales and then refuse to load the model (onnxruntime 1.32: "QLinearAveragePool
  ... Scale and Zero-point must be a scalar" for a pool between two static sites).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.errors import GranqError
from granq_search.quant.fake_quant import EPS, quant_params
from granq_search.quant.granularity import (
    PerKernel,
    PerOutputChannel,
    PerTensor,
    compute_range,
    describe,
    reduce_dims,
    resolve,
)
from granq_search.quant.modules import ActQuantizer, QuantConv2d, QuantLinear

__all__ = ["export_copy"]


# --------------------------------------------------------------------------- export-only ops


class _DequantizeWeight(torch.autograd.Function):
    """``(codes - zp) * scale`` per axis 0 (or per tensor); exported as DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, per_axis):  # type: ignore[override]
        shape = (-1,) + (1,) * (codes.dim() - 1) if per_axis else ()
        return (codes.to(torch.float32) - zero_point.to(torch.float32).reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, per_axis):
        kw = {"axis_i": 0} if per_axis else {}
        return g.op("DequantizeLinear", codes, scale, zero_point, **kw)


class _StaticQDQ(torch.autograd.Function):
    """Per-tensor fake quantization with a frozen scale and uint8 zero point (0-d tensors);
    exported as QuantizeLinear -> Clip (k < 8) -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax):  # type: ignore[override]
        zp = zero_point.to(torch.float32)
        q = torch.round(x * torch.reciprocal(scale))  # as fake_quant._fake_quantize
        q = torch.maximum(q, torch.sub(0.0, zp))
        q = torch.minimum(q, qmax - zp)
        return q * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if qmax < 255:
            lo = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, scale, zero_point)


def _dynamic_fake_quant(x: torch.Tensor, dims: tuple[int, ...], qmax: int) -> torch.Tensor:
    """``fake_quantize(x, *compute_range(g, x), bits)`` written with ops that export one to one."""
    lo = torch.clamp(torch.amin(x, dim=dims, keepdim=True), max=0.0)
    hi = torch.clamp(torch.amax(x, dim=dims, keepdim=True), min=0.0)
    scale = torch.clamp(hi - lo, min=EPS) / qmax
    zp = torch.clamp(torch.round(torch.neg(lo) / scale), 0, qmax)
    q = torch.round(x * torch.reciprocal(scale))
    q = torch.maximum(q, torch.sub(0.0, zp))
    q = torch.minimum(q, qmax - zp)
    return q * scale


# --------------------------------------------------------------------------- export modules


class _ActExport(nn.Module):
    """Stands in for one :class:`ActQuantizer` during export."""

    def __init__(self, q: ActQuantizer, name: str) -> None:
        super().__init__()
        self.site = q.site or name
        self.bits = int(q.bits)
        self.qmax = 2**self.bits - 1
        self.role = q.role
        self.mode = "off"
        self.granularity = None
        if not q.enabled:
            return
        if q.is_threshold and not q.is_calibrated:
            raise GranqError(f"activation site '{self.site}' has granularity 'threshold' but was never calibrated; "
                             "calibrate the student (granq_search.quant.calibrate) before exporting it")
        if q.range_mode == "static":
            if not q.is_calibrated:
                raise GranqError(f"activation site '{self.site}' uses static ranges but was never calibrated; "
                                 "calibrate the student before exporting it")
            scale, zp, _, _ = quant_params(q.lo, q.hi, self.bits)
            scale = scale.to(torch.float32)
            if q.lo.numel() == 1:
                self.mode = "static_tensor"
                self.register_buffer("scale", scale.reshape(()).clone())
                self.register_buffer("zero_point", zp.reshape(()).to(torch.uint8).clone())
                self.granularity = "per_tensor (static)"
            else:
                if not (q.lo.dim() >= 2 and q.lo.shape[1] == q.lo.numel()):
                    raise GranqError(f"activation site '{self.site}': static range of shape {tuple(q.lo.shape)} "
                                     "is neither per tensor nor per channel (dim 1); cannot export it")
                self.mode = "static_channel"
                self.register_buffer("scale", scale.clone())
                self.register_buffer("inv_scale", torch.reciprocal(scale))
                self.register_buffer("q_low", torch.sub(0.0, zp).to(torch.float32))
                self.register_buffer("q_high", (self.qmax - zp).to(torch.float32))
                self.granularity = "per_channel (static)"
        else:
            self.mode = "dynamic"
            self.granularity = q._chosen()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "static_tensor":
            return _StaticQDQ.apply(x, self.scale, self.zero_point, self.qmax)
        if self.mode == "static_channel":
            q = torch.round(x * self.inv_scale)
            q = torch.minimum(torch.maximum(q, self.q_low), self.q_high)
            return q * self.scale
        shape = tuple(int(s) for s in x.shape)
        g, note = resolve(self.granularity, shape)
        self.resolved = describe(g, note)
        return _dynamic_fake_quant(x, reduce_dims(g, shape), self.qmax)

    def describe(self) -> dict[str, Any]:
        if self.mode == "off":
            gran = "none (float)"
        elif self.mode.startswith("static"):
            gran = self.granularity
        else:
            gran = getattr(self, "resolved", self.granularity.name) + " (dynamic)"
        return {"site": self.site, "role": self.role, "bits": self.bits if self.mode != "off" else 32,
                "granularity": gran}


def _integer_weight(m: QuantConv2d | QuantLinear) -> dict[str, Any]:
    """Integer codes, scale, zero point and layout of ``m``'s quantized weight (checked exact)."""
    w = m.weight.detach().to(torch.float32)
    g = m._w_gran
    lo, hi = compute_range(g, w)
    scale, zp, qmin, qmax = quant_params(lo, hi, m.w_bits, m.w_symmetric)
    q = torch.round(w * torch.reciprocal(scale))
    if zp is None:
        q = q.clamp(qmin, qmax)
        codes, zero = q, torch.zeros_like(scale)
        dtype = torch.int8
    else:
        q = torch.maximum(q, qmin - zp)
        q = torch.minimum(q, qmax - zp)
        codes, zero = q + zp, zp
        dtype = torch.uint8
    with torch.no_grad():
        expected = m.quantized_weight().detach().to(torch.float32)
    if not torch.equal((codes - zero) * scale, expected):  # pragma: no cover - a bug, not a user error
        raise RuntimeError(f"integer weight of {type(m).__name__} does not reproduce its fake-quantized weight")
    shape = tuple(w.shape)
    if isinstance(g, PerTensor):
        layout, codes_shape, sz = "per_tensor", shape, ()
    elif isinstance(g, PerOutputChannel):
        layout, codes_shape, sz = "per_channel", shape, (-1,)
    elif isinstance(g, PerKernel):
        layout, codes_shape, sz = "per_kernel", (shape[0] * shape[1], math.prod(shape[2:])), (-1,)
    else:  # pragma: no cover
        raise GranqError(f"weight granularity {g!r} cannot be exported")
    return {
        "codes": codes.reshape(codes_shape).to(dtype).contiguous(),
        "scale": scale.reshape(sz).to(torch.float32).contiguous(),
        "zero_point": zero.reshape(sz).to(dtype).contiguous(),
        "layout": layout,
        "shape": shape,
        "granularity": describe(g, m._w_note),
    }


class _WeightExport(nn.Module):
    """Shared by the conv and linear export modules: the integer weight and its dequantization."""

    def _init_weight(self, m: QuantConv2d | QuantLinear, name: str) -> None:
        iw = _integer_weight(m)
        self.layer = name
        self.layout = iw["layout"]
        self.w_shape = iw["shape"]
        self.info = {"layer": name, "kind": type(m).__name__.replace("Quant", ""), "bits": int(m.w_bits),
                     "granularity": iw["granularity"], "symmetric": bool(m.w_symmetric),
                     "dtype": "int8" if m.w_symmetric else "uint8", "scales": int(iw["scale"].numel())}
        self.register_buffer("weight_int", iw["codes"])
        self.register_buffer("weight_scale", iw["scale"])
        self.register_buffer("weight_zero_point", iw["zero_point"])
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        w = _DequantizeWeight.apply(self.weight_int, self.weight_scale, self.weight_zero_point,
                                    self.layout != "per_tensor")
        return w.reshape(self.w_shape) if self.layout == "per_kernel" else w


class _ConvExport(_WeightExport):
    def __init__(self, m: QuantConv2d, name: str) -> None:
        super().__init__()
        self._init_weight(m, name)
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.padding_mode = m.padding_mode
        self.pad_twice = m._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self.pad_twice, mode=self.padding_mode)
            return F.conv2d(x, self.weight(), self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class _LinearExport(_WeightExport):
    def __init__(self, m: QuantLinear, name: str) -> None:
        super().__init__()
        self._init_weight(m, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def export_copy(student: nn.Module) -> tuple[nn.Module, list[_ActExport], list[_WeightExport]]:
    """A deep copy of ``student`` (eval, on CPU, float32) with every quantizer swapped for its
    export module. ``student`` itself is not touched."""
    for name, m in student.named_modules():
        if isinstance(m, ActQuantizer) and (m._observing or m._passthrough):
            raise GranqError(f"activation site '{m.site or name}' is calibrating or passing through; finish "
                             "calibration (and leave passthrough()) before exporting")
    model = copy.deepcopy(student).cpu().float().eval()
    acts: list[_ActExport] = []
    layers: list[_WeightExport] = []
    for name, m in list(model.named_modules()):
        if not name:
            continue
        if isinstance(m, ActQuantizer):
            new: nn.Module = _ActExport(m, name)
            acts.append(new)
        elif isinstance(m, QuantConv2d):
            new = _ConvExport(m, name)
            layers.append(new)
        elif isinstance(m, QuantLinear):
            new = _LinearExport(m, name)
            layers.append(new)
        else:
            continue
        _set_submodule(model, name, new)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), acts, layers
