"""ImageNet teachers from torchvision: ResNet-18, ResNet-50, MobileNetV2.

Published weights come through torchvision's own ``weights="DEFAULT"`` mechanism (downloaded
once into the torch hub cache, so a machine that has them cached works offline); without a
network and without a cached copy the loader raises a one-line :class:`ModelError` asking for
``model.checkpoint=PATH``. A local checkpoint in torchvision's state-dict layout works too.
torchvision is imported when one of these models is built, not when the registry is.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from granq_search.errors import ModelError
from granq_search.models.spec import ModelEntry, model_entry

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MODELS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _builder(name: str) -> Callable[..., nn.Module]:
    import torchvision

    return getattr(torchvision.models, name)


def _random(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return _builder(name)(weights=None, num_classes=num_classes)

    return build


def _pretrained(name: str) -> Callable[[int], nn.Module]:
    def load(num_classes: int) -> nn.Module:
        if num_classes != 1000:
            raise ModelError(f"published {name} weights have 1000 classes, not {num_classes}; "
                             "set model.num_classes=1000 or pass model.checkpoint=PATH")
        try:
            return _builder(name)(weights="DEFAULT")
        except Exception as e:  # URLError, OSError, RuntimeError, ... depending on the failure
            raise ModelError(f"cannot download {name} weights through torchvision "
                             f"({type(e).__name__}: {e}); pass model.checkpoint=PATH") from None

    return load


def _entry(name: str, description: str) -> ModelEntry:
    return model_entry(name, _random(name), num_classes=1000, image_size=224, in_channels=3, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, dataset="imagenet", description=description,
                       pretrained=_pretrained(name))


MODELS: tuple[ModelEntry, ...] = (
    _entry("resnet18", "torchvision ResNet-18, ImageNet"),
    _entry("resnet50", "torchvision ResNet-50, ImageNet"),
    _entry("mobilenet_v2", "torchvision MobileNetV2, ImageNet"),
)
"""The registry's entries for this module (collected by :mod:`granq_search.models.registry`)."""
