"""granq_search: Ray-distributed hyperparameter search for GranQ zero-shot quantization."""

from granq_search.errors import GranqError

__version__ = "0.1.0"
__all__ = ["GranqError", "__version__"]
