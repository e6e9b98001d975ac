"""Efficiency accounting of a prepared student: bit-operations, model size, scale factors.

One forward of a zeros input (batch 1, eval mode, no grad) with hooks measures, for every
Conv2d / Linear (quantized or left in float):

* ``macs``: multiply-accumulates for one image;
* ``w_bits``: weight bits (32 for a layer left in float);
* ``a_bits``: bits of the layer's input activation: the bit-width of the activation quantizer
  that produced the input tensor, else 32. The input image is never quantized, so the first
  layer's ``a_bits`` is 32. A quantized activation keeps its bits through operations that keep
  every value on its quantization grid (max pooling, flatten/view/reshape, dropout and identity
  at evaluation, ReLU); any other operation between quantizer and layer (average pooling, a
  residual add, ...) produces values off the grid, which the layer then consumes in full
  precision, so they count as 32 bits. Example: a CIFAR ResNet's final linear layer follows
  global average pooling and counts at 32 bits; its convs all count at the activation bits.

Totals: ``bitops = sum(macs * w_bits * a_bits)``, ``bitops_fp = sum(macs * 32 * 32)``;
``size_bits`` counts what a deployed conv/linear stack stores: weights at ``w_bits``, 32 bits
per weight scale and per weight zero point (none when symmetric), biases at 32 bits, and
32 + 32 bits per frozen (static) activation range; ``size_bits_fp`` is weights and biases at
32 bits (BatchNorm is not counted in either: it folds into the preceding conv at deployment).
``compression = size_bits_fp / size_bits``.

Activation memory: ``act_memory_bits`` is the activation storage one image needs, counted over
every distinct tensor that a Conv2d / Linear layer or a residual addition (an elementwise add of
two tensors of the same shape, e.g. ``out + shortcut``) reads: its elements times its bits (the
bits of the quantizer that produced it, else 32). At placement ``relu_output`` a block's
quantized input feeds both its conv and its shortcut and is counted once; at ``layer_input``
the conv reads a k-bit copy while the shortcut reads the float (or ``residual_bits``) tensor,
and both are counted. ``residual_bits`` is the precision of the residual stream: the bits of
the residual-role quantizers (placement layer_input with ``act.residual_bits``), 32 for a float
stream (layer_input without it), the ReLU-output bits at placement relu_output.
``act_placement`` is ``relu_output``, ``layer_input`` or ``none``.

Activation sites: ``act_scale_factors`` is the number of activation scale factors computed
per inference of one image (per tensor: 1; per channel and per (sample, channel): C;
threshold: C if the site is fine else 1); ``act_sites`` counts quantized sites;
``fine_fraction`` is the share of them quantized finer than per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from granq_search.quant.modules import ActQuantizer, QuantConv2d, QuantLinear
from granq_search.quant.prepare import act_quantizers

__all__ = ["efficiency", "GRID_PRESERVING"]

GRID_PRESERVING = frozenset({
    "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_max_pool1d", "_adaptive_max_pool2d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices",
    "flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "clone", "detach",
    "relu", "relu_", "dropout", "dropout2d", "identity", "__getitem__",
})
"""Names of functions whose output stays on the input's quantization grid (plus ``pad`` with
zeros: 0 is on every grid, since ranges contain 0 and zero points are integers)."""


class _Tags:
    """Bits of tensors produced by activation quantizers, keyed by identity."""

    def __init__(self) -> None:
        self._tags: dict[int, tuple[torch.Tensor, int]] = {}

    def set(self, t: Any, bits: int) -> None:
        if isinstance(t, torch.Tensor):
            self._tags[id(t)] = (t, bits)  # keep t alive so its id is not reused

    def get(self, t: Any) -> int | None:
        hit = self._tags.get(id(t)) if isinstance(t, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is t else None


_ADDS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__"})


class _Reads:
    """Distinct activation tensors read by layers and residual additions: id -> (tensor, bits)."""

    def __init__(self, tags: _Tags) -> None:
        self.tags = tags
        self.seen: dict[int, tuple[torch.Tensor, int]] = {}

    def add(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and id(t) not in self.seen:
            self.seen[id(t)] = (t, self.tags.get(t) or 32)

    def bits(self) -> int:
        return sum(t.numel() * b for t, b in self.seen.values())


class _Propagate(TorchFunctionMode):
    def __init__(self, tags: _Tags, reads: _Reads | None = None) -> None:
        super().__init__()
        self.tags = tags
        self.reads = reads

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if (self.reads is not None and name in _ADDS and len(args) >= 2 and isinstance(args[0], torch.Tensor)
                and isinstance(args[1], torch.Tensor) and args[0].shape == args[1].shape and args[0].dim() >= 3):
            self.reads.add(args[0])
            self.reads.add(args[1])
        out = func(*args, **(kwargs or {}))
        zero_pad = name == "pad" and (kwargs or {}).get("mode", args[2] if len(args) > 2 else "constant") == "constant" \
            and not ((kwargs or {}).get("value", args[3] if len(args) > 3 else None) or 0)
        if (name in GRID_PRESERVING or zero_pad) and args:
            bits = self.tags.get(args[0])
            if bits is not None:
                self.tags.set(out[0] if isinstance(out, (tuple, list)) else out, bits)
        return out


def _weight_info(m: nn.Module) -> tuple[int, str, int, int]:
    """(w_bits, effective granularity, scale factors, zero points)."""
    if isinstance(m, (QuantConv2d, QuantLinear)):
        return m.w_bits, m.effective_granularity, m.num_scale_factors(), m.num_zero_points()
    return 32, "none (float)", 0, 0


def efficiency(student: nn.Module, input_shape: tuple[int, ...] | torch.Size,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Efficiency of ``student`` for inputs of ``input_shape`` (the batch dim, e.g. the 1 of
    ``(1, 3, 32, 32)``, is replaced by 1); see the module docstring for every field.

    ``device``: where the zeros input is made; None: the device of the student's parameters.
    Threshold sites must be calibrated first (``RuntimeError`` otherwise).
    """
    param = next(student.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    x = torch.zeros((1, *tuple(input_shape)[1:]), dtype=dtype, device=device)
    tags = _Tags()
    reads = _Reads(tags)
    layers: list[dict[str, Any]] = []
    sites: dict[int, dict[str, Any]] = {}
    names = {id(m): n for n, m in student.named_modules()}
    counted: set[int] = set()
    handles = []

    def layer_hook(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        inp = inputs[0]
        if isinstance(m, nn.Conv2d):
            kind = "conv2d"
            macs = out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            kind = "linear"
            macs = out[0].numel() * m.in_features
        w_bits, gran, scales, zps = _weight_info(m)
        a_bits = tags.get(inp) or 32
        reads.add(inp)
        first_call = id(m) not in counted
        counted.add(id(m))
        layers.append({
            "name": names.get(id(m), ""), "kind": kind, "macs": int(macs), "w_bits": w_bits, "a_bits": a_bits,
            "weight_params": m.weight.numel(), "bias_params": m.bias.numel() if m.bias is not None else 0,
            "w_granularity": gran, "w_scales": scales, "w_zero_points": zps,
            "shared_call": not first_call,  # a module called again: its weights are counted once
        })

    def site_hook(q: ActQuantizer, inputs: tuple, out: torch.Tensor) -> None:
        if q.enabled:
            tags.set(out, q.bits)
        sites[id(q)] = {"shape": tuple(inputs[0].shape)}

    for m in student.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_hook(layer_hook))
        elif isinstance(m, ActQuantizer):
            handles.append(m.register_forward_hook(site_hook))
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        with torch.no_grad(), _Propagate(tags, reads):
            student(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t

    site_rows = []
    for name, q in act_quantizers(student):
        if id(q) not in sites:
            continue  # not on the path of this input
        shape = sites[id(q)]["shape"]
        site_rows.append({
            "name": name, "bits": q.bits if q.enabled else 32, "effective": q.effective_granularity,
            "enabled": q.enabled, "fine": q.uses_fine, "scale_factors": q.num_scale_factors(shape),
            "stored_ranges": q.num_stored_ranges(), "role": q.role,
        })
    quantized_sites = [s for s in site_rows if s["enabled"]]

    roles = {s["role"] for s in quantized_sites}
    residual = [s["bits"] for s in quantized_sites if s["role"] == "residual"]
    if residual:
        placement, residual_bits = "layer_input", max(residual)
    elif "layer_input" in roles:
        placement, residual_bits = "layer_input", 32
    elif roles:
        placement, residual_bits = "relu_output", max(s["bits"] for s in quantized_sites)
    else:
        placement, residual_bits = "none", 32
    bitops = sum(r["macs"] * r["w_bits"] * r["a_bits"] for r in layers)
    bitops_fp = sum(r["macs"] * 32 * 32 for r in layers)
    stored = [r for r in layers if not r["shared_call"]]
    size_bits = sum(r["weight_params"] * r["w_bits"] + 32 * (r["w_scales"] + r["w_zero_points"] + r["bias_params"])
                    for r in stored) + sum(64 * s["stored_ranges"] for s in site_rows)
    size_bits_fp = sum(32 * (r["weight_params"] + r["bias_params"]) for r in stored)
    return {
        "macs": sum(r["macs"] for r in layers),
        "bitops": bitops,
        "bitops_fp": bitops_fp,
        "bitops_ratio": bitops_fp / bitops if bitops else float("inf"),
        "size_bits": size_bits,
        "size_bits_fp": size_bits_fp,
        "compression": size_bits_fp / size_bits if size_bits else float("inf"),
        "weight_params": sum(r["weight_params"] for r in stored),
        "act_scale_factors": sum(s["scale_factors"] for s in quantized_sites),
        "act_sites": len(quantized_sites),
        "act_memory_bits": reads.bits(),
        "residual_bits": residual_bits,
        "act_placement": placement,
        "fine_fraction": (sum(s["fine"] for s in quantized_sites) / len(quantized_sites)) if quantized_sites else 0.0,
        "layers": layers,
        "sites": site_rows,
    }
