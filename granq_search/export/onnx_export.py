"""ONNX export of a quantized student: integer weights, run-time GranQ activation quantization.

:func:`export_onnx` writes a self-contained ONNX model of a prepared (and, where needed,
calibrated or trained) student whose numerics are those of the PyTorch student
(:mod:`granq_search.quant.fake_quant`), and :func:`granq_search.export.onnx_verify.verify_onnx`
checks that with ONNX Runtime (and explains why deep low-bit students agree on most, not all,
top-1 decisions). How weights and activations are expressed in the graph:
:mod:`granq_search.export.onnx_graph`.

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
"""

from __future__ import annotations

import copy
import json
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from granq_search.errors import GranqError
from granq_search.export.onnx_graph import export_copy
from granq_search.quant.modules import ActQuantizer, QuantConv2d, QuantLinear

if TYPE_CHECKING:
    from granq_search.export.onnx_graph import _WeightExport

__all__ = ["export_onnx", "export_float_onnx", "onnx_summary", "require_onnx", "DEFAULT_OPSET", "INPUT_NAME",
           "OUTPUT_NAME"]

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


# --------------------------------------------------------------------------- writing


def _in_shape(in_shape) -> tuple[int, int, int, int]:
    shape = tuple(int(s) for s in in_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise GranqError(f"in_shape must be (N, C, H, W) or (C, H, W), got {tuple(in_shape)}")
    return shape


def tmp_path(path: Path) -> Path:
    """A unique hidden temporary name next to ``path`` (moved into place once complete)."""
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


def _finish(path: Path, final: Path, metadata: dict[str, str], proto: Any = None) -> None:
    """Add metadata, check the model and move it into place atomically (``proto``: the model at
    ``path`` when the caller has loaded it already)."""
    onnx, _ = require_onnx()
    if proto is None:
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
    model, acts, layers = export_copy(student)
    if not layers and not any(a.mode != "off" for a in acts):
        raise GranqError("the model has no quantized layer or activation site; give a prepared student "
                         "(granq_search.quant.prepare), or use export_float_onnx for a float model")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(final)
    try:
        _torch_export(model, shape, tmp, opset)
        proto = require_onnx()[0].load(str(tmp))  # parsed once: checked, then given its metadata
        _check_integer_weights(proto, layers)
        metadata = {
            "granq.format": "granq_search quantized student v1",
            "granq.sites": json.dumps([a.describe() for a in acts]),
            "granq.layers": json.dumps([dict(layer.info) for layer in layers]),
        }
        _finish(tmp, final, metadata, proto)
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
    tmp = tmp_path(final)
    try:
        _torch_export(model, shape, tmp, opset)
        _finish(tmp, final, {"granq.format": "granq_search float model v1"})
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _check_integer_weights(proto: Any, layers: list[_WeightExport]) -> None:
    """Every quantized layer's codes are an 8-bit initializer feeding ``DequantizeLinear`` and
    no float copy of its weight is in the file (no exporter pass folded the dequantization).
    Compares contents, not names: the exporter may rename or share identical initializers."""
    from onnx import TensorProto, numpy_helper

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
