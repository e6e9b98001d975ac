"""evaluate(): top-1/top-5/loss in percent, without gradients, restoring the model's mode."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.pipeline.evaluation import combine, evaluate


class _Fixed(nn.Module):
    """Returns the given logits row by row (the input is the row index)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, idx):
        assert not torch.is_grad_enabled()
        return self.logits[idx.long()] * self.scale


def test_top1_top5_loss():
    torch.manual_seed(0)
    logits = torch.randn(12, 7)
    labels = torch.randint(0, 7, (12,))
    loader = [(torch.arange(0, 5), labels[:5]), (torch.arange(5, 12), labels[5:])]
    model = _Fixed(logits).train()
    r = evaluate(model, loader, "cpu")
    assert model.training  # mode restored
    top5 = logits.topk(5, 1).indices
    assert r["n"] == 12
    assert math.isclose(r["top1"], 100 * int((logits.argmax(1) == labels).sum()) / 12)
    assert math.isclose(r["top5"], 100 * int((top5 == labels[:, None]).any(1).sum()) / 12)
    assert math.isclose(r["loss"], float(F.cross_entropy(logits, labels)), rel_tol=1e-5)


def test_top5_with_fewer_classes_and_combine():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    r = evaluate(_Fixed(logits), [(torch.arange(2), torch.tensor([0, 0]))], "cpu")
    assert r["top1"] == 50.0 and r["top5"] == 100.0  # top-min(5, 3)
    c = combine({"top1": 50.0, "top5": 100.0, "loss": 1.0, "n": 2}, {"top1": 100.0, "top5": 100.0, "loss": 4.0, "n": 6})
    assert c == {"top1": 87.5, "top5": 100.0, "loss": 3.25, "n": 8}
