"""granq_search: Ray-distributed hyperparameter search for GranQ zero-shot quantization.

The Python API (each name is imported on first use, so ``import granq_search`` stays light):

- :func:`quantize` (``granq_search.api``): the fake-quantized student of your own ``nn.Module``;
- :func:`train` / ``search``: the ``train`` and ``search`` commands, returning the trainer's
  result and the search's outcome. ``granq_search.search(space, ...)`` calls
  ``granq_search.api.search`` (the ``search`` sub-package is callable); ``run_search`` is the same
  function under a name that cannot be confused with the package;
- :func:`load_student`: a trained student back from a run folder or an MLflow model URI;
- :func:`model_factory`: declare your own model factory, named in a config by import path
  (``model.name: mymodels:small_cnn``).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from granq_search.errors import GranqError

if TYPE_CHECKING:  # pragma: no cover
    from granq_search.api import quantize, train
    from granq_search.api import search as run_search
    from granq_search.models.spec import model_factory
    from granq_search.pipeline.student_io import load_student

__version__ = "0.1.0"
__all__ = ["GranqError", "quantize", "train", "search", "run_search", "load_student", "model_factory", "__version__"]

_LAZY = {
    "quantize": ("granq_search.api", "quantize"),
    "train": ("granq_search.api", "train"),
    "run_search": ("granq_search.api", "search"),
    "load_student": ("granq_search.pipeline.student_io", "load_student"),
    "model_factory": ("granq_search.models.spec", "model_factory"),
}
"""Public name -> (module, attribute), imported on first access (they need torch)."""


def __getattr__(name: str) -> Any:
    if name == "search":  # the callable sub-package: granq_search.search(space, ...) runs a search
        return import_module("granq_search.search")
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(target[0]), target[1])


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
