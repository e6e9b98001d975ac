"""CIFAR ResNet-20 in the layout of the ``pytorchcv`` model zoo (projection shortcuts).

Parameter names match pytorchcv's state dicts, so its published ``resnet20_cifar10`` and
``resnet20_cifar100`` weights load into these modules unchanged:

    features.init_block.{conv,bn}                      3x3 conv block (conv, BN, ReLU)
    features.stage{1,2,3}.unit{1,2,3}.body.conv1.{conv,bn}
    features.stage{1,2,3}.unit{1,2,3}.body.conv2.{conv,bn}
    features.stage{2,3}.unit1.identity_conv.{conv,bn}  1x1 stride-2 projection shortcut
    output                                             the linear classifier

Each ReLU is its own ``nn.ReLU`` module (``activ``), out of place. Published weights come from
a local checkpoint (``model.checkpoint``), or from ``pytorchcv.model_provider.get_model(name,
pretrained=True)`` when the optional ``pytorchcv`` package is installed and the machine is
online. Normalisation of pytorchcv's CIFAR models: mean (0.4914, 0.4822, 0.4465), std
(0.2023, 0.1994, 0.2010).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from granq_search.errors import CheckpointError, ModelError
from granq_search.models.spec import ModelEntry, model_entry

__all__ = ["PytorchcvCifarResNet", "ConvBlock", "ResUnit", "pytorchcv_resnet20", "MODELS"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class ConvBlock(nn.Module):
    """Conv (no bias), BN, optional ReLU: pytorchcv's ``ConvBlock``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, activate: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.activ = nn.ReLU() if activate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        if self.activ is not None:  # fixed at construction: FX sees a constant branch
            x = self.activ(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, 3, stride, activate=True)
        self.conv2 = ConvBlock(out_ch, out_ch, 3, 1, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ResUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.resize_identity = in_ch != out_ch or stride != 1
        self.body = ResBlock(in_ch, out_ch, stride)
        if self.resize_identity:
            self.identity_conv = ConvBlock(in_ch, out_ch, 1, stride, activate=False)
        self.activ = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity_conv(x) if self.resize_identity else x
        return self.activ(self.body(x) + identity)


class PytorchcvCifarResNet(nn.Module):
    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.features = nn.Sequential()
        self.features.add_module("init_block", ConvBlock(in_channels, 16, 3, 1, activate=True))
        in_ch = 16
        for i, out_ch in enumerate((16, 32, 64)):
            stage = nn.Sequential()
            for j in range(n):
                stride = 2 if (j == 0 and i != 0) else 1
                stage.add_module(f"unit{j + 1}", ResUnit(in_ch, out_ch, stride))
                in_ch = out_ch
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.flatten(self.features(x), 1))


def pytorchcv_resnet20(num_classes: int = 10) -> PytorchcvCifarResNet:
    return PytorchcvCifarResNet(20, num_classes)


def _from_pytorchcv(zoo_name: str, default_classes: int):
    def load(num_classes: int) -> nn.Module:
        if num_classes != default_classes:
            raise ModelError(f"published {zoo_name} weights have {default_classes} classes, not "
                             f"{num_classes}; set model.num_classes={default_classes} or pass model.checkpoint=PATH")
        try:
            from pytorchcv.model_provider import get_model  # optional dependency
        except ImportError:
            raise ModelError(f"published weights for {zoo_name} need the optional package pytorchcv "
                             f"(pip install 'granq_search[pytorchcv]'); or pass model.checkpoint=PATH") from None
        try:
            zoo_model = get_model(zoo_name, pretrained=True)
        except Exception as e:  # network failures surface as many exception types
            raise ModelError(f"cannot download {zoo_name} weights through pytorchcv "
                             f"({type(e).__name__}: {e}); pass model.checkpoint=PATH") from None
        model = pytorchcv_resnet20(num_classes)
        from granq_search.models.checkpoint import load_state_dict_into

        try:
            load_state_dict_into(model, zoo_model.state_dict(), source=f"pytorchcv {zoo_name}")
        except CheckpointError as e:
            # A future pytorchcv release may rename modules; its own model is still a valid
            # teacher (nn.ReLU modules, plain convs), so use it rather than fail.
            warnings.warn(f"pytorchcv layout differs from ours ({e}); using pytorchcv's module", stacklevel=2)
            return zoo_model
        return model

    return load


MODELS: tuple[ModelEntry, ...] = (
    model_entry("resnet20_cifar10", pytorchcv_resnet20, num_classes=10, image_size=32, in_channels=3,
                mean=CIFAR_MEAN, std=CIFAR_STD, dataset="cifar10",
                description="ResNet-20, pytorchcv layout (projection shortcuts), CIFAR-10",
                pretrained=_from_pytorchcv("resnet20_cifar10", 10)),
    model_entry("resnet20_cifar100", pytorchcv_resnet20, num_classes=100, image_size=32, in_channels=3,
                mean=CIFAR_MEAN, std=CIFAR_STD, dataset="cifar100",
                description="ResNet-20, pytorchcv layout (projection shortcuts), CIFAR-100",
                pretrained=_from_pytorchcv("resnet20_cifar100", 100)),
)
"""The registry's entries for this module (collected by :mod:`granq_search.models.registry`)."""
