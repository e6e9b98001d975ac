"""Quantization granularities: which elements share one range (one scale and zero point).

Each granularity is a small frozen type whose docstring states the shape of its scale. One
function, :func:`reduce_dims`, turns a granularity into the dimensions to reduce over, and
:func:`compute_range` takes the group minima and maxima over them in one vectorized reduction
(no Python loop over channels or samples). The dims are derived from the granularity and the
tensor's shape, never by choosing a granularity from the tensor's rank.

Activations are (N, C, ...) tensors with the channel on dim 1; weights are (O, I, kh, kw)
(conv) or (O, I) (linear) with the output channel on dim 0.

A fine granularity whose groups would each hold a single value quantizes nothing (the range
of one value, widened to contain 0, represents it exactly). :func:`resolve` replaces it by the
next coarser one, and quantizers report the replacement:

* weights, :class:`PerKernel` on a 1x1 conv or a linear layer -> :class:`PerOutputChannel`
  (reported ``"per_channel (1x1 fallback)"``); the public GranQ code silently leaves such
  layers in full precision instead.
* activations, :class:`PerSampleChannel` on an input without spatial extent (an (N, C)
  tensor, or 1x1 maps) -> :class:`PerChannel` (reported ``"per_channel (single-value
  fallback)"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from granq_search.errors import ConfigError

__all__ = [
    "PerTensor",
    "PerChannel",
    "PerSampleChannel",
    "PerOutputChannel",
    "PerKernel",
    "ThresholdSelected",
    "Granularity",
    "ACT_GRANULARITIES",
    "WEIGHT_GRANULARITIES",
    "act_granularity",
    "weight_granularity",
    "reduce_dims",
    "compute_range",
    "resolve",
]


@dataclass(frozen=True)
class PerTensor:
    """One range for the whole tensor (layer-wise), for activations and weights.

    Scale shape: all ones, ``(1, 1, 1, 1)`` for an (N, C, H, W) tensor.
    """

    name: ClassVar[str] = "per_tensor"


@dataclass(frozen=True)
class PerChannel:
    """Activations: one range per channel, shared by all samples of the batch (conventional
    channel-wise). Scale shape ``(1, C, 1, 1)`` for an (N, C, H, W) input, ``(1, C)`` for (N, C).
    """

    name: ClassVar[str] = "per_channel"


@dataclass(frozen=True)
class PerSampleChannel:
    """Activations, GranQ: one range per (sample, channel), reduced over the spatial dims.

    Scale shape ``(N, C, 1, 1)`` for an (N, C, H, W) input; ``(N, C)`` for an (N, C) input,
    where every group is a single value (quantizers :func:`resolve` that case to
    :class:`PerChannel`).
    """

    name: ClassVar[str] = "per_sample_channel"


@dataclass(frozen=True)
class PerOutputChannel:
    """Weights: one range per output channel. Scale shape ``(O, 1, 1, 1)`` for a conv weight
    (O, I, kh, kw), ``(O, 1)`` for a linear weight (O, I)."""

    name: ClassVar[str] = "per_channel"


@dataclass(frozen=True)
class PerKernel:
    """Weights, as in the public GranQ code: one range per (output, input) kernel of kh x kw
    values. Scale shape ``(O, I, 1, 1)`` for a conv weight (O, I, kh, kw). For 1x1 convs and
    linear layers a kernel is one value, so quantizers :func:`resolve` it to
    :class:`PerOutputChannel` and report ``"per_channel (1x1 fallback)"``."""

    name: ClassVar[str] = "per_kernel"


@dataclass(frozen=True)
class ThresholdSelected:
    """Activations: chosen per site at calibration between ``coarse`` (per tensor) and ``fine``
    (per (sample, channel)) by the threshold tau on the relative MSE reduction. Scale shape:
    that of the granularity chosen for the site; it has no reduction dims of its own."""

    name: ClassVar[str] = "threshold"
    coarse: PerTensor = PerTensor()
    fine: PerSampleChannel = PerSampleChannel()


Granularity = Union[PerTensor, PerChannel, PerSampleChannel, PerOutputChannel, PerKernel, ThresholdSelected]

ACT_GRANULARITIES: dict[str, Granularity] = {
    "per_tensor": PerTensor(),
    "per_channel": PerChannel(),
    "per_sample_channel": PerSampleChannel(),
    "threshold": ThresholdSelected(),
}
WEIGHT_GRANULARITIES: dict[str, Granularity] = {
    "per_tensor": PerTensor(),
    "per_channel": PerOutputChannel(),
    "per_kernel": PerKernel(),
}


def _lookup(table: dict[str, Granularity], name: str, field: str) -> Granularity:
    try:
        return table[name]
    except (KeyError, TypeError):
        allowed = ", ".join(repr(k) for k in table)
        raise ConfigError(f"{name!r} is not allowed; choose one of {allowed}", field=field) from None


def act_granularity(name: str, field: str = "act.granularity") -> Granularity:
    """The activation granularity type for a config name."""
    return _lookup(ACT_GRANULARITIES, name, field)


def weight_granularity(name: str, field: str = "weight.granularity") -> Granularity:
    """The weight granularity type for a config name."""
    return _lookup(WEIGHT_GRANULARITIES, name, field)


def reduce_dims(granularity: Granularity, x: torch.Tensor | torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """The dims of ``x`` (a tensor or its shape) reduced to get one range per group."""
    ndim = len(x.shape) if isinstance(x, torch.Tensor) else len(x)
    if isinstance(granularity, PerTensor):
        return tuple(range(ndim))
    if isinstance(granularity, PerChannel):
        return (0, *range(2, ndim))
    if isinstance(granularity, (PerSampleChannel, PerKernel)):
        return tuple(range(2, ndim))
    if isinstance(granularity, PerOutputChannel):
        return tuple(range(1, ndim))
    if isinstance(granularity, ThresholdSelected):
        raise ValueError("'threshold' has no reduction dims of its own; use the granularity chosen at calibration")
    raise TypeError(f"not a granularity: {granularity!r}")


def compute_range(granularity: Granularity, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group minima and maxima ``(lo, hi)``, with the reduced dims kept (size 1).

    Vectorized, no loop over groups. ``amin`` and ``amax`` rather than one ``torch.aminmax``
    call: on CPU ``aminmax`` over inner dims is about 25x slower than the two reductions
    together (torch 2.14, (128, 16, 32, 32): 4.8 ms against 0.2 ms). When the reduced dims
    mix trailing dims with leading ones (per channel: dims 0, 2, 3), the contiguous trailing
    block is reduced first and the small result next; min and max are exact, so the result
    is the same as one reduction, only faster.
    """
    dims = reduce_dims(granularity, x)
    x = x.detach()
    if not dims:  # every element is its own group (torch would reduce over all dims)
        return x, x
    tail: list[int] = []
    for d in range(x.dim() - 1, -1, -1):
        if d not in dims:
            break
        tail.append(d)
    head = tuple(d for d in dims if d not in tail)
    if tail and head:
        lo = torch.amin(x, dim=tuple(tail), keepdim=True).amin(dim=head, keepdim=True)
        hi = torch.amax(x, dim=tuple(tail), keepdim=True).amax(dim=head, keepdim=True)
        return lo, hi
    return torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)


def resolve(granularity: Granularity, shape: torch.Size | tuple[int, ...]) -> tuple[Granularity, str | None]:
    """The granularity actually used for a tensor of ``shape``, and a fallback note or None.

    Replaces a fine granularity whose groups would each hold one value (see module docstring).
    """
    single = math.prod(shape[2:]) == 1
    if isinstance(granularity, PerKernel) and single:
        return PerOutputChannel(), "1x1 fallback"
    if isinstance(granularity, PerSampleChannel) and single:
        return PerChannel(), "single-value fallback"
    return granularity, None


def describe(granularity: Granularity, note: str | None) -> str:
    """Report string: ``"per_channel (1x1 fallback)"`` or just the name."""
    return f"{granularity.name} ({note})" if note else granularity.name
