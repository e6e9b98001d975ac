"""Costs known before training: the quantized model's BitOPs and size, from the config alone.

Used for the space's ``constraints`` (budgets checked before a trial is given any compute).
BitOPs and weight bits depend on the architecture and the quantization spec, not on the
weights, so the architecture is built with random weights (no download, no teacher) and
prepared by the run's own chain (:mod:`granq_search.pipeline.build`): ``build_student(cfg)``,
``calibrate_student``, then ``efficiency_figures(student, (1,C,S,S))``.
Sites that need calibration first (static ranges, threshold-selected granularity) are calibrated
on two batches of noise: which sites a threshold makes fine changes the scale-factor count, not
BitOPs or weight bits, and a static range costs the same 64 bits whatever its value.
"""

from __future__ import annotations

import json
from typing import Any

from granq_search.config import ExperimentConfig, to_dict

__all__ = ["EfficiencyCost", "efficiency_of"]


def efficiency_of(cfg: ExperimentConfig) -> dict[str, float]:
    """Scalar efficiency figures of ``cfg``'s quantized student (bitops, size_bits, ...)."""
    import torch

    from granq_search.pipeline.build import build_student, calibrate_student, efficiency_figures

    student, shape = build_student(cfg)

    def noise() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return [torch.randn((8, *shape[1:]), generator=gen) for _ in range(2)]

    calibrate_student(student, noise)
    eff = efficiency_figures(student, shape)
    return {k: float(v) for k, v in eff.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class EfficiencyCost:
    """Picklable ``cfg -> {metric: value}`` with a small cache keyed on model + quant settings."""

    def __init__(self) -> None:
        self._cache: dict[str, dict[str, float]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"_cache": {}}

    def __call__(self, cfg: ExperimentConfig) -> dict[str, float]:
        key = json.dumps([to_dict(cfg.model), to_dict(cfg.quant)], sort_keys=True)
        if key not in self._cache:
            self._cache[key] = efficiency_of(cfg)
        return self._cache[key]
