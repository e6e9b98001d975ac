"""Quantizer modules: activation quantizers and weight-quantized Conv2d / Linear.

A quantizer is a few independent choices (bits, granularity, range mode, signedness) held in
one small spec (:class:`ActSpec`, :class:`WeightSpec`), never a subclass per combination. All
numerics go through :func:`~granq_search.quant.fake_quant.fake_quantize`.

Activation range modes (:class:`ActQuantizer`):

* ``dynamic``: the range is taken from the current tensor on every forward, in training and
  in evaluation (as the public GranQ code does).
* ``static``: ranges are observed during calibration (min/max over all calibration batches),
  then frozen in the ``lo``/``hi`` buffers. A per-(sample, channel) range cannot be frozen,
  because the samples change from batch to batch: **static per_sample_channel freezes one range
  per channel, i.e. static GranQ is static per-channel**; it is reported as
  ``"per_channel (static)"``. Static per_tensor freezes one scalar range.

``threshold`` granularity: during calibration the site accumulates the squared error of the
per-tensor and of the fine quantization of its incoming activations, at its own bit-width and
with each batch's own ranges. The fine candidate is per-(sample, channel) for dynamic sites and
per-channel for static ones (what the site would really use). With
``r = clamp(1 - mse_fine / mse_tensor, 0, 1)`` (``r = 0`` when ``mse_tensor == 0``) the site
uses the fine granularity iff ``tau < 1 and r >= tau``: tau = 0 makes every site fine, tau = 1
none, and the number of fine sites never grows with tau. ``r``, the decision and the
calibrated flag are buffers, so they travel in the state dict.

During calibration a site only observes and passes its input through unchanged, so every site
sees full-precision activations from upstream.

Weights (:class:`QuantConv2d`, :class:`QuantLinear`) keep the parameter names ``weight`` and
``bias`` of the float layers, so float state dicts load unchanged; their ranges are computed
from the current weights on every forward (cheap: weights are small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.errors import ConfigError
from granq_search.quant.fake_quant import fake_quantize
from granq_search.quant.granularity import (
    Granularity,
    PerChannel,
    PerSampleChannel,
    PerTensor,
    ThresholdSelected,
    act_granularity,
    compute_range,
    describe,
    reduce_dims,
    resolve,
    weight_granularity,
)

__all__ = ["ActSpec", "WeightSpec", "ActQuantizer", "QuantConv2d", "QuantLinear", "FLOAT"]

ROLES = ("relu_output", "layer_input", "residual")
"""Where an activation quantizer sits: at a ReLU output (placement relu_output), at a layer's
input (placement layer_input), or at a ReLU output on the residual stream (layer_input with
``residual_bits``)."""

FLOAT = "none (float)"
"""Effective granularity reported for a quantizer that is switched off."""


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"{bits!r} bits is out of range; allowed 2..8", field="bits")


@dataclass(frozen=True)
class ActSpec:
    """Activation quantizer choices (validated like ``ActQuantConfig``)."""

    bits: int = 4
    granularity: str = "per_sample_channel"
    threshold: float = 0.5
    range_mode: str = "dynamic"
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        act_granularity(self.granularity, field="granularity")
        if not (isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0):
            raise ConfigError(f"{self.threshold!r} is outside [0, 1]", field="threshold")
        if self.range_mode not in ("dynamic", "static"):
            raise ConfigError(f"{self.range_mode!r} is not allowed; choose one of 'dynamic', 'static'",
                              field="range_mode")


@dataclass(frozen=True)
class WeightSpec:
    """Weight quantizer choices (validated like ``WeightQuantConfig``)."""

    bits: int = 4
    granularity: str = "per_channel"
    symmetric: bool = False

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        weight_granularity(self.granularity, field="granularity")


# --------------------------------------------------------------------------- activations


def _sq_error(x: torch.Tensor, granularity: Granularity, bits: int) -> torch.Tensor:
    lo, hi = compute_range(granularity, x)
    return (fake_quantize(x, lo, hi, bits) - x).square().sum(dtype=torch.float64)


class ActQuantizer(nn.Module):
    """Fake-quantizes the output of one activation call site (see the module docstring).

    ``site`` is the readable site name used in reports and override matching.
    """

    def __init__(self, bits: int = 4, granularity: str = "per_sample_channel", threshold: float = 0.5,
                 range_mode: str = "dynamic", enabled: bool = True, site: str = "",
                 producer: str | None = None, role: str = "relu_output") -> None:
        super().__init__()
        if role not in ROLES:
            raise ConfigError(f"{role!r} is not allowed; choose one of {', '.join(map(repr, ROLES))}", field="role")
        self.role = role
        spec = ActSpec(bits, granularity, float(threshold), range_mode, bool(enabled))
        self.bits = spec.bits
        self.granularity = spec.granularity
        self.threshold = spec.threshold
        self.range_mode = spec.range_mode
        self.enabled = spec.enabled
        self.site = site
        self.producer = producer
        self._gran = act_granularity(spec.granularity)
        self.register_buffer("lo", torch.empty(0))
        self.register_buffer("hi", torch.empty(0))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("fine", torch.tensor(False))
        self.register_buffer("ratio", torch.tensor(float("nan")))
        # Python mirrors of the flag buffers: reading a CUDA buffer on every forward would sync.
        self._calibrated = False
        self._fine = False
        self._observing = False
        self._passthrough = False
        self.last_shape: tuple[int, ...] | None = None
        self._reset_observations()

    @classmethod
    def from_spec(cls, spec: ActSpec, site: str = "", producer: str | None = None,
                  role: str = "relu_output") -> ActQuantizer:
        return cls(spec.bits, spec.granularity, spec.threshold, spec.range_mode, spec.enabled, site, producer, role)

    @property
    def spec(self) -> ActSpec:
        return ActSpec(self.bits, self.granularity, self.threshold, self.range_mode, self.enabled)

    # ------------------------------------------------------------------ state

    @property
    def is_threshold(self) -> bool:
        return isinstance(self._gran, ThresholdSelected)

    @property
    def requires_calibration(self) -> bool:
        """Static ranges and threshold decisions come from calibration."""
        return self.enabled and (self.range_mode == "static" or self.is_threshold)

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    def _reset_observations(self) -> None:
        self._obs_lo: torch.Tensor | None = None
        self._obs_hi: torch.Tensor | None = None
        self._sse_coarse: torch.Tensor | float = 0.0
        self._sse_fine: torch.Tensor | float = 0.0
        self._observed = 0

    def _chosen(self, check: bool = True) -> Granularity:
        """The granularity in use (before any single-value fallback)."""
        g = self._gran
        if isinstance(g, ThresholdSelected):
            if check and not self._calibrated:
                raise RuntimeError(f"activation site '{self.site}' has granularity 'threshold', which is chosen on "
                                   "calibration data; call calibrate() first")
            return g.fine if self._fine else g.coarse
        return g

    def _fine_candidate(self, shape: tuple[int, ...]) -> Granularity:
        if self.range_mode == "static":
            return PerChannel()
        return resolve(PerSampleChannel(), shape)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("lo", "hi"):  # frozen ranges take the shape they were calibrated with
            incoming = state_dict.get(prefix + name)
            own = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.shape != own.shape:
                setattr(self, name, torch.empty(incoming.shape, dtype=incoming.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._calibrated = bool(self.calibrated)
        self._fine = bool(self.fine)

    # ------------------------------------------------------------------ calibration

    def begin_calibration(self) -> None:
        """Observe (and pass through unchanged) on the following forwards."""
        self._reset_observations()
        self._observing = True

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.range_mode == "static":
            lo, hi = compute_range(PerChannel(), x)
            if self._obs_lo is None:
                self._obs_lo, self._obs_hi = lo.clone(), hi.clone()
            else:
                torch.minimum(self._obs_lo, lo, out=self._obs_lo)
                torch.maximum(self._obs_hi, hi, out=self._obs_hi)
        if self.is_threshold:
            self._sse_coarse = self._sse_coarse + _sq_error(x, PerTensor(), self.bits)
            self._sse_fine = self._sse_fine + _sq_error(x, self._fine_candidate(tuple(x.shape)), self.bits)
        self._observed += x.numel()

    @torch.no_grad()
    def finalize(self) -> None:
        """End observation: fix the threshold decision and freeze static ranges.

        A site that saw no data during calibration stays uncalibrated (and raises if used).
        """
        if not self._observing:
            return
        self._observing = False
        if self._observed == 0 or not self.requires_calibration:
            self._reset_observations()
            return
        if self.is_threshold:
            sse_c, sse_f = float(self._sse_coarse), float(self._sse_fine)
            r = 0.0 if sse_c <= 0.0 else min(max(1.0 - sse_f / sse_c, 0.0), 1.0)
            r = float(torch.tensor(r, dtype=torch.float32))  # decide on the value that is stored
            fine = self.threshold < 1.0 and r >= self.threshold
            self.ratio.fill_(r)
            self.fine.fill_(fine)
            self._fine = fine
        if self.range_mode == "static":
            assert self._obs_lo is not None and self._obs_hi is not None
            lo, hi = self._obs_lo, self._obs_hi
            if isinstance(self._chosen(check=False), PerTensor):
                ones = (1,) * lo.dim()
                lo, hi = lo.amin().reshape(ones), hi.amax().reshape(ones)
            self.lo = lo.clone()
            self.hi = hi.clone()
        self.calibrated.fill_(True)
        self._calibrated = True
        self._reset_observations()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_shape = tuple(x.shape)
        if not self.enabled or self._passthrough:
            return x
        if self._observing:
            self._observe(x)
            return x
        g = self._chosen()
        if self.range_mode == "static":
            if not self._calibrated:
                raise RuntimeError(f"activation site '{self.site}' uses static ranges; call calibrate() first")
            lo, hi = self.lo, self.hi
        else:
            g, _ = resolve(g, x.shape)
            lo, hi = compute_range(g, x)
        return fake_quantize(x, lo, hi, self.bits)

    # ------------------------------------------------------------------ reporting

    @property
    def uses_fine(self) -> bool:
        """True when the site quantizes with a granularity finer than per tensor."""
        if not self.enabled or (self.is_threshold and not self._calibrated):
            return False
        return not isinstance(self._chosen(), PerTensor)

    @property
    def effective_granularity(self) -> str:
        if not self.enabled:
            return FLOAT
        if self.is_threshold and not self._calibrated:
            return "threshold (uncalibrated)"
        g = self._chosen()
        if self.range_mode == "static":
            return "per_tensor" if isinstance(g, PerTensor) else "per_channel (static)"
        if self.last_shape is not None:
            return describe(*resolve(g, self.last_shape))
        return g.name

    def num_scale_factors(self, shape: tuple[int, ...] | torch.Size | None = None) -> int:
        """Activation scale factors per image: 1 per tensor, C for every finer granularity.

        ``shape`` defaults to the input shape of the last forward.
        """
        if not self.enabled:
            return 0
        if self.is_threshold and not self._calibrated:
            raise RuntimeError(f"activation site '{self.site}' has granularity 'threshold'; call calibrate() first")
        if not self.uses_fine:
            return 1
        shape = tuple(shape) if shape is not None else self.last_shape
        if shape is None:
            raise RuntimeError(f"activation site '{self.site}' has not run yet; pass its input shape")
        return int(shape[1])

    def num_stored_ranges(self) -> int:
        """Frozen (static) ranges held by the site; 0 for dynamic sites."""
        return self.lo.numel() if (self.enabled and self.range_mode == "static" and self._calibrated) else 0

    def extra_repr(self) -> str:
        parts = [f"site={self.site!r}", f"role={self.role}", f"bits={self.bits}",
                 f"granularity={self.granularity}", f"range_mode={self.range_mode}"]
        if self.is_threshold:
            parts.append(f"threshold={self.threshold}")
        if not self.enabled:
            parts.append("enabled=False")
        return ", ".join(parts)


# --------------------------------------------------------------------------- weights


class _WeightQuantMixin:
    weight: nn.Parameter

    def _init_weight_quant(self, spec: WeightSpec) -> None:
        self.w_bits = spec.bits
        self.w_granularity = spec.granularity
        self.w_symmetric = spec.symmetric
        self._w_gran, self._w_note = resolve(weight_granularity(spec.granularity), tuple(self.weight.shape))

    @property
    def weight_spec(self) -> WeightSpec:
        return WeightSpec(self.w_bits, self.w_granularity, self.w_symmetric)

    @property
    def effective_granularity(self) -> str:
        """E.g. ``"per_kernel"`` or ``"per_channel (1x1 fallback)"``."""
        return describe(self._w_gran, self._w_note)

    def quantized_weight(self) -> torch.Tensor:
        lo, hi = compute_range(self._w_gran, self.weight)
        return fake_quantize(self.weight, lo, hi, self.w_bits, self.w_symmetric)

    def num_scale_factors(self) -> int:
        """Weight scale factors (one per group)."""
        dims = set(reduce_dims(self._w_gran, tuple(self.weight.shape)))
        return math.prod(s for d, s in enumerate(self.weight.shape) if d not in dims)

    def num_zero_points(self) -> int:
        """Stored zero points: one per group when asymmetric, none when symmetric."""
        return 0 if self.w_symmetric else self.num_scale_factors()

    def _weight_repr(self) -> str:
        return (f"w_bits={self.w_bits}, w_granularity={self.effective_granularity}"
                + (", symmetric" if self.w_symmetric else ""))


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is fake-quantized on every forward (``weight``/``bias`` kept)."""

    def __init__(self, *args, spec: WeightSpec | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_quant(spec or WeightSpec())

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: WeightSpec) -> QuantConv2d:
        """A quantized conv sharing ``module``'s parameters (no copy, no re-initialisation)."""
        q = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
                dtype=module.weight.dtype, spec=spec)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        q.train(module.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._weight_repr()}"


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """``nn.Linear`` whose weight is fake-quantized on every forward (``weight``/``bias`` kept).

    A linear weight row has no kernel, so ``per_kernel`` falls back to per output channel."""

    def __init__(self, *args, spec: WeightSpec | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_weight_quant(spec or WeightSpec())

    @classmethod
    def from_float(cls, module: nn.Linear, spec: WeightSpec) -> QuantLinear:
        """A quantized linear layer sharing ``module``'s parameters."""
        q = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta",
                dtype=module.weight.dtype, spec=spec)
        q.weight = module.weight
        if module.bias is not None:
            q.bias = module.bias
        q.train(module.training)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._weight_repr()}"
