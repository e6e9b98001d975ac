"""The trainer's :class:`~granq_search.pipeline.reporter.Reporter` for a Ray Tune trial.

Contract (docs/ARCHITECTURE.md): one ``tune.report`` per epoch with the epoch's checkpoint; the
LAST epoch's report is held back and sent once the final metrics are known, merged with them
and ``final: 1.0`` (ASHA stops a trial when ``epoch >= max_t``, so nothing may come after it).
Only scalar metrics go to Ray, plus ``sites_json`` (the per-site granularity report as a JSON
string). Booleans become 0.0/1.0; lists, dicts and the epoch history stay out.

A trial that ends in a failure the trainable recognises (divergence, out of memory, an invalid
config, missing data) reports once more with ``final: 1.0``, a ``failure_reason`` string and no
objectives: the searcher tells Optuna FAIL, the MLflow callback records the reason, and Ray
does not retry a failure that would only repeat itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from granq_search.pipeline.reporter import Reporter

__all__ = ["RayReporter", "scalar_metrics", "RAY_KEYS", "own_metrics"]

_DROP = ("history", "granularity_sites", "config", "data", "efficiency")

#: Keys Ray adds to every result (not ours).
RAY_KEYS = frozenset({
    "config", "trial_id", "experiment_tag", "date", "timestamp", "time_this_iter_s", "time_total_s",
    "time_since_restore", "iterations_since_restore", "training_iteration", "pid", "hostname", "node_ip",
    "done", "should_checkpoint", "checkpoint_dir_name", "timesteps_total", "episodes_total",
    "timesteps_since_restore", "replayed",
})


def own_metrics(result: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's own numbers and short strings from a Ray result (``sites_json`` left out)."""
    return {k: v for k, v in scalar_metrics(result).items() if k not in RAY_KEYS and k != "sites_json"
            and not (isinstance(v, float) and not math.isfinite(v))}


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Keep numbers and short strings; booleans as 0.0/1.0; drop lists, dicts and tensors."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if k in _DROP:
            continue
        if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
            v = v.item()
        if isinstance(v, bool):
            out[k] = 1.0 if v else 0.0
        elif isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, str) and len(v) <= 500:
            out[k] = v
    return out


def _ray_report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
    from ray import tune

    ckpt = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
    tune.report(metrics, checkpoint=ckpt)


class RayReporter(Reporter):
    """Reports epochs to Ray Tune, holding back the last one (see the module docstring).

    Args:
        epochs: the trial's ``train.epochs`` (the epoch whose report is held back).
        extra: constant string facts added to every report (``node_id``, ``device``).
        report: ``(metrics, checkpoint_dir or None) -> None``; Ray's by default (tests swap it).
    """

    def __init__(self, epochs: int, *, extra: Mapping[str, Any] | None = None,
                 report: Callable[[dict[str, Any], Path | None], None] | None = None) -> None:
        self.epochs = int(epochs)
        self.extra = dict(extra or {})
        self._report = report or _ray_report
        self._held: tuple[dict[str, Any], Path | None] | None = None
        self._last: dict[str, Any] = {}
        self.reports = 0

    def _send(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self._report({**metrics, **self.extra}, checkpoint)
        self.reports += 1

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        m = scalar_metrics(metrics)
        self._last = m
        ckpt_dir = Path(checkpoint).parent if checkpoint is not None else None
        if epoch + 1 >= self.epochs:
            self._held = (m, ckpt_dir)
            return
        self._send(m, ckpt_dir)

    def on_end(self, final: Mapping[str, Any]) -> None:
        if self._held is not None:
            base, ckpt_dir = self._held
        else:  # resumed after the last epoch: the last history entry stands in for it
            history = final.get("history") or []
            base, ckpt_dir = (scalar_metrics(history[-1]) if history else {}), None
        merged = {**base, **scalar_metrics(final)}
        sites = final.get("granularity_sites")
        if sites is not None:
            merged["sites_json"] = json.dumps(sites, default=str, separators=(",", ":"))
        merged["final"] = 1.0
        self._held = None
        self._send(merged, ckpt_dir)

    def report_failure(self, reason: str) -> None:
        """End the trial as FAIL with ``reason`` (one line); objectives are left out on purpose."""
        last = self._last.get("val_top1", math.nan)
        # val_top1 keeps Ray's strict metric check (the ASHA metric) satisfied; without ``epoch``
        # ASHA takes no decision on this report.
        msg = " ".join(str(reason).split())[:480]
        self._held = None
        self._send({"final": 1.0, "failure_reason": msg, "val_top1": last}, None)
