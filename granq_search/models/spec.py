"""What a pipeline needs to know about a model, and how a model declares it.

A model is a factory ``factory(num_classes=N) -> nn.Module`` (random initialisation) plus its
:class:`ModelInfo`: image size, channels, the normalisation its weights were trained with, the
dataset they belong to. The built-in models declare theirs as :class:`ModelEntry` values in the
``MODELS`` tuple of their module (the registry collects them; the model modules never import the
registry). Your own factory, named in a config by import path (``model.name:
mymodels:small_cnn``), declares them with the :func:`model_factory` decorator::

    from granq_search.models import model_factory

    @model_factory(num_classes=10, image_size=8, in_channels=1, mean=(0.3053,), std=(0.3760,))
    def small_cnn(num_classes: int = 10) -> nn.Module:
        return SmallCNN(num_classes)

The decorator only attaches the facts to the function (no global registration), so the same
module imported in a Ray worker describes the same model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from torch import nn

__all__ = ["ModelInfo", "ModelEntry", "Factory", "PretrainedLoader", "model_entry", "model_factory",
           "declared_entry", "DECLARATION_ATTRIBUTE"]

Factory = Callable[..., nn.Module]
"""``factory(num_classes=N) -> nn.Module`` with random weights."""
PretrainedLoader = Callable[[int], nn.Module]
"""``loader(num_classes) -> nn.Module`` with published weights; raises ModelError offline."""

DECLARATION_ATTRIBUTE = "__granq_model__"
"""Attribute :func:`model_factory` sets on the decorated function or class."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ModelInfo:
    """What a pipeline needs to know about a model's inputs and outputs."""

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
class ModelEntry:
    """A model: its factory, its facts and, optionally, a loader of published weights."""

    factory: Factory
    info: ModelInfo
    pretrained: PretrainedLoader | None = None


def _info(name: str, *, num_classes: int, image_size: int, in_channels: int, mean: Sequence[float],
          std: Sequence[float], dataset: str, description: str) -> ModelInfo:
    """Checked facts; a mistake here is a programming error in the model's module (ValueError)."""
    what = f"model '{name}'" if name else "model_factory"
    for key, value, low in (("num_classes", num_classes, 2), ("image_size", image_size, 1),
                            ("in_channels", in_channels, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{what}: {key} must be an integer >= {low}, got {value!r}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"{what}: mean and std need {in_channels} value(s) each (one per input channel)")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"{what}: every std must be > 0")
    return ModelInfo(name, num_classes, image_size, in_channels, tuple(float(m) for m in mean),
                     tuple(float(s) for s in std), dataset, description)


def model_entry(name: str, factory: Factory, *, num_classes: int, image_size: int, in_channels: int,
                mean: Sequence[float], std: Sequence[float], dataset: str, description: str,
                pretrained: PretrainedLoader | None = None) -> ModelEntry:
    """A built-in model's entry (collected by the registry from its module's ``MODELS``)."""
    return ModelEntry(factory, _info(name, num_classes=num_classes, image_size=image_size,
                                     in_channels=in_channels, mean=mean, std=std, dataset=dataset,
                                     description=description), pretrained)


@dataclass(frozen=True)
class _Declared:
    info: ModelInfo
    pretrained: PretrainedLoader | None


def model_factory(*, num_classes: int, image_size: int, in_channels: int, mean: Sequence[float],
                  std: Sequence[float], description: str = "", dataset: str = "custom",
                  pretrained: PretrainedLoader | None = None) -> Callable[[F], F]:
    """Declare the inputs of your own model factory (a function or an ``nn.Module`` class taking
    ``num_classes``), so a config can name it by import path: ``model.name: MODULE:FACTORY``.

    ``num_classes``: the head size of the weights you will load (``model.num_classes`` may
    change it); ``image_size``: side of the square input; ``in_channels``; ``mean`` / ``std``:
    the per-channel normalisation the weights were trained with (``model.mean`` / ``model.std``
    may change them); ``pretrained``: optionally ``loader(num_classes) -> nn.Module`` returning
    the trained model, used when the config gives no ``model.checkpoint``. Nothing is registered
    globally: the facts travel with the function.
    """
    info = _info("", num_classes=num_classes, image_size=image_size, in_channels=in_channels, mean=mean,
                 std=std, dataset=dataset, description=description)

    def deco(fn: F) -> F:
        if not callable(fn):
            raise TypeError(f"model_factory decorates a function or class, not a {type(fn).__name__}")
        setattr(fn, DECLARATION_ATTRIBUTE, _Declared(info, pretrained))
        return fn

    return deco


def declared_entry(name: str, factory: Callable[..., Any]) -> ModelEntry | None:
    """The entry of a factory decorated with :func:`model_factory`, named ``name``; None when
    it carries no declaration."""
    declared = getattr(factory, DECLARATION_ATTRIBUTE, None)
    if not isinstance(declared, _Declared):
        return None
    description = declared.info.description or f"your own model {name}"
    info = replace(declared.info, name=name, description=description)
    return ModelEntry(factory, info, declared.pretrained)
