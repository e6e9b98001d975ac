"""Small models on scikit-learn's 8x8 handwritten digits: the default teacher and a test model.

``digits_cnn`` is the project's embedded default: its data ships with scikit-learn, it trains on
the spot in a few seconds on two CPU cores (see :func:`train_digits_model`), and it reaches
about 98% test accuracy, so the whole pipeline runs end to end on any machine.

``tiny_test`` is the smallest model that still exercises what the quantizer must handle: BN
after each conv, a ReLU module called at two sites, a second ReLU module, an ``F.relu``
call, a residual add and a 1x1 conv.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.models.spec import ModelEntry, model_entry

__all__ = ["DigitsCNN", "TinyTest", "DIGITS_MEAN", "DIGITS_STD", "DIGITS_RECIPE", "MODELS", "train_digits_model"]

# Mean and std of all 1,797 sklearn digits images scaled to [0, 1] (pixel / 16), computed once:
#   x = load_digits().images / 16; x.mean() = 0.30526, x.std() = 0.37605
DIGITS_MEAN = (0.3053,)
DIGITS_STD = (0.3760,)


class DigitsCNN(nn.Module):
    """conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU, avg-pool to 4x4, conv(32->32)-BN-ReLU,
    global average pool, linear(32->classes). One ``nn.ReLU`` module per call site."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(32, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.linear(torch.flatten(self.gap(x), 1))


class TinyTest(nn.Module):
    """A few hundred parameters on 1x8x8 inputs, for fast tests of the quantizer plumbing."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()  # called twice: after bn1 and after the residual add
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.conv4 = nn.Conv2d(16, 16, 1, bias=True)  # a 1x1 conv, followed by F.relu
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        x = self.relu2(self.bn3(self.conv3(x)))
        x = F.relu(self.conv4(x))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


MODELS: tuple[ModelEntry, ...] = (
    model_entry("digits_cnn", DigitsCNN, num_classes=10, image_size=8, in_channels=1, mean=DIGITS_MEAN,
                std=DIGITS_STD, dataset="digits",
                description="small CNN for sklearn 8x8 digits; trained on the spot when no checkpoint"),
    model_entry("tiny_test", TinyTest, num_classes=10, image_size=8, in_channels=1, mean=DIGITS_MEAN,
                std=DIGITS_STD, dataset="digits",
                description="smallest test model (BN, a ReLU called twice, F.relu, 1x1 conv)"),
)
"""The registry's entries for this module (collected by :mod:`granq_search.models.registry`)."""


# --------------------------------------------------------------------------- on-the-spot training

DIGITS_RECIPE = {
    "version": 1,
    "seed": 0,
    "epochs": 30,
    "batch_size": 64,
    "lr": 0.01,
    "weight_decay": 1e-4,
    "shift": 1,
}
"""The training recipe of the on-the-spot digits teacher. Changing any value changes the
cache key, so stale cached teachers are never reused; bump ``version`` when the code changes."""


def train_digits_model(factory: Callable[[], nn.Module], images: torch.Tensor, labels: torch.Tensor,
                       recipe: dict | None = None) -> nn.Module:
    """Train ``factory()`` on normalised ``images`` (N, 1, 8, 8) and ``labels`` (N,).

    Seeded and single-process: Adam with a one-cycle (warm-up, then cosine) learning-rate
    schedule, random shifts of up to ``shift`` pixels (blank-padded) as the only augmentation.
    A few seconds on two CPU cores. The global RNG state is left as it was.
    """
    r = dict(DIGITS_RECIPE if recipe is None else recipe)
    gen = torch.Generator().manual_seed(int(r["seed"]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(r["seed"]))
        model = factory()
    n = images.shape[0]
    bs = int(r["batch_size"])
    steps_per_epoch = (n + bs - 1) // bs
    total = int(r["epochs"]) * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=float(r["lr"]), weight_decay=float(r["weight_decay"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(r["lr"]), total_steps=total,
                                                pct_start=0.15)
    shift = int(r["shift"])
    fill = images.amin()  # the normalised value of a blank (0) pixel
    model.train()
    for _ in range(int(r["epochs"])):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            x, y = images[idx], labels[idx]
            if shift:
                x = _random_shift(x, shift, gen, fill)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def _random_shift(x: torch.Tensor, shift: int, gen: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """Shift the whole batch by one random (dy, dx) in [-shift, shift], padding with ``fill``."""
    dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=gen))
    if dy == 0 and dx == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift), value=float(fill))
    return padded[..., shift - dy:shift - dy + h, shift - dx:shift - dx + w]
