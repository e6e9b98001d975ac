"""MLflow record of searches: the Ray Tune recorder, the leaderboard, the Pareto front, the plot.

``SearchRecorder`` is imported lazily (it needs Ray); the rest needs only MLflow and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from granq_search.tracking.leaderboard import Leaderboard, list_searches, load_runs
from granq_search.tracking.pareto import pareto_mask, rank
from granq_search.tracking.plot import plot_pareto
from granq_search.tracking.ray_trial import failure_reason
from granq_search.tracking.schema import DEFAULT_EXPERIMENT, DEFAULT_OBJECTIVES, TAG, normalize_objectives
from granq_search.tracking.table import FORMATS, format_leaderboard
from granq_search.tracking.uri import redact_uri, require_existing_store, resolve_tracking_uri

if TYPE_CHECKING:  # pragma: no cover
    from granq_search.tracking.callback import SearchRecorder

__all__ = [
    "resolve_tracking_uri",
    "redact_uri",
    "require_existing_store",
    "SearchRecorder",
    "failure_reason",
    "Leaderboard",
    "load_runs",
    "list_searches",
    "rank",
    "pareto_mask",
    "format_leaderboard",
    "plot_pareto",
    "FORMATS",
    "TAG",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_OBJECTIVES",
    "normalize_objectives",
]

_LAZY = {"SearchRecorder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from granq_search.tracking import callback

        return getattr(callback, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
