"""One error base class for everything a user can cause.

The CLI catches :class:`GranqError` at the edge and prints ``str(err)`` as one line (exit 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "GranqError",
    "ConfigError",
    "CheckpointError",
    "DataError",
    "ModelError",
    "SearchSpaceError",
    "TrackingError",
]


class GranqError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ConfigError(GranqError):
    """An invalid experiment config, override or quantization spec.

    ``field`` is the dotted path of the offending field when known; loaders prefix it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        self.bare = message
        super().__init__(f"{field}: {message}" if field else message)


class CheckpointError(GranqError):
    """A checkpoint file that cannot be read or does not fit the architecture."""


class DataError(GranqError):
    """A missing, empty or mismatched dataset."""


class ModelError(GranqError):
    """An unknown model name or a model that cannot be built."""


class SearchSpaceError(GranqError):
    """An invalid search-space file."""


class TrackingError(GranqError):
    """An unreachable or unusable MLflow tracking store, or an unknown search."""
