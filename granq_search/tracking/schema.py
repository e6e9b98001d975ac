"""Names shared by the recorder, the leaderboard and export (see docs/ARCHITECTURE.md).

Tags on the parent run of a search:
    granq.kind=search, granq.search=NAME, granq.objectives (JSON list of {metric, mode}),
    granq.version, granq.git_commit, granq.git_dirty, granq.command (redacted),
    granq.teacher, granq.teacher_val_top1, granq.teacher_test_top1,
    granq.space (the search space's record, :func:`granq_search.search.space.space_record_text`;
    what ``export`` rebuilds the configs from), granq.search_dir (the search's folder; set by the driver),
    granq.trial_threads (torch CPU threads of every trial; set by the driver),
    granq.status (running/finished/interrupted/failed) and whatever the driver adds.
Tags on a child (one per Ray trial):
    granq.kind=trial, granq.search=NAME, granq.trial_id=ID, mlflow.parentRunId,
    granq.status (running/finished/pruned/failed/interrupted), granq.failure_reason,
    granq.proposal (JSON: the searched values the trial ran with; ``export`` reads them).
Both: granq.searched (JSON list of the dotted config paths the search varies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from granq_search import metrics as M
from granq_search.errors import TrackingError

__all__ = [
    "DEFAULT_EXPERIMENT",
    "METRICS",
    "DEFAULT_OBJECTIVES",
    "TAG",
    "TRAIN_TAG",
    "normalize_objectives",
    "param_value",
]

DEFAULT_EXPERIMENT = "granq_search"

# The metric names are defined once, in granq_search.metrics (name, unit, when reported).
# Every numeric result key recorded in MLflow; Ray's bookkeeping (time_this_iter_s, pid,
# timestamp, done, training_iteration, ...) is not in it.
METRICS = M.RECORDED_METRICS


class TAG:
    KIND = "granq.kind"
    SEARCH = "granq.search"
    TRIAL_ID = "granq.trial_id"
    PARENT = "mlflow.parentRunId"
    STATUS = "granq.status"
    FAILURE = "granq.failure_reason"
    OBJECTIVES = "granq.objectives"
    VERSION = "granq.version"
    GIT_COMMIT = "granq.git_commit"
    GIT_DIRTY = "granq.git_dirty"
    COMMAND = "granq.command"
    SPACE = "granq.space_file"
    TEACHER = "granq.teacher"
    TEACHER_VAL = "granq.teacher_val_top1"
    TEACHER_TEST = "granq.teacher_test_top1"
    SPACE_RECORD = "granq.space"
    SEARCH_DIR = "granq.search_dir"
    TRIAL_THREADS = "granq.trial_threads"
    SEARCHED = "granq.searched"
    PROPOSAL = "granq.proposal"
    PINNED = "granq.pinned"
    LAST_ERROR = "granq.last_error"
    COMMAND_RESUME = "granq.command_resume"
    PREVIOUS_FAILURE = "granq.previous_failure"
    RUN_ID = "granq.run_id"


class TRAIN_TAG:
    """Tags of a ``train`` run (``tracking/train_run.py``), beyond :class:`TAG`."""

    CONFIG_SOURCE = "granq.config_source"
    SOURCE_RUN = "granq.source_run_id"
    SOURCE_URI = "granq.source_tracking_uri"
    RULE = "granq.selection_rule"
    BUDGET = "granq.budget"
    OUTPUT_DIR = "granq.output_dir"
    RESUMED = "granq.resumed"
    MODEL_FORMAT = "granq.model_format"
    CHECKPOINT = "granq.checkpoint_sha256"


DEFAULT_OBJECTIVES = ({"metric": M.VAL_DROP, "mode": "min"}, {"metric": M.BITOPS, "mode": "min"})

_MODES = {"min": "min", "minimize": "min", "max": "max", "maximize": "max"}


def normalize_objectives(objectives: Iterable[Mapping[str, Any]] | str | None) -> list[dict[str, str]]:
    """``[{"metric": NAME, "mode": "min"|"max"}, ...]`` from dicts that may say ``name`` for
    ``metric`` and ``direction`` (minimize/maximize) for ``mode``, or from their JSON."""
    if objectives is None or objectives == "":
        return [dict(o) for o in DEFAULT_OBJECTIVES]
    if isinstance(objectives, str):
        try:
            objectives = json.loads(objectives)
        except json.JSONDecodeError:
            raise TrackingError(f"objectives tag is not JSON: {objectives[:80]!r}") from None
    out = []
    for obj in objectives:  # type: ignore[union-attr]
        if isinstance(obj, str):
            obj = {"metric": obj}
        name = obj.get("metric") or obj.get("name")
        mode = _MODES.get(str(obj.get("mode") or obj.get("direction") or "min").lower())
        if not name or mode is None:
            raise TrackingError(f"objective {dict(obj)!r} needs a metric name and mode min or max")
        out.append({"metric": str(name), "mode": mode})
    if not out:
        return [dict(o) for o in DEFAULT_OBJECTIVES]
    return out


def param_value(value: Any) -> str:
    """How a config value is written as an MLflow param: strings as they are, else JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return json.dumps(value)
