"""Loggers of the search record whose lines never carry credentials.

MLflow's errors carry the request URL as given (``http://user:password@host/...``); every
message of a :func:`redacted_logger`, exception text included, has its URIs redacted.
"""

from __future__ import annotations

import logging

from granq_search.tracking.uri import redact_text

__all__ = ["RedactFilter", "redacted_logger"]


class RedactFilter(logging.Filter):
    """Redacts the URIs of every record of the logger it is added to (message and exception)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string: leave the record alone
            return True
        record.msg, record.args = redact_text(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def redacted_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with a :class:`RedactFilter` (added once)."""
    log = logging.getLogger(name)
    if not any(isinstance(f, RedactFilter) for f in log.filters):
        log.addFilter(RedactFilter())
    return log
