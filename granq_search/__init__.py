"""granq_search: Ray-distributed hyperparameter search for GranQ zero-shot quantization."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from granq_search.errors import GranqError

if TYPE_CHECKING:  # pragma: no cover
    from granq_search.pipeline.student_io import load_student

__version__ = "0.1.0"
__all__ = ["GranqError", "load_student", "__version__"]


def __getattr__(name: str) -> Any:
    """``load_student`` is imported on first use (it needs torch; ``import granq_search`` stays light)."""
    if name == "load_student":
        from granq_search.pipeline.student_io import load_student

        return load_student
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
