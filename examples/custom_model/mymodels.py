"""Your own model for granq_search: a small CNN for 8x8 grey images, and its factory.

A config names the factory by import path, ``MODULE:FACTORY``::

    model:
      name: mymodels:small_cnn      # this file must be importable: run from its folder, or PYTHONPATH
      checkpoint: small_cnn.pt      # the trained weights (python train_teacher.py writes them)

``@model_factory`` declares what granq_search needs to know about the inputs: the image size,
the channels, and the normalisation the weights were trained with. The factory takes
``num_classes`` and returns the network with random weights; the weights come from
``model.checkpoint``. The forward is plain PyTorch that ``torch.fx`` can trace: ``nn.Conv2d`` /
``nn.Linear`` modules, ReLUs (modules or ``F.relu``), no data-dependent ``if``.
"""

from __future__ import annotations

import torch
from torch import nn

from granq_search.models import model_factory

MEAN = (0.3053,)
"""Per-channel mean of the training images scaled to [0, 1] (pixel / 16)."""
STD = (0.3760,)


class SmallCNN(nn.Module):
    """conv-BN-ReLU x 3 (the second with stride 2), global average pool, linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


@model_factory(num_classes=10, image_size=8, in_channels=1, mean=MEAN, std=STD, dataset="digits",
               description="small CNN of examples/custom_model")
def small_cnn(num_classes: int = 10) -> SmallCNN:
    """The architecture of ``small_cnn.pt`` (random weights)."""
    return SmallCNN(num_classes=num_classes, width=16)
