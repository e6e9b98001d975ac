"""The one fake-quantization primitive shared by every quantizer in the package.

Asymmetric (activations, and weights unless ``symmetric``), with ``k`` bits and a group range
``[lo, hi]`` (tensors broadcastable to ``x``, e.g. shape (N, C, 1, 1) for per-(sample,
channel) groups of an (N, C, H, W) tensor)::

    lo, hi = min(lo, 0), max(hi, 0)           # the range always contains 0 ...
    scale  = max(hi - lo, EPS) / (2^k - 1)
    zp     = clamp(round(-lo / scale), 0, 2^k - 1)   # ... so 0 is exactly representable
    q      = clamp(round(x * (1 / scale)) + zp, 0, 2^k - 1)
    x_hat  = (q - zp) * scale

Symmetric (weights only): signed integers in ``[-(2^(k-1) - 1), 2^(k-1) - 1]``, zero point 0,
``scale = max(|lo|, |hi|, EPS) / (2^(k-1) - 1)``.

Notes on the choices:

* Including 0 in the range is standard practice (zero padding and ReLU zeros must stay exact,
  and an integer zero point exists only then). For post-ReLU activations ``lo`` becomes 0.
* ``x * (1 / scale)`` (multiply by the reciprocal, computed once per group) is what
  ``torch.fake_quantize_per_channel_affine`` and friends compute too, so the two agree bit for
  bit in float32; ``round`` is round-half-to-even (``torch.round`` = ``nearbyint``).
* Unlike the public GranQ code, values are clamped to the integer range: a static (calibrated)
  range clips outliers, and rounding at the top of a dynamic range can never exceed ``2^k - 1``.
* Backward is the identity straight-through estimator: the gradient with respect to ``x`` is
  passed through unchanged everywhere, also where the value was clamped (the public code's
  choice; the clamp only bites for static ranges). ``lo`` and ``hi`` receive no gradient.
* The elementwise work runs as one allocation plus four in-place passes on the output buffer,
  with scale and zero point computed once on the small range tensors; it is memory-bound.
  ``docs/benchmarks.md`` has the measured cost relative to ``x.clone()``.
"""

from __future__ import annotations

import torch

__all__ = ["EPS", "fake_quantize", "quant_params", "int_range"]

EPS = 1e-8
"""Smallest range width; a group whose values are all 0 gets ``scale = EPS / (2^k - 1)``."""


def int_range(bits: int, symmetric: bool = False) -> tuple[int, int]:
    """The integer range ``(qmin, qmax)``: ``(0, 2^k - 1)``, or ``(-(2^(k-1) - 1), 2^(k-1) - 1)``."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 2..16, got {bits!r}")
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def quant_params(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                 symmetric: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int, int]:
    """``(scale, zero_point, qmin, qmax)`` for group ranges ``lo``, ``hi``.

    ``scale`` and ``zero_point`` have the broadcast shape of ``lo`` and ``hi`` and dtype
    float32 (or wider); ``zero_point`` holds integers, and is ``None`` for symmetric.
    """
    qmin, qmax = int_range(bits, symmetric)
    dtype = torch.promote_types(torch.promote_types(lo.dtype, hi.dtype), torch.float32)
    lo = lo.detach().to(dtype)
    hi = hi.detach().to(dtype)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()).clamp_(min=EPS).div_(qmax)
        return scale, None, qmin, qmax
    lo = lo.clamp(max=0.0)
    hi = hi.clamp(min=0.0)
    scale = (hi - lo).clamp_(min=EPS).div_(qmax)
    zero_point = torch.round(torch.neg(lo).div_(scale)).clamp_(0, qmax)
    return scale, zero_point, qmin, qmax


def _fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                   symmetric: bool) -> torch.Tensor:
    scale, zero_point, qmin, qmax = quant_params(lo, hi, bits, symmetric)
    q = torch.mul(x.detach(), torch.reciprocal(scale))  # the only full-size allocation
    q.round_()
    if zero_point is None:
        q.clamp_(qmin, qmax)
    else:
        # clamp(q + zp, qmin, qmax) - zp, exactly (integers in float), in two passes instead of three
        torch.maximum(q, torch.sub(qmin, zero_point), out=q)
        torch.minimum(q, torch.sub(qmax, zero_point), out=q)
    q.mul_(scale)
    return q if q.dtype == x.dtype else q.to(x.dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Forward: fake quantization. Backward: identity to ``x`` (straight-through)."""

    @staticmethod
    def forward(ctx, x, lo, hi, bits, symmetric):  # type: ignore[override]
        return _fake_quantize(x, lo, hi, bits, symmetric)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        return grad_output, None, None, None, None


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  symmetric: bool = False) -> torch.Tensor:
    """Quantize ``x`` to ``bits`` bits on the grid given by the group ranges and dequantize.

    ``lo`` and ``hi`` are tensors broadcastable to ``x`` (one value per group, e.g. shape
    (N, C, 1, 1)); see the module docstring for the exact arithmetic. Returns a new tensor of
    ``x``'s shape and dtype. Gradient: identity straight-through estimator to ``x`` only.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _FakeQuantizeSTE.apply(x, lo, hi, bits, symmetric)
    return _fake_quantize(x, lo, hi, bits, symmetric)
