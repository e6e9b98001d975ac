"""Calibration (static ranges, threshold decisions) and the per-site report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from granq_search.errors import DataError
from granq_search.quant.modules import ActQuantizer
from granq_search.quant.prepare import act_quantizers

__all__ = ["calibrate", "site_report", "needs_calibration"]


def needs_calibration(student: nn.Module) -> bool:
    """True when any enabled site takes something from calibration: a static range or a
    threshold decision, whether or not it has been calibrated already (calibrating again
    re-observes from scratch, e.g. on a warmed-up generator)."""
    return any(q.requires_calibration for _, q in act_quantizers(student))


def _inputs(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images", "input", "x"):
            if key in batch:
                return batch[key]
    return batch


def calibrate(student: nn.Module, batches: Iterable[Any], device: torch.device | str | None = None) -> list[dict]:
    """Observe ``batches`` at every site that needs calibration, then freeze static ranges and
    threshold decisions. Returns :func:`site_report`.

    A batch is an input tensor or a ``(inputs, labels, ...)`` pair/tuple; ``device`` moves the
    inputs there. The student runs in eval mode (BN uses its running statistics) under
    ``torch.no_grad``; the train/eval state of every module is restored afterwards. Sites that
    need no calibration are untouched; when none needs it, this is a no-op that still returns
    the report. Raises :class:`DataError` when a site needs calibration and ``batches`` is empty.
    """
    sites = [q for _, q in act_quantizers(student) if q.requires_calibration]
    if not sites:
        return site_report(student)
    modes = {m: m.training for m in student.modules()}
    student.eval()
    seen = 0
    try:
        for q in sites:
            q.begin_calibration()
        with torch.no_grad():
            for batch in batches:
                x = _inputs(batch)
                if device is not None:
                    x = x.to(device)
                student(x)
                seen += 1
        if seen == 0:
            raise DataError("calibration needs at least one batch; set quant.calib_batches >= 1 "
                            "and check that the data is not empty")
        for q in sites:
            q.finalize()
    finally:
        for q in sites:
            q._observing = False
        for m, t in modes.items():
            m.training = t
    return site_report(student)


def _site_row(name: str, q: ActQuantizer) -> dict[str, Any]:
    has_ratio = q.is_threshold and q.is_calibrated
    return {
        "name": name,
        "granularity": q.granularity,
        "effective": q.effective_granularity,
        "bits": q.bits if q.enabled else 32,
        "range_mode": q.range_mode,
        "threshold": q.threshold if q.is_threshold else None,
        "ratio": float(q.ratio) if has_ratio else None,
        "fine": q.uses_fine,
        "calibrated": q.is_calibrated,
        "enabled": q.enabled,
        "producer": q.producer,
        "role": q.role,
    }


def site_report(student: nn.Module) -> list[dict[str, Any]]:
    """One row per activation site, in graph order: ``name``, requested ``granularity``,
    ``effective`` granularity, ``bits`` (32 when switched off), ``range_mode``, ``threshold``
    (tau, threshold sites only), ``ratio`` (r, calibrated threshold sites only, else None),
    ``fine`` (uses a granularity finer than per tensor), ``calibrated``, ``enabled``,
    ``producer`` (the layer feeding the site), ``role`` (relu_output, layer_input or residual)."""
    return [_site_row(name, q) for name, q in act_quantizers(student)]
