"""CIFAR ResNets of He et al. (2016) with "option A" shortcuts (ResNet-20/32/44/56/110).

The layout and parameter names follow the widely shared CIFAR implementation whose checkpoints
circulate as ``resnet20-*.th`` (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``,
``linear``), so those checkpoints load directly. Three stages of ``(depth - 2) / 6`` basic
blocks with 16/32/64 channels, global average pooling, one linear layer.

Option A: identity shortcuts everywhere; at the two down-sampling blocks the shortcut takes
every second pixel (``x[:, :, ::2, ::2]``) and zero-pads ``planes // 4`` channels on each side,
so it has no parameters. It is a small module with its padding fixed at construction (no
lambda), and every forward below is free of data-dependent control flow, so ``torch.fx``
traces the models for the quantizer's ``prepare``. Activations are ``F.relu`` calls, as in
the shared implementation; each call is its own site for the quantizer.

Normalisation: the shared checkpoint (``../shared/models/resnet20_cifar10_optionA.th``) was
trained on inputs normalised with ImageNet's mean/std (0.485, 0.456, 0.406) /
(0.229, 0.224, 0.225), not CIFAR's own statistics, so these entries carry those values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.models.spec import ModelEntry, model_entry

__all__ = ["CifarResNet", "BasicBlock", "PadShortcut", "resnet_cifar", "MODELS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A down-sampling shortcut: stride-2 subsampling, then ``pad`` zero channels on
    each side of the channel dimension (``planes // 4`` when channels double)."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes != 2 * in_planes:
                raise ValueError("option-A shortcuts only halve the resolution and double channels")
            self.shortcut: nn.Module = PadShortcut(planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1)  # equals avg_pool2d over the full 8x8 map
        return self.linear(torch.flatten(out, 1))


def resnet_cifar(depth: int, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, num_classes)


def _entry(depth: int) -> ModelEntry:
    return model_entry(
        f"resnet{depth}",
        lambda num_classes: resnet_cifar(depth, num_classes),
        num_classes=10,
        image_size=32,
        in_channels=3,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        dataset="cifar10",
        description=f"CIFAR ResNet-{depth}, option-A shortcuts (He et al. 2016); "
        "ImageNet mean/std like the shared checkpoint",
    )


MODELS: tuple[ModelEntry, ...] = tuple(_entry(depth) for depth in (20, 32, 44, 56, 110))
"""The registry's entries for this module (collected by :mod:`granq_search.models.registry`)."""
