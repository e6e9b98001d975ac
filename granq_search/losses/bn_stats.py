"""BN-statistics matching: record the teacher's BN inputs on generated images, compare them with
the running statistics the teacher learned on real data (GRANQ.md section 3, L_BNS).

Usage::

    with bn_stats_recorder(teacher) as rec:   # teacher in eval mode
        z_t = teacher(images)
    l_bns = bns_loss(rec.stats)               # differentiable w.r.t. the images / generator

The recorded batch statistics keep their autograd graph, so ``l_bns.backward()`` reaches the
generator. Running statistics are copied (detached) at the moment of the call, so they are the
values the layer held when it saw the batch even if the teacher were in train mode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BNStat", "BNStatsHook", "bn_stats_recorder", "batch_stats", "bns_loss"]


class BNStat(NamedTuple):
    """Per-channel statistics of one BN call: batch mean/var of its input and its running stats."""

    mean: Tensor
    var: Tensor
    running_mean: Tensor
    running_var: Tensor


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a BN input.

    Channels are dim 1; the reduction is over every other dim: (N,) for (N, C), (N, L) for
    (N, C, L), (N, H, W) for (N, C, H, W).
    """
    if x.dim() < 2:
        raise ValueError(f"a BatchNorm input has at least 2 dims (N, C, ...), got shape {tuple(x.shape)}")
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean, var


def _tracked_bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm (1d/2d/3d, sync) that keeps running statistics."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None]


class BNStatsHook:
    """Context manager recording :class:`BNStat` for every BN call of ``model`` while active.

    Hooks are registered on entry and removed on exit (also when the body raises). ``stats``
    keeps one entry per BN call, in call order, and stays readable after exit; ``clear()``
    empties it between iterations if one recorder is reused. BatchNorm layers built with
    ``track_running_stats=False`` have nothing to match and are skipped. A model without BN
    layers records nothing and :func:`bns_loss` of the empty list is zero.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = _tracked_bns(model)
        self.stats: list[BNStat] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def _hook(self, module: _BatchNorm, inputs: tuple[Tensor, ...]) -> None:
        mean, var = batch_stats(inputs[0])
        self.stats.append(BNStat(mean, var, module.running_mean.detach().clone(),
                                 module.running_var.detach().clone()))

    def clear(self) -> None:
        self.stats = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> BNStatsHook:
        if self._handles:
            raise RuntimeError("this BNStatsHook is already active")
        self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def bn_stats_recorder(teacher: nn.Module) -> BNStatsHook:
    """A :class:`BNStatsHook` on every BatchNorm of ``teacher``; use it in a ``with`` block."""
    return BNStatsHook(teacher)


def bns_loss(stats: BNStatsHook | list[BNStat] | tuple[BNStat, ...], *,
             device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """Mean over BN calls of MSE(batch mean, running mean) + MSE(batch var, running var).

    ``stats`` is a recorder's ``stats`` list or the :class:`BNStatsHook` itself.
    MSE is the mean squared difference over channels. With no statistics (a teacher without
    BatchNorm) the result is a zero scalar on ``device``/``dtype`` (default: CPU float32, which
    still adds to tensors on any device as a 0-dim scalar); it carries no gradient.
    """
    if isinstance(stats, BNStatsHook):
        stats = stats.stats
    if not stats:
        return torch.zeros((), device=device, dtype=dtype if dtype is not None else torch.float32)
    terms = []
    for s in stats:
        running_mean = s.running_mean.to(s.mean.dtype)
        running_var = s.running_var.to(s.var.dtype)
        terms.append(torch.mean((s.mean - running_mean) ** 2) + torch.mean((s.var - running_var) ** 2))
    return torch.stack(terms).mean()
