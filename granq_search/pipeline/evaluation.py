"""Classification accuracy on labelled data: top-1, top-5 and mean cross-entropy.

:func:`evaluate` runs without gradients and in eval mode, and puts the model back in the mode
it found it in. :func:`combine` merges results of disjoint splits (weighted by their sizes),
which is how the ``all`` figure of the ``evaluate`` command is obtained from ``val`` and
``test`` without a third pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.errors import GranqError

__all__ = ["evaluate", "combine", "resolve_device"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``, checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise GranqError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GranqError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str) -> dict[str, float]:
    """``{"top1", "top5", "loss", "n"}``: accuracies in percent, top-5 as top-min(5, classes),
    loss the mean cross-entropy per image, n the number of images."""
    device = torch.device(device) if isinstance(device, str) else device
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hits = topk == y.unsqueeze(1)
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            n += y.shape[0]
    finally:
        model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n, "n": n}


def combine(*results: Mapping[str, float]) -> dict[str, float]:
    """Results of disjoint splits merged as if evaluated together (weighted by ``n``)."""
    n = sum(int(r["n"]) for r in results)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    out = {k: sum(float(r[k]) * int(r["n"]) for r in results) / n for k in ("top1", "top5", "loss")}
    out["n"] = n
    return out
