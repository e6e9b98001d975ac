"""The search: search-space files, our Optuna searcher, persistent ASHA, the Ray trainable and
the driver (``run_search``). Ray, Optuna and MLflow stay inside this package and ``tracking``.

The package is also callable: ``granq_search.search(space, ...)`` is :func:`granq_search.api.search`,
the ``search`` command from Python (the package and the function share the name the user expects).
"""

import sys
import types

from granq_search.search.space import (
    CONSTRAINT_METRICS,
    OBJECTIVE_METRICS,
    Objective,
    ParamSpec,
    SamplerSpec,
    SchedulerSpec,
    SearchSpace,
    load_space,
    parse_space,
    space_from_record,
)

__all__ = [
    "SearchSpace",
    "ParamSpec",
    "Objective",
    "SchedulerSpec",
    "SamplerSpec",
    "load_space",
    "parse_space",
    "space_from_record",
    "OBJECTIVE_METRICS",
    "CONSTRAINT_METRICS",
    "OptunaSearcher",
    "PersistentASHA",
    "RayReporter",
    "train_trial",
    "run_search",
    "SearchOutcome",
]

_LAZY = {
    "OptunaSearcher": "granq_search.search.searcher",
    "PersistentASHA": "granq_search.search.scheduler",
    "RayReporter": "granq_search.search.report",
    "train_trial": "granq_search.search.trainable",
    "run_search": "granq_search.search.runner",
    "SearchOutcome": "granq_search.search.runner",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableSearchPackage(types.ModuleType):
    """Makes ``granq_search.search(...)`` run a search; attribute access is the package's own."""

    def __call__(self, *args, **kwargs):
        from granq_search.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableSearchPackage
