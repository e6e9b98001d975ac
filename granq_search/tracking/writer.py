"""Buffered MLflow writes of one search: a queue of :class:`~granq_search.tracking.search_runs.Op`,
applied in order, kept and retried while the tracking store fails.

:class:`SearchWriter` knows nothing of Ray: the recorder
(:class:`~granq_search.tracking.callback.SearchRecorder`) turns trial events into ops and
submits them; :class:`~granq_search.tracking.search_runs.SearchRuns` applies each one to MLflow.

When the store fails
    Writing never raises and is never silently lossy: a write that fails stays queued, in order,
    and is retried on the next submit or flush (at most every ``retry_interval_s`` seconds; an
    http server is probed for 1 s first so a dead server does not stall the Tune loop) and in
    :meth:`SearchWriter.finish`, which keeps retrying for ``wait_s`` seconds (a server being
    restarted) before it raises one :class:`~granq_search.errors.TrackingError` line. Writes
    MLflow rejects as invalid (HTTP 400) cannot succeed by retrying: they are dropped with a
    warning and listed in :attr:`SearchWriter.dropped`. Log lines have their URIs redacted.

Nothing here is pickled: the recorder makes a new writer after unpickling, which finds its runs
in MLflow again.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any

from granq_search.errors import TrackingError
from granq_search.tracking.log_redact import redacted_logger
from granq_search.tracking.mlflow_io import one_line
from granq_search.tracking.search_runs import CLOSING_LABEL, Op, SearchRuns
from granq_search.tracking.uri import redact_text, redact_uri, server_reachable

__all__ = ["SearchWriter"]

log = redacted_logger(__name__)

_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}


def _short(e: BaseException) -> str:
    return one_line(e)[:300]


class SearchWriter:
    """The queue of writes to the runs of search ``search_name`` (arguments as
    :class:`~granq_search.tracking.search_runs.SearchRuns`', and ``retry_interval_s``: least
    time between retries after a failed write)."""

    def __init__(self, *, tracking_uri: str, experiment_name: str, search_name: str,
                 objectives: list[dict[str, str]], parent_tags: Mapping[str, str],
                 parent_params: Mapping[str, Any], command_line: Sequence[str],
                 searched: Sequence[str] | None, retry_interval_s: float) -> None:
        self.runs = SearchRuns(tracking_uri=tracking_uri, experiment_name=experiment_name, search_name=search_name,
                               objectives=objectives, parent_tags=parent_tags, parent_params=parent_params,
                               command_line=command_line, searched=searched)
        self.tracking_uri = tracking_uri
        self.search_name = search_name
        self.retry_interval_s = retry_interval_s
        self.dropped: list[str] = []
        """Writes MLflow rejected as invalid (one line each)."""
        self._pending: collections.deque[Op] = collections.deque()
        self._last_error: str | None = None
        self._last_failure_at = 0.0
        self._finished: str | bool = False

    @property
    def pending(self) -> int:
        """Writes not yet recorded (kept in memory, retried)."""
        return len(self._pending)

    def enqueue(self, *ops: Op) -> None:
        """Queue ``ops`` behind the pending writes, without writing yet."""
        self._pending.extend(ops)

    def submit(self, *ops: Op) -> None:
        """Queue ``ops`` and write what the store takes now."""
        self._pending.extend(ops)
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Apply queued writes in order; True when nothing is left. Without ``force`` nothing is
        tried until ``retry_interval_s`` has passed since the last failure."""
        if not self._pending:
            return True
        if not force and self._last_error is not None and \
                time.monotonic() - self._last_failure_at < self.retry_interval_s:
            return False
        if not server_reachable(self.tracking_uri, timeout=1.0):
            self._note_failure(f"server at {redact_uri(self.tracking_uri)} does not answer")
            return False
        from mlflow.exceptions import MlflowException

        while self._pending:
            op = self._pending[0]
            try:
                self.runs.apply(op)
            except TrackingError:
                raise
            except MlflowException as e:
                if getattr(e, "error_code", None) in _PERMANENT_CODES:
                    self._pending.popleft()
                    msg = redact_text(f"{op.describe()}: {_short(e)}")
                    self.dropped.append(msg)
                    log.warning("MLflow rejected a write for search %s and it was dropped: %s",
                                self.search_name, msg)
                    continue
                self._note_failure(f"{op.describe()}: {_short(e)}")
                return False
            except Exception as e:  # noqa: BLE001 - any store failure is retried later
                self._note_failure(f"{op.describe()}: {type(e).__name__}: {_short(e)}")
                return False
            self._pending.popleft()
        if self._last_error is not None:
            log.warning("MLflow recording of search %s caught up (%s)", self.search_name,
                        redact_uri(self.tracking_uri))
        self._last_error = None
        return True

    def _note_failure(self, message: str) -> None:
        message = redact_text(message)
        if self._last_error is None:
            log.warning("MLflow write failed for search %s at %s (%s); %d write(s) buffered and retried "
                        "on the next report and at the end", self.search_name, redact_uri(self.tracking_uri),
                        message, len(self._pending))
        self._last_error = message
        self._last_failure_at = time.monotonic()

    def finish(self, status: str = "FINISHED", wait_s: float = 0.0) -> None:
        """Flush, then close the search's runs with ``status`` (FINISHED, KILLED or FAILED:
        :meth:`SearchRuns.close_search`). Safe to call twice.

        A store that does not answer gets ``wait_s`` seconds (retried every 2 s; then at least
        3 attempts). Raises TrackingError (one line) when writes are still unrecorded.
        """
        status = status.upper()
        if status not in CLOSING_LABEL:
            raise ValueError(f"finish(status={status!r}): use FINISHED, KILLED or FAILED")
        if self._finished == status and not self._pending:
            return  # already closed with this status
        deadline = time.monotonic() + wait_s
        attempt = 0
        while not self.flush(force=True):
            attempt += 1
            if attempt >= 3 and time.monotonic() >= deadline:
                break
            # a server that is restarting gets wait_s to come back
            time.sleep(min(2.0 * attempt, self.retry_interval_s) if time.monotonic() >= deadline else 2.0)
        if not self._pending:
            try:
                self.runs.close_search(status)
                self._finished = status
            except Exception as e:  # noqa: BLE001 - reported below
                self._last_error = redact_text(f"closing the search: {type(e).__name__}: {_short(e)}")
                self._pending.append(Op("parent"))
        if self._pending or not self._finished:
            raise TrackingError(
                f"{max(len(self._pending), 1)} MLflow write(s) of search '{self.search_name}' could not be "
                f"recorded at {redact_uri(self.tracking_uri)} ({self._last_error}); the results are safe in "
                "Ray's folder: once the tracking server answers, rerun with --resume to record them")
