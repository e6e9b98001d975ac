"""Small MLflow queries shared by the recorder, the leaderboard and export (no Ray here)."""

from __future__ import annotations

import os

from granq_search.errors import TrackingError
from granq_search.tracking.schema import TAG

__all__ = ["quote", "search_runs_all", "find_parent", "set_terminated"]


def quote(value: str) -> str:
    """A value for an MLflow filter string (names with quotes are refused, not escaped)."""
    if "'" in value or "\\" in value:
        raise TrackingError(f"search or trial name {value!r} must not contain quotes or backslashes")
    return f"'{value}'"


def search_runs_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None):
    """Every run matching ``filter_string`` (all pages)."""
    out, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def find_parent(client, experiment_id: str, search: str):
    """The parent run of ``search`` (the oldest if several), or None."""
    runs = search_runs_all(client, [experiment_id],
                           f"tags.`{TAG.SEARCH}` = {quote(search)} and tags.`{TAG.KIND}` = 'search'",
                           order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


_QUIET_URLS = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def set_terminated(client, run_id: str, status: str) -> None:
    """``client.set_terminated`` without MLflow's "View run ... at: URL" lines.

    Against an http server MLflow prints the run's URL to stdout when it closes a run: the
    tracking URI as given, credentials included (``http://user:password@host``), and stray lines
    in ``--format json`` output. The switch is MLflow's own environment variable, set only for
    the call unless the user set it.
    """
    if os.environ.get(_QUIET_URLS) is not None:
        client.set_terminated(run_id, status=status)
        return
    os.environ[_QUIET_URLS] = "true"
    try:
        client.set_terminated(run_id, status=status)
    finally:
        os.environ.pop(_QUIET_URLS, None)
