"""Learning-rate schedules as pure functions of training progress.

Because the factor depends only on (epoch, iteration) and the config, a resumed run recovers
its learning rates from the epoch counter alone.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

from granq_search.config import OptimConfig, TrainConfig

if TYPE_CHECKING:
    import torch

__all__ = ["lr_factor", "set_lr"]


def lr_factor(optim: OptimConfig, train: TrainConfig, epoch: int, iteration: int, *, student: bool) -> float:
    """Multiplier of the base learning rate at ``iteration`` of ``epoch`` (both 0-based).

    multistep: ``lr_decay`` to the power of the milestones reached (epochs counted from the
    start, warm-up included, as published). cosine: half-cosine from 1 to 0 over the epochs the
    network trains in (the student starts after warm-up). constant: 1.
    """
    if optim.schedule == "constant":
        return 1.0
    if optim.schedule == "multistep":
        return optim.lr_decay ** bisect.bisect_right(list(optim.milestones), epoch)
    start = train.warmup_epochs if student else 0
    span = max(1, train.epochs - start) * train.iters_per_epoch
    done = (epoch - start) * train.iters_per_epoch + iteration
    progress = min(max(done / span, 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, base: float, factor: float) -> float:
    """Set every parameter group of ``opt`` to ``base * factor``; returns that learning rate."""
    lr = base * factor
    for group in opt.param_groups:
        group["lr"] = lr
    return lr
