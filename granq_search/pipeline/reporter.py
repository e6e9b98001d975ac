"""The small interface through which the trainer reports; it imports neither Ray nor MLflow.

The terminal, the Ray Tune trainable, the MLflow record of ``train`` and tests each implement
:class:`Reporter`. The metric keys it passes are the names of :mod:`granq_search.metrics`
(``Kind.EPOCH`` / ``Kind.EVAL`` metrics per epoch, those with ``final=True`` at the end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Reporter", "NullReporter", "CompositeReporter", "StopTraining"]


class StopTraining(Exception):
    """Raised by a reporter to end training early and cleanly (for example an early stop)."""


class Reporter:
    """Callbacks of one training run; every method is optional."""

    def on_start(self, info: Mapping[str, Any]) -> None:
        """Once, before the first epoch: resolved config (flat), teacher accuracy
        (``teacher_val_top1``, ``teacher_test_top1``), efficiency, the ``ptq_*`` figures."""

    def on_iteration(self, epoch: int, iteration: int, losses: Mapping[str, float]) -> None:
        """After each training iteration (cheap: must not block); ``losses``: ``metrics.EPOCH_LOSSES``."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float], checkpoint: Path | None) -> None:
        """After each epoch's validation, with the epoch's metrics (``metrics.EPOCH_METRICS``; the
        ``eval`` ones only after a validating epoch); ``checkpoint`` is the epoch's checkpoint
        file if written.

        May raise :class:`StopTraining` to stop the run after this epoch.
        """

    def on_end(self, final: Mapping[str, Any]) -> None:
        """Once, with the final metrics (validation and test, drops, efficiency)."""


class NullReporter(Reporter):
    pass


class CompositeReporter(Reporter):
    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def on_start(self, info):
        for r in self.reporters:
            r.on_start(info)

    def on_iteration(self, epoch, iteration, losses):
        for r in self.reporters:
            r.on_iteration(epoch, iteration, losses)

    def on_epoch_end(self, epoch, metrics, checkpoint):
        for r in self.reporters:
            r.on_epoch_end(epoch, metrics, checkpoint)

    def on_end(self, final):
        for r in self.reporters:
            r.on_end(final)
