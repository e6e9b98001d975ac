"""A timm-style registry of teacher architectures.

Each entry is a factory ``f(num_classes) -> nn.Module`` (random initialisation) plus the facts
a pipeline needs about its inputs (:class:`ModelInfo`): image size, channels, the normalisation
the published weights were trained with, and the dataset they belong to. Entries may also name
a loader of published weights (``pretrained=``); :func:`granq_search.models.build_teacher`
decides where weights come from.

    @register_model("my_net", num_classes=10, image_size=32, in_channels=3,
                    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), dataset="cifar10",
                    description="...")
    def my_net(num_classes: int) -> nn.Module: ...
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from granq_search.errors import ModelError

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "pretrained_loader",
    "is_registered",
]

Factory = Callable[[int], nn.Module]
PretrainedLoader = Callable[[int], nn.Module]
"""``loader(num_classes) -> nn.Module`` with published weights; raises ModelError offline."""


@dataclass(frozen=True)
class ModelInfo:
    """What a pipeline needs to know about a registered model's inputs and outputs."""

    name: str
    num_classes: int
    image_size: int
    """Side of the square input image in pixels."""
    in_channels: int
    mean: tuple[float, ...]
    """Per-channel normalisation mean the weights were trained with (after scaling to [0, 1])."""
    std: tuple[float, ...]
    dataset: str
    """The dataset the published weights belong to (``digits``, ``cifar10``, ``imagenet``, ...)."""
    description: str


@dataclass(frozen=True)
class _Entry:
    factory: Factory
    info: ModelInfo
    pretrained: PretrainedLoader | None


# One module-level table filled at import time by the decorators below; it is never mutated
# afterwards, so Ray worker processes that import the package all see the same entries.
_REGISTRY: dict[str, _Entry] = {}


def register_model(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    in_channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dataset: str,
    description: str,
    pretrained: PretrainedLoader | None = None,
) -> Callable[[Factory], Factory]:
    """Decorator registering ``factory(num_classes) -> nn.Module`` under ``name``."""
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"{name}: mean/std need {in_channels} values")

    def deco(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        info = ModelInfo(name, num_classes, image_size, in_channels, tuple(mean), tuple(std),
                         dataset, description)
        _REGISTRY[name] = _Entry(factory, info, pretrained)
        return factory

    return deco


def _ensure_loaded() -> None:
    # The entries live in sibling modules; importing them registers them.
    from granq_search.models import digits, pytorchcv_resnet, resnet_cifar, torchvision_models  # noqa: F401


def _entry(name: str) -> _Entry:
    _ensure_loaded()
    entry = _REGISTRY.get(name)
    if entry is None:
        # Compare case-insensitively, ignoring '-' and '_', so 'ResNet-20' suggests 'resnet20'.
        # A name that extends the query ('resnet2' -> 'resnet20') wins over edit distance.
        norm = {_normalise(k): k for k in sorted(_REGISTRY)}
        query = _normalise(name)
        longer = sorted((k for k in norm if query and k.startswith(query)), key=len)
        close = longer[:1] or difflib.get_close_matches(query, list(norm), n=1, cutoff=0.4)
        tip = f"did you mean '{norm[close[0]]}'? " if close else ""
        raise ModelError(f"unknown model '{name}'; {tip}(list: python tune_main.py evaluate --list-models)")
    return entry


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def is_registered(name: str) -> bool:
    _ensure_loaded()
    return name in _REGISTRY


def list_models() -> list[str]:
    """Registered model names, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_info(name: str, num_classes: int | None = None) -> ModelInfo:
    """The registry's facts for ``name``; ``num_classes`` replaces the default head size."""
    info = _entry(name).info
    if num_classes is not None:
        info = dataclasses.replace(info, num_classes=_check_classes(name, num_classes))
    return info


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised instance of ``name`` (weights: see ``build_teacher``)."""
    entry = _entry(name)
    n = entry.info.num_classes if num_classes is None else _check_classes(name, num_classes)
    return entry.factory(n)


def pretrained_loader(name: str) -> PretrainedLoader | None:
    """The entry's published-weights loader, or None when it has none."""
    return _entry(name).pretrained


def _check_classes(name: str, num_classes: int) -> int:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"model '{name}': num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes
