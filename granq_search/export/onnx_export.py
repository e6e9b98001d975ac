"""ONNX export of a quantized student: integer weights, run-time GranQ activation quantization.

:func:`export_onnx` writes a self-contained ONNX model of a prepared (and, where needed,
calibrated or trained) student whose numerics are those of the PyTorch student
(:mod:`granq_search.quant.fake_quant`), and :func:`verify_onnx` checks that with ONNX Runtime.

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

The graph has a dynamic batch axis (input ``input``, output ``logits``), is checked with
``onnx.checker``, and carries metadata (``granq.sites``, ``granq.layers``: JSON of what each
site and layer does). The export uses the TorchScript-based exporter (``dynamo=False``): its
``torch.autograd.Function.symbolic`` lets the export modules emit ``DequantizeLinear`` /
``QuantizeLinear`` directly, so no float weight ever exists as a constant that an exporter pass
could fold, and it needs no ``onnxscript``. The dynamo exporter (the default since torch 2.9)
would need ``onnxscript`` plus custom translation functions for the same nodes.

The ONNX model simulates integer arithmetic in float32 (the Conv / Gemm run in float on the
dequantized values): per-(sample, channel) activation scales vary along the input channels a
convolution sums over, so they cannot be factored out of an integer convolution. ONNX Runtime
dequantizes the weights on every run by default; the session config entry
``session.disable_quant_qdq=1`` makes it fold them into float weights once at load time (faster,
same file; ``docs/benchmarks.md``, "ONNX deployment").

Agreement
---------

ONNX Runtime's convolutions and BatchNorm round in another order than PyTorch's, so values
differ by an ulp or so. Now and then that moves a value across a rounding boundary of a 3-4 bit
quantizer; the changed activation (one quantization step) propagates and moves further values
downstream. Deep low-bit students therefore agree with their ONNX export on most, not all,
top-1 decisions, with logit differences far above float precision; PyTorch shows the same
effect against itself when only its convolution backend changes (measured in the benchmark).
:func:`verify_onnx` reports the agreement; the small digits model agrees on every image.
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
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

__all__ = ["export_onnx", "export_float_onnx", "verify_onnx", "onnx_summary", "require_onnx",
           "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME"]

DEFAULT_OPSET = 17
"""ONNX opset of the exported graphs (per-axis Q/DQ needs >= 13; 17 is widely supported)."""

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INSTALL_HINT = "pip install 'granq_search[deploy]'"


def require_onnx() -> tuple[Any, Any]:
    """``(onnx, onnxruntime)``, or a one-line :class:`GranqError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        missing = getattr(e, "name", None) or "onnx/onnxruntime"
        raise GranqError(f"ONNX export needs the packages onnx and onnxruntime ({missing} is not installed); "
                         f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


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


def _export_copy(student: nn.Module) -> tuple[nn.Module, list[_ActExport], list[_WeightExport]]:
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


# --------------------------------------------------------------------------- writing


def _in_shape(in_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise GranqError(f"in_shape must be (N, C, H, W) or (C, H, W), got {tuple(in_shape)}")
    return shape


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _torch_export(model: nn.Module, in_shape: tuple[int, ...], path: Path, opset: int) -> None:
    # batch 2: nothing gets specialised to a batch of one; the batch axis is dynamic anyway
    example = torch.zeros((2, *in_shape[1:]), dtype=torch.float32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)


def _finish(path: Path, final: Path, metadata: dict[str, str]) -> None:
    """Add metadata, check the model and move it into place atomically."""
    onnx, _ = require_onnx()
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    os.replace(path, final)


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 20:
        raise GranqError(f"opset {opset!r} is not supported; per-axis (De)QuantizeLinear needs 13..20")
    return opset


def export_onnx(student: nn.Module, in_shape, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write the quantized ``student`` (a ``prepare``-d model, calibrated where it needs it) to
    ``path`` as ONNX (see the module docstring for how weights and activations are expressed).

    ``in_shape`` is ``(N, C, H, W)`` or ``(C, H, W)``; the batch axis of the file is dynamic.
    The file is written to a temporary name and moved into place only when complete and checked.
    ``student`` is not modified. Returns the path. Raises :class:`GranqError` when onnx is
    missing or a site still needs calibration.
    """
    require_onnx()
    shape = _in_shape(in_shape)
    opset = _check_opset(opset)
    model, acts, layers = _export_copy(student)
    if not layers and not any(a.mode != "off" for a in acts):
        raise GranqError("the model has no quantized layer or activation site; give a prepared student "
                         "(granq_search.quant.prepare), or use export_float_onnx for a float model")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    try:
        _torch_export(model, shape, tmp, opset)
        _check_integer_weights(tmp, layers)
        metadata = {
            "granq.format": "granq_search quantized student v1",
            "granq.sites": json.dumps([a.describe() for a in acts]),
            "granq.layers": json.dumps([dict(layer.info) for layer in layers]),
        }
        _finish(tmp, final, metadata)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def export_float_onnx(float_model: nn.Module, in_shape, path: str | Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write a float model (e.g. the teacher) to ``path`` as ONNX with the same exporter settings
    (eval mode, BatchNorm folded into the convolutions by the exporter, dynamic batch axis)."""
    require_onnx()
    shape = _in_shape(in_shape)
    opset = _check_opset(opset)
    if any(isinstance(m, (ActQuantizer, QuantConv2d, QuantLinear)) for m in float_model.modules()):
        raise GranqError("export_float_onnx got a quantized student; use export_onnx for it")
    model = copy.deepcopy(float_model).cpu().float().eval()
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final)
    try:
        _torch_export(model, shape, tmp, opset)
        _finish(tmp, final, {"granq.format": "granq_search float model v1"})
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _check_integer_weights(path: Path, layers: list[_WeightExport]) -> None:
    """Every quantized layer's codes are an 8-bit initializer feeding ``DequantizeLinear`` and
    no float copy of its weight is in the file (no exporter pass folded the dequantization).
    Compares contents, not names: the exporter may rename or share identical initializers."""
    onnx, _ = require_onnx()
    from onnx import TensorProto, numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    dq_codes = set()
    for n in proto.graph.node:
        t = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if t is not None and t.data_type in (TensorProto.INT8, TensorProto.UINT8):
            dq_codes.add((tuple(t.dims), numpy_helper.to_array(t).tobytes()))
    floats = [t for t in inits.values() if t.data_type == TensorProto.FLOAT]
    for layer in layers:
        codes = layer.weight_int
        if (tuple(codes.shape), codes.numpy().tobytes()) not in dq_codes:
            raise GranqError(f"ONNX export of layer '{layer.layer}': its integer weight is not an 8-bit "
                             "initializer feeding DequantizeLinear; the exporter changed the graph")
        numel = codes.numel()
        with torch.no_grad():
            deq = layer.weight().reshape(-1).numpy()
        for t in floats:
            if math.prod(t.dims) == numel and (numpy_helper.to_array(t).reshape(-1) == deq).all():
                raise GranqError(f"ONNX export of layer '{layer.layer}': a float copy of its weight is in the file")


# --------------------------------------------------------------------------- inspection


def onnx_summary(path: str | Path) -> dict[str, Any]:
    """Counts of what the file holds: bytes, op types, initializer dtypes and bytes, metadata."""
    onnx, _ = require_onnx()
    from onnx import TensorProto

    proto = onnx.load(str(path))
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    dtypes: dict[str, dict[str, int]] = {}
    for t in proto.graph.initializer:
        name = TensorProto.DataType.Name(t.data_type).lower()
        d = dtypes.setdefault(name, {"tensors": 0, "elements": 0})
        d["tensors"] += 1
        d["elements"] += int(math.prod(t.dims))
    return {"bytes": os.path.getsize(path), "ops": ops, "initializers": dtypes,
            "opset": max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "metadata": {p.key: p.value for p in proto.metadata_props}}


# --------------------------------------------------------------------------- verification


def _session(path: str | Path, threads: int | None, config: Mapping[str, str] | None = None):
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(str(key), str(value))
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def verify_onnx(onnx_path: str | Path, student: nn.Module, data: Iterable, *, max_batches: int | None = None,
                threads: int | None = None, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ONNX Runtime (CPUExecutionProvider) and the PyTorch ``student`` on the same batches.

    ``data`` yields ``(images, labels)`` batches (an evaluation loader) or image tensors.
    Returns ``n`` (images), ``batches``, ``agreement`` (% of images with the same top-1 class),
    ``onnx_top1`` / ``torch_top1`` (accuracy %, None without labels), ``top1_diff`` (points,
    ONNX minus PyTorch), ``max_abs_diff`` (largest |logit difference|) and ``mean_abs_diff``.
    The student runs in eval mode (its train/eval state is restored afterwards). ``threads``:
    ONNX Runtime intra-op threads; ``session_config``: ONNX Runtime session config entries, e.g.
    ``{"session.disable_quant_qdq": "1"}`` (dequantize the weights once at load time).

    Agreement is a statistical figure for deep low-bit networks: a float difference of one ulp
    (another convolution algorithm, BatchNorm arithmetic) moves a value across a quantizer's
    rounding boundary now and then, and the changed activation propagates; PyTorch itself
    shows the same effect between its own convolution backends.
    """
    sess = _session(onnx_path, threads, session_config)
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        device = next(iter(student.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    n = agree = hits_onnx = hits_torch = labelled = batches = 0
    max_abs, sum_abs, count = 0.0, 0.0, 0
    try:
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            x, y = _split(batch)
            x = x.detach().to(torch.float32).cpu()
            ref = student(x.to(device)).detach().float().cpu()
            out = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0])
            if out.shape != ref.shape:
                raise GranqError(f"ONNX output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}")
            diff = (out - ref).abs()
            max_abs = max(max_abs, float(diff.max())) if diff.numel() else max_abs
            sum_abs += float(diff.sum())
            count += diff.numel()
            p_onnx, p_torch = out.argmax(1), ref.argmax(1)
            agree += int((p_onnx == p_torch).sum())
            if y is not None:
                y = y.cpu()
                hits_onnx += int((p_onnx == y).sum())
                hits_torch += int((p_torch == y).sum())
                labelled += int(y.shape[0])
            n += int(x.shape[0])
            batches += 1
    finally:
        for m, t in modes.items():
            m.training = t
    if n == 0:
        raise GranqError("verify_onnx got no data to compare on")
    onnx_top1 = 100.0 * hits_onnx / labelled if labelled else None
    torch_top1 = 100.0 * hits_torch / labelled if labelled else None
    return {
        "n": n,
        "batches": batches,
        "agreement": 100.0 * agree / n,
        "onnx_top1": onnx_top1,
        "torch_top1": torch_top1,
        "top1_diff": (onnx_top1 - torch_top1) if labelled else None,
        "max_abs_diff": max_abs,
        "mean_abs_diff": sum_abs / max(count, 1),
    }
