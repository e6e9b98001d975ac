"""The model registry: built-in entries by name, your own factories by import path.

``model.name`` is either a built-in name (``granq-search evaluate --list-models``) or an import
path ``MODULE:FACTORY`` naming a factory decorated with
:func:`granq_search.models.spec.model_factory` (see :mod:`granq_search.user_code` for where the
module is looked up). Every function here takes either form.

The table of built-in entries is built once, when this module is imported, from the ``MODELS``
tuple of each model module (:data:`MODEL_MODULES`); the model modules never import this one, and
the table is read-only afterwards, so every process (Ray workers included) sees the same entries.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from types import MappingProxyType, ModuleType

from torch import nn

from granq_search.errors import ConfigError, ModelError
from granq_search.models import digits, pytorchcv_resnet, resnet_cifar, torchvision_models
from granq_search.models.spec import ModelEntry, ModelInfo, PretrainedLoader, declared_entry
from granq_search.user_code import accepts_keyword, is_import_path, resolve_callable

__all__ = [
    "ModelInfo",
    "ModelEntry",
    "MODEL_MODULES",
    "create_model",
    "list_models",
    "model_info",
    "model_entry_for",
    "pretrained_loader",
    "is_registered",
]

MODEL_MODULES: tuple[ModuleType, ...] = (digits, resnet_cifar, pytorchcv_resnet, torchvision_models)
"""The modules whose ``MODELS`` make up the built-in table."""

_FIELD = "model.name"


def _build_table(modules: Iterable[ModuleType]) -> Mapping[str, ModelEntry]:
    table: dict[str, ModelEntry] = {}
    for module in modules:
        for entry in module.MODELS:
            name = entry.info.name
            if name in table:
                raise ValueError(f"model '{name}' is declared twice (in {module.__name__})")
            table[name] = entry
    return MappingProxyType(table)


_TABLE: Mapping[str, ModelEntry] = _build_table(MODEL_MODULES)


def _own_entry(spec: str) -> ModelEntry:
    factory = resolve_callable(spec, field=_FIELD)
    entry = declared_entry(spec, factory)
    if entry is None:
        raise ConfigError(f"'{spec}' does not declare its inputs; decorate it with @granq_search.models.model_factory("
                          "num_classes=..., image_size=..., in_channels=..., mean=..., std=...)", field=_FIELD)
    if not accepts_keyword(factory, "num_classes"):
        raise ConfigError(f"'{spec}' must take the keyword argument num_classes (the head size); add it",
                          field=_FIELD)
    return entry


def model_entry_for(name: str) -> ModelEntry:
    """The entry of a built-in name or of an import path ``MODULE:FACTORY``.

    Raises :class:`ModelError` for an unknown name (with the closest built-in one) and
    :class:`ConfigError` for an import path that cannot be used."""
    if is_import_path(name):
        return _own_entry(name)
    entry = _TABLE.get(name)
    if entry is None:
        # Compare case-insensitively, ignoring '-' and '_', so 'ResNet-20' suggests 'resnet20'.
        # A name that extends the query ('resnet2' -> 'resnet20') wins over edit distance.
        norm = {_normalise(k): k for k in sorted(_TABLE)}
        query = _normalise(name)
        longer = sorted((k for k in norm if query and k.startswith(query)), key=len)
        close = longer[:1] or difflib.get_close_matches(query, list(norm), n=1, cutoff=0.4)
        tip = f"did you mean '{norm[close[0]]}'? " if close else ""
        raise ModelError(f"unknown model '{name}'; {tip}(list: granq-search evaluate --list-models; "
                         "your own model: MODULE:FACTORY)")
    return entry


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def is_registered(name: str) -> bool:
    """True for a built-in model name."""
    return name in _TABLE


def list_models() -> list[str]:
    """Built-in model names, sorted."""
    return sorted(_TABLE)


def model_info(name: str, num_classes: int | None = None) -> ModelInfo:
    """The facts of ``name`` (built-in or ``MODULE:FACTORY``); ``num_classes`` replaces the
    default head size."""
    info = model_entry_for(name).info
    if num_classes is not None:
        info = dataclasses.replace(info, num_classes=_check_classes(name, num_classes))
    return info


def create_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A randomly initialised instance of ``name`` (weights: see ``build_teacher``)."""
    entry = model_entry_for(name)
    n = entry.info.num_classes if num_classes is None else _check_classes(name, num_classes)
    model = entry.factory(num_classes=n)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{name}': the factory returned a {type(model).__name__}, not a torch.nn.Module; "
                         "return the network")
    return model


def pretrained_loader(name: str) -> PretrainedLoader | None:
    """The entry's published-weights loader, or None when it has none."""
    return model_entry_for(name).pretrained


def _check_classes(name: str, num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"model '{name}': num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes
