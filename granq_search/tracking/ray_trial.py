"""What the recorder reads from a Ray trial and its reports (no Ray import): why it failed, its
results and the metrics in them.

:func:`failure_reason` is the line a FAILED child is tagged with (``granq.failure_reason``, at
most :data:`MAX_REASON` characters): the exception line of the exception Ray holds for the
trial, else of its error file (a traceback, or Ray's ``Failure # N`` sections), else Ray's
error message. :func:`stored_results` are the reports Ray kept for a trial (``result.json``,
then its last result), replayed into MLflow after ``--resume``. :func:`reported_metrics` and
:func:`report_step` are what a report (a Ray result dict) puts into MLflow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.tracking.mlflow_io import MAX_REASON
from granq_search.tracking.uri import redact_text

__all__ = ["failure_reason", "clip_reason", "stored_results", "reported_metrics", "report_step", "MAX_REASON"]

_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Diverged|Failure|Warning)\b.*")
_NAMED_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: .+")


def clip_reason(text: str) -> str:
    """``text`` on one line (runs of white space as one space, URI credentials redacted), at most
    :data:`MAX_REASON` chars."""
    return redact_text(" ".join(text.split()))[:MAX_REASON]


def _first_exception_line(text: str) -> str:
    """The exception line of a traceback or a Ray error file ("ValueError: boom")."""
    sections = re.split(r"(?m)^Failure # \d+.*$", text)
    body = next((s for s in reversed(sections) if s.strip()), text)
    lines = [ln.rstrip() for ln in body.splitlines() if ln.strip()]
    top = [ln for ln in lines if not ln[0].isspace()]
    for pattern in (_EXC_LINE, _NAMED_LINE):
        hits = [ln for ln in top if pattern.match(ln) and not ln.startswith(("ray::", "Traceback"))]
        if hits:
            return hits[-1].strip()
    skip = ("ray::", "Traceback", "During handling", "The above exception")
    rest = [ln.strip() for ln in top if not ln.startswith(skip)]
    return (rest or [ln.strip() for ln in lines] or ["unknown error"])[0]


def _error_text(trial: Any) -> str | None:
    """The error Ray holds for ``trial``: its pickled exception, else its error file, else its message."""
    getter = getattr(trial, "get_pickled_error", None)
    if callable(getter):
        try:
            exc = getter()
        except Exception:  # noqa: BLE001 - storage may be gone; fall back to the text file
            exc = None
        if exc is not None:
            cause = getattr(exc, "cause", None) or exc
            if not isinstance(cause, BaseException):
                cause = exc
            return f"{type(cause).__name__}: {cause}"
    path = getattr(trial, "error_file", None)
    try:
        if path and Path(path).is_file():
            return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        pass
    msg = getattr(trial, "error_msg", None)
    return msg if isinstance(msg, str) else None


def failure_reason(trial: Any = None, error: BaseException | str | None = None) -> str:
    """One line (<= 500 chars) saying why a trial failed."""
    text = None
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        text = f"{type(cause).__name__}: {cause}"
    elif isinstance(error, str):
        text = error
    if text is None and trial is not None:
        text = _error_text(trial)
    if not text or not text.strip():
        return "unknown error (no error file)"
    return clip_reason(_first_exception_line(text))


def stored_results(trial: Any) -> list[dict]:
    """The reports Ray stored for ``trial``: each line of its ``result.json`` (unreadable lines
    skipped), then its last result when that file does not end with it."""
    results: list[dict] = []
    local = getattr(trial, "local_path", None)
    path = Path(local, "result.json") if local else None
    if path is not None and path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                results.append(json.loads(line))
            except ValueError:
                continue
    last = getattr(trial, "last_result", None) or {}
    if last and (not results or results[-1].get("training_iteration") != last.get("training_iteration")):
        results.append(dict(last))
    return results


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (
        hasattr(v, "dtype") and hasattr(v, "item") and getattr(v, "ndim", 1) == 0)


def reported_metrics(result: Mapping[str, Any], names: Iterable[str]) -> dict[str, float]:
    """The numeric values of ``result`` under ``names`` (Ray's bookkeeping keys are left out by
    not naming them; strings, None and flags are not metrics)."""
    metrics: dict[str, float] = {}
    for k in names:
        v = result.get(k)
        if v is not None and _is_number(v):
            metrics[k] = float(v)
    return metrics


def report_step(result: Mapping[str, Any]) -> int:
    """The step of a report in MLflow: its ``epoch``, else Ray's ``training_iteration``, else 0."""
    try:
        return int(result.get(M.EPOCH, result.get("training_iteration", 0)))
    except (TypeError, ValueError):
        return 0
