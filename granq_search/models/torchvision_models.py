"""ImageNet teachers from torchvision: ResNet-18, ResNet-50, MobileNetV2.

Published weights come through torchvision's own ``weights="DEFAULT"`` mechanism (downloaded
once into the torch hub cache, so a machine that has them cached works offline); without a
network and without a cached copy the loader raises a one-line :class:`ModelError` asking for
``model.checkpoint=PATH``. A local checkpoint in torchvision's state-dict layout works too.
"""

from __future__ import annotations

from collections.abc import Callable

import torchvision
from torch import nn

from granq_search.errors import ModelError
from granq_search.models.registry import register_model

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pretrained(name: str, builder: Callable[..., nn.Module]) -> Callable[[int], nn.Module]:
    def load(num_classes: int) -> nn.Module:
        if num_classes != 1000:
            raise ModelError(f"published {name} weights have 1000 classes, not {num_classes}; "
                             "set model.num_classes=1000 or pass model.checkpoint=PATH")
        try:
            return builder(weights="DEFAULT")
        except Exception as e:  # URLError, OSError, RuntimeError, ... depending on the failure
            raise ModelError(f"cannot download {name} weights through torchvision "
                             f"({type(e).__name__}: {e}); pass model.checkpoint=PATH") from None

    return load


def _register(name: str, builder: Callable[..., nn.Module], description: str) -> None:
    register_model(
        name, num_classes=1000, image_size=224, in_channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        dataset="imagenet", description=description, pretrained=_pretrained(name, builder),
    )(lambda num_classes: builder(weights=None, num_classes=num_classes))


_register("resnet18", torchvision.models.resnet18, "torchvision ResNet-18, ImageNet")
_register("resnet50", torchvision.models.resnet50, "torchvision ResNet-50, ImageNet")
_register("mobilenet_v2", torchvision.models.mobilenet_v2, "torchvision MobileNetV2, ImageNet")
