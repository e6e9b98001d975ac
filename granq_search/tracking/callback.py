"""The MLflow record of a search: one parent run per search, one child run per Ray trial.

:class:`SearchRecorder` is a Ray Tune callback; it talks to MLflow only through an explicit
``MlflowClient(tracking_uri)`` (no fluent active-run state), so it never touches another
run a user has open in the same process.

Identity and resume
    The parent run is found by tag ``granq.search=NAME`` before one is created, so a resumed
    search (``--resume``, a new recorder instance) reuses it. A child is found by tags
    ``granq.search`` + ``granq.trial_id`` (and ``mlflow.parentRunId``) before one is created:
    retries and resumes reuse it and set it back to RUNNING. Params are immutable in MLflow:
    on reuse only params not yet logged are written; a changed value is reported, not written.

What is logged
    Child: named ``t07 W3A4 tau=0.40`` (:func:`granq_search.tracking.names.run_name`: the trial's
    ordinal, its bits and its most telling searched values; a function of the trial, so a run
    recreated on ``--resume`` gets the same name), tag ``granq.searched`` (JSON list of the
    searched dotted paths; the same tag on the parent), params = the full flat dotted config
    (``flatten(trial_config(trial.config))``) in batches of at most 100; the contract's metrics
    (``schema.METRICS``, plus any objective metric) per report with ``step=epoch`` in one
    ``log_batch``; Ray's bookkeeping keys are not recorded; artifacts ``config.yaml`` (the
    resolved config) and ``sites.json`` (from the final report's ``sites_json``). Parent: package
    version, git commit, command line (URIs redacted), objectives (JSON), teacher name and FP
    accuracy, the driver's tags
    (``granq.space_file``, ``granq.fidelity``, ``granq.production``, ...), and at the end the
    artifacts ``leaderboard.csv`` and ``pareto.png``.

Closing status of every child
    ``final == 1`` seen -> FINISHED (``granq.status=finished``); completed without it (ASHA
    stopped it) -> KILLED (``pruned``); raised, or a report carrying ``failure_reason`` ->
    FAILED (``failed``, with ``granq.failure_reason``: the exception line, <= 500 chars);
    still running when the experiment ends -> KILLED (``interrupted``). :meth:`finish`
    (called by the driver after ``Tuner.fit()``; safe to call twice) closes the parent and
    any child still RUNNING. After ``--resume`` of a killed driver, a child RUNNING for a Ray
    trial the restored experiment does not know (started after Ray's last snapshot; the
    searcher gives its parameters to a new Ray trial) is tagged ``lost``, closed and deleted:
    each trial of the search keeps exactly one (active) child.

When the tracking store fails
    Logging never stops the search, and is never silently lossy: a write that fails is kept
    in memory, in order, and retried on the next callback (at most every ``retry_interval_s``
    seconds; an http server is probed for 1 s first so a dead server does not stall the Tune
    loop) and again at :meth:`finish`, which keeps retrying for ``finish_wait_s`` seconds (a
    server being restarted). Buffer and retry; if still failing at the end, the
    search ends with a clear message (:class:`TrackingError` from ``finish``) and ``--resume``
    replays what is missing from Ray's results: when the experiment is restored, trials Ray
    already holds as finished or errored but whose MLflow child is missing, open or lacks the
    final metrics are replayed from the trial's ``result.json`` (or last result) and closed.
    Writes MLflow rejects as invalid (HTTP 400) cannot succeed by retrying: they are dropped
    with a warning and counted in :attr:`SearchRecorder.dropped`.

Pickling
    Ray pickles the run config (callbacks included) into ``tuner.pkl``; after
    ``Tuner.restore`` Ray calls the unpickled copy. Only the constructor's arguments are
    pickled; ``finish`` works on any instance for the same search because the state lives in
    MLflow (a recorder finds its parent and children there).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from granq_search.config import ExperimentConfig, dump_config, flatten
from granq_search.errors import TrackingError
from granq_search.tracking.provenance import git_commit, git_dirty, package_version
from granq_search.tracking.schema import (
    DEFAULT_EXPERIMENT,
    METRICS,
    TAG,
    normalize_objectives,
    param_value,
)
from granq_search.tracking.names import run_name, searched_paths
from granq_search.tracking.store import find_parent, quote as _quote, search_runs_all, set_terminated
from granq_search.tracking.uri import redact_argv, redact_text, redact_uri, server_reachable, sqlite_path

__all__ = ["SearchRecorder", "failure_reason"]

log = logging.getLogger(__name__)


class _Redact(logging.Filter):
    """Every message of this module's logger, exception text included, with URIs redacted: MLflow's
    errors carry the request URL as given (``http://user:password@host/...``)."""

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


log.addFilter(_Redact())

MAX_BATCH = 100  # params/tags per log_batch (MLflow's limit)
LOST_CHILD_REASON = ("lost when the driver stopped: started after Ray's last experiment snapshot, so the "
                     "resumed search does not know this Ray trial; its configuration ran again as a new trial")
MAX_REASON = 500
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
_RAY_STATUS_OPEN = {"RUNNING", "PENDING", "PAUSED"}
_EXC_LINE = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Diverged|Failure|Warning)\b.*")
_NAMED_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: .+")


# ----------------------------------------------------------------------------- helpers


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, n: int = MAX_BATCH):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (
        hasattr(v, "dtype") and hasattr(v, "item") and getattr(v, "ndim", 1) == 0)


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


def failure_reason(trial: Any = None, error: BaseException | str | None = None) -> str:
    """One line (<= 500 chars) saying why a trial failed."""
    text = None
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None) or error
        text = f"{type(cause).__name__}: {cause}"
    elif isinstance(error, str):
        text = error
    if text is None and trial is not None:
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
                text = f"{type(cause).__name__}: {cause}"
        if text is None:
            path = getattr(trial, "error_file", None)
            try:
                if path and Path(path).is_file():
                    text = Path(path).read_text(encoding="utf-8", errors="replace")
            except OSError:
                text = None
        if text is None:
            msg = getattr(trial, "error_msg", None)
            text = msg if isinstance(msg, str) else None
    if not text or not text.strip():
        return "unknown error (no error file)"
    line = _first_exception_line(text)
    line = " ".join(line.split())
    return line[:MAX_REASON]


@dataclass
class _Child:
    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    has_final: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class _Op:
    kind: str
    trial_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}{'(' + self.trial_id + ')' if self.trial_id else ''}"


# ----------------------------------------------------------------------------- the callback


class SearchRecorder(Callback):
    """Records a Ray Tune search in MLflow (see the module docstring for the contract).

    Args:
        tracking_uri: resolved URI (:func:`~granq_search.tracking.resolve_tracking_uri`).
        experiment_name: MLflow experiment holding every search (``granq_search``).
        search_name: the search's name (``--name``); tag ``granq.search`` of parent and children.
        parent_tags: extra parent tags from the driver (``granq.space_file``,
            ``granq.fidelity``, ``granq.production``, ...).
        objectives: ``[{"metric": "val_drop", "mode": "min"}, ...]``.
        trial_config: maps a Ray trial config to the trial's full ExperimentConfig.
        parent_params: params for the parent run (for example the flat base config).
        command_line: recorded redacted (default ``sys.argv``).
        searched: the dotted paths the space searches, in its order (tag ``granq.searched`` of
            the parent and of every child; default: the keys of the first trial's proposal).
        retry_interval_s: least time between retries after a failed write.
        finish_wait_s: how long :meth:`finish` keeps retrying (every 2 s) a store that does not
            answer before it gives up (then at least 3 attempts; the driver passes 30 s).
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment_name: str = DEFAULT_EXPERIMENT,
        search_name: str,
        parent_tags: Mapping[str, str] | None = None,
        objectives: list[dict] | None = None,
        trial_config: Callable[[dict], ExperimentConfig] | None = None,
        parent_params: Mapping[str, Any] | None = None,
        command_line: list[str] | None = None,
        retry_interval_s: float = 10.0,
        finish_wait_s: float = 0.0,
        searched: Sequence[str] | None = None,
    ) -> None:
        _quote(search_name)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_name = search_name
        self.parent_tags = {str(k): str(v) for k, v in (parent_tags or {}).items()}
        self.objectives = normalize_objectives(objectives)
        self.trial_config = trial_config
        self.parent_params = dict(parent_params or {})
        self.command_line = list(sys.argv if command_line is None else command_line)
        self.retry_interval_s = retry_interval_s
        self.finish_wait_s = finish_wait_s
        self.searched = [str(p) for p in searched] if searched is not None else None
        self._reset_runtime()

    # --------------------------------------------------------------- state and pickling

    _RUNTIME = ("_client", "_experiment_id", "_parent_id", "_parent_tags_now", "_children", "_pending",
                "_configs", "_final_seen", "_failures", "_last_error", "_last_failure_at", "_reconciled",
                "_finished", "dropped", "_live", "_requested", "_restored", "_lost_checked", "resumed", "_names")

    def _reset_runtime(self) -> None:
        self._client = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self._parent_tags_now: dict[str, str] = {}
        self._children: dict[str, _Child] = {}
        self._pending: collections.deque[_Op] = collections.deque()
        self._configs: dict[str, ExperimentConfig | None] = {}
        self._final_seen: set[str] = set()
        self._failures: dict[str, str] = {}
        self._last_error: str | None = None
        self._last_failure_at = 0.0
        self._reconciled = False
        self._finished: str | bool = False
        self._live: set[str] = set()
        self._requested: set[str] = set()
        self._restored = False
        self._lost_checked = False
        self.resumed = False
        """Set by the driver on the instance Ray restored for ``--resume`` (see :meth:`_lost_ops`)."""
        self.dropped: list[str] = []
        self._names: dict[str, tuple[str, list[str]]] = {}
        """Ray trial id -> (run name, searched paths), for children created from now on."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in self._RUNTIME:
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("searched", None)  # a tuner.pkl of an older version
        self._reset_runtime()

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_id

    @property
    def pending(self) -> int:
        """Writes not yet recorded (kept in memory, retried)."""
        return len(self._pending)

    def child_run_id(self, trial_id: str) -> str | None:
        child = self._children.get(trial_id)
        return child.run_id if child else None

    # --------------------------------------------------------------- MLflow plumbing

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            db = sqlite_path(self.tracking_uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is not None:
            return self._experiment_id
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment_name)
        if exp is None:
            db = sqlite_path(self.tracking_uri)
            location = (db.parent / "mlartifacts").as_uri() if db is not None else None
            try:
                exp_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
            except MlflowException:
                exp = self.client.get_experiment_by_name(self.experiment_name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp_id)
        self._experiment_id = exp_id
        return exp_id

    def _ensure_parent(self) -> str:
        if self._parent_id is not None:
            return self._parent_id
        exp_id = self._experiment()
        run = find_parent(self.client, exp_id, self.search_name)
        tags = {
            TAG.KIND: "search",
            TAG.SEARCH: self.search_name,
            TAG.OBJECTIVES: json.dumps(self.objectives),
            TAG.VERSION: package_version(),
            TAG.GIT_COMMIT: git_commit(),
            TAG.GIT_DIRTY: git_dirty(),
            TAG.STATUS: "running",
            **({TAG.SEARCHED: json.dumps(self.searched)} if self.searched is not None else {}),
            **self.parent_tags,
        }
        command = " ".join(redact_argv(self.command_line))[:5000]
        if run is None:
            tags[TAG.COMMAND] = command
            run = self.client.create_run(exp_id, tags=tags, run_name=self.search_name)
            existing_tags: dict[str, str] = dict(tags)
            existing_params: dict[str, str] = {}
        else:
            existing_tags = dict(run.data.tags)
            existing_params = dict(run.data.params)
            if TAG.COMMAND not in existing_tags:
                tags[TAG.COMMAND] = command
            else:
                tags["granq.command_resume"] = command
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
        self._log_tags(run_id, {k: v for k, v in tags.items() if existing_tags.get(k) != v})
        self._log_params(run_id, {k: param_value(v) for k, v in self.parent_params.items()}, existing_params,
                         what="search")
        self._parent_tags_now = {**existing_tags, **tags}
        self._parent_id = run_id
        self._load_children()
        return run_id

    def _load_children(self) -> None:
        runs = search_runs_all(self.client, [self._experiment()],
                               f"tags.`{TAG.PARENT}` = {_quote(self._parent_id or '')}",
                               order_by=["attributes.start_time ASC"])
        for run in runs:
            tid = run.data.tags.get(TAG.TRIAL_ID)
            if tid and tid not in self._children:
                self._children[tid] = self._child_from_run(run)

    @staticmethod
    def _child_from_run(run) -> _Child:
        return _Child(run_id=run.info.run_id, status=run.info.status, params=dict(run.data.params),
                      has_final=run.data.metrics.get("final") == 1.0, tags=dict(run.data.tags))

    def _log_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
        for chunk in _chunks(items):
            self.client.log_batch(run_id, tags=chunk)

    def _log_params(self, run_id: str, params: Mapping[str, str], existing: dict[str, str], what: str) -> None:
        from mlflow.entities import Param

        new = {}
        for k, v in params.items():
            v = v[:6000]
            if k not in existing:
                new[k] = v
            elif existing[k] != v:
                log.warning("MLflow param %s of %s run %s stays %r (params are immutable); new value %r "
                            "not recorded", k, what, run_id, existing[k], v)
        for chunk in _chunks([Param(k, v) for k, v in new.items()]):
            self.client.log_batch(run_id, params=chunk)
            existing.update({p.key: p.value for p in chunk})

    def _child(self, trial_id: str) -> _Child:
        parent = self._ensure_parent()
        child = self._children.get(trial_id)
        if child is not None:
            return child
        runs = search_runs_all(
            self.client, [self._experiment()],
            f"tags.`{TAG.PARENT}` = {_quote(parent)} and tags.`{TAG.TRIAL_ID}` = {_quote(trial_id)}",
            order_by=["attributes.start_time ASC"])
        if runs:
            child = self._child_from_run(runs[0])
        else:
            name, searched = self._names.get(trial_id, (trial_id, None))
            tags = {TAG.KIND: "trial", TAG.SEARCH: self.search_name, TAG.TRIAL_ID: trial_id,
                    TAG.PARENT: parent, TAG.STATUS: "running"}
            if searched is not None:
                tags[TAG.SEARCHED] = json.dumps(searched)
            run = self.client.create_run(self._experiment(), tags=tags, run_name=name)
            child = _Child(run_id=run.info.run_id, status="RUNNING", tags=tags)
        self._children[trial_id] = child
        return child

    # --------------------------------------------------------------- the write queue

    def _submit(self, *ops: _Op) -> None:
        self._pending.extend(ops)
        self._flush()

    def _flush(self, force: bool = False) -> bool:
        """Apply queued writes in order; True when nothing is left."""
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
                self._apply(op)
            except TrackingError:
                raise
            except MlflowException as e:
                if getattr(e, "error_code", None) in _PERMANENT_CODES:
                    self._pending.popleft()
                    msg = redact_text(f"{op.describe()}: {' '.join(str(e).split())[:300]}")
                    self.dropped.append(msg)
                    log.warning("MLflow rejected a write for search %s and it was dropped: %s",
                                self.search_name, msg)
                    continue
                self._note_failure(f"{op.describe()}: {' '.join(str(e).split())[:300]}")
                return False
            except Exception as e:  # noqa: BLE001 - any store failure is retried later
                self._note_failure(f"{op.describe()}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
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

    def _apply(self, op: _Op) -> None:
        handler = getattr(self, f"_do_{op.kind}")
        handler(op)

    # --------------------------------------------------------------- operations

    def _do_parent(self, op: _Op) -> None:
        self._ensure_parent()

    def _do_parent_tags(self, op: _Op) -> None:
        parent = self._ensure_parent()
        tags = {k: v for k, v in op.data["tags"].items() if self._parent_tags_now.get(k) != v}
        if tags:
            self._log_tags(parent, tags)
            self._parent_tags_now.update(tags)

    def _do_start(self, op: _Op) -> None:
        tid = op.trial_id or ""
        child = self._child(tid)
        if child.status != "RUNNING":
            self.client.update_run(child.run_id, status="RUNNING")
            child.status = "RUNNING"
        tags = {TAG.STATUS: "running"}
        if op.data.get("proposal"):
            tags["granq.proposal"] = op.data["proposal"]
        if op.data.get("searched") is not None:
            tags[TAG.SEARCHED] = json.dumps(op.data["searched"])
        if child.tags.get(TAG.FAILURE):
            tags["granq.previous_failure"] = child.tags[TAG.FAILURE]
        self._log_tags(child.run_id, {k: v for k, v in tags.items() if child.tags.get(k) != v})
        child.tags.update(tags)
        if child.tags.get(TAG.FAILURE):
            self.client.delete_tag(child.run_id, TAG.FAILURE)
            child.tags.pop(TAG.FAILURE, None)
        cfg = self._configs.get(tid)
        if cfg is not None:
            params = {k: param_value(v) for k, v in flatten(cfg).items()}
            self._log_params(child.run_id, params, child.params, what="trial")
            self.client.log_text(child.run_id, dump_config(cfg), "config.yaml")

    def _do_metrics(self, op: _Op) -> None:
        from mlflow.entities import Metric

        child = self._child(op.trial_id or "")
        ts, step = op.data["timestamp"], op.data["step"]
        metrics = [Metric(k, v, ts, step) for k, v in op.data["metrics"].items()]
        for chunk in _chunks(metrics, 1000):
            self.client.log_batch(child.run_id, metrics=chunk)
        if op.data["metrics"].get("final") == 1.0:
            child.has_final = True

    def _do_child_tags(self, op: _Op) -> None:
        child = self._child(op.trial_id or "")
        self._log_tags(child.run_id, op.data["tags"])
        child.tags.update(op.data["tags"])

    def _do_lost(self, op: _Op) -> None:
        tid = op.trial_id or ""
        child = self._children.get(tid)
        if child is None:
            return
        run = self.client.get_run(child.run_id)
        if run.info.lifecycle_stage != "deleted":
            self._log_tags(child.run_id, {TAG.STATUS: "lost", TAG.FAILURE: op.data["reason"]})
            if run.info.status == "RUNNING":
                set_terminated(self.client, child.run_id, "KILLED")
            self.client.delete_run(child.run_id)
        self._children.pop(tid, None)

    def _do_artifact(self, op: _Op) -> None:
        child = self._child(op.trial_id or "")
        self.client.log_text(child.run_id, op.data["text"], op.data["name"])

    def _do_close(self, op: _Op) -> None:
        child = self._child(op.trial_id or "")
        tags = {TAG.STATUS: op.data["label"]}
        if op.data.get("reason"):
            tags[TAG.FAILURE] = op.data["reason"]
        self._log_tags(child.run_id, tags)
        child.tags.update(tags)
        set_terminated(self.client, child.run_id, op.data["status"])
        child.status = op.data["status"]

    # --------------------------------------------------------------- building operations

    def _config_of(self, trial: Any) -> ExperimentConfig | None:
        tid = str(trial.trial_id)
        if tid not in self._configs:
            cfg = None
            if self.trial_config is not None:
                try:
                    cfg = self.trial_config(dict(getattr(trial, "config", {}) or {}))
                except Exception as e:  # noqa: BLE001 - the trainable will fail with the same error
                    log.warning("trial %s: cannot build its config for MLflow params (%s)", tid, e)
            self._configs[tid] = cfg
        return self._configs[tid]

    def _remember(self, trial: Any) -> list[str]:
        """Name the trial's child (used when it is created) and return its searched paths."""
        tid = str(trial.trial_id)
        if tid not in self._names:
            searched = self.searched if self.searched is not None else \
                searched_paths(getattr(trial, "config", None))
            try:
                name = run_name(trial, self._config_of(trial), searched)
            except Exception as e:  # noqa: BLE001 - a name must never stop the record
                log.warning("trial %s: no readable run name (%s: %s)", tid, type(e).__name__, e)
                name = tid
            self._names[tid] = (name, list(searched))
        return self._names[tid][1]

    def _start_ops(self, trial: Any) -> list[_Op]:
        tid = str(trial.trial_id)
        cfg = self._config_of(trial)
        searched = self._remember(trial)
        proposal = ""
        try:
            proposal = json.dumps(getattr(trial, "config", {}) or {}, default=str, sort_keys=True)[:5000]
        except (TypeError, ValueError):
            pass
        ops = [_Op("start", tid, {"proposal": proposal, "searched": searched})]
        if cfg is not None and TAG.TEACHER not in self._parent_tags_now and TAG.TEACHER not in self._requested:
            ops.append(_Op("parent_tags", None, {"tags": {TAG.TEACHER: cfg.model.name}}))
            self._requested.add(TAG.TEACHER)
        if TAG.SEARCHED not in self._parent_tags_now and TAG.SEARCHED not in self._requested:
            ops.append(_Op("parent_tags", None, {"tags": {TAG.SEARCHED: json.dumps(searched)}}))
            self._requested.add(TAG.SEARCHED)
        return ops

    def _result_ops(self, tid: str, result: Mapping[str, Any]) -> list[_Op]:
        wanted = set(METRICS) | {o["metric"] for o in self.objectives}
        metrics: dict[str, float] = {}
        for k in wanted:
            v = result.get(k)
            if v is not None and _is_number(v):
                metrics[k] = float(v)
        step_src = result.get("epoch", result.get("training_iteration", 0))
        try:
            step = int(step_src)
        except (TypeError, ValueError):
            step = 0
        ops = []
        if metrics:
            ops.append(_Op("metrics", tid, {"metrics": metrics, "step": step, "timestamp": _now_ms()}))
        reason = result.get("failure_reason")
        if isinstance(reason, str) and reason.strip():
            self._failures[tid] = " ".join(reason.split())[:MAX_REASON]
        if metrics.get("final") == 1.0:
            self._final_seen.add(tid)
            sites = result.get("sites_json")
            if isinstance(sites, str) and sites:
                try:
                    sites = json.dumps(json.loads(sites), indent=2)
                except ValueError:
                    pass
                ops.append(_Op("artifact", tid, {"name": "sites.json", "text": sites}))
            teacher = {}
            for key, tag in (("teacher_val_top1", TAG.TEACHER_VAL), ("teacher_test_top1", TAG.TEACHER_TEST)):
                if key in metrics and math.isfinite(metrics[key]) and tag not in self._parent_tags_now \
                        and tag not in self._requested:
                    teacher[tag] = repr(metrics[key])
            if teacher:
                self._requested.update(teacher)
                ops.append(_Op("parent_tags", None, {"tags": teacher}))
        return ops

    def _close_op(self, trial: Any, *, errored: bool = False, interrupted: bool = False) -> _Op:
        tid = str(trial.trial_id)
        self._remember(trial)  # a child first created by this op is named like the others
        last = getattr(trial, "last_result", None) or {}
        if interrupted and not errored and tid not in self._failures:
            return _Op("close", tid, {"status": "KILLED", "label": "interrupted"})
        reported = last.get("failure_reason")
        if isinstance(reported, str) and reported.strip() and tid not in self._failures:
            self._failures[tid] = " ".join(reported.split())[:MAX_REASON]  # e.g. seen again on resume
        if errored or tid in self._failures:
            reason = self._failures.get(tid) or failure_reason(trial)
            return _Op("close", tid, {"status": "FAILED", "label": "failed", "reason": reason})
        child = self._children.get(tid)
        if tid in self._final_seen or last.get("final") == 1 or (child is not None and child.has_final):
            return _Op("close", tid, {"status": "FINISHED", "label": "finished"})
        return _Op("close", tid, {"status": "KILLED", "label": "pruned"})

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run a hook body; recording must never crash the search."""
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.exception("granq_search MLflow recorder: %s failed (the search goes on)", what)

    # --------------------------------------------------------------- Ray Tune hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._guard("setup", lambda: self._submit(_Op("parent")))

    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self._reconciled:
            self._reconciled = True
            # Ray's trials exist before the first step only when the experiment was restored
            self._restored = bool(trials) or self.resumed
            self._guard("resume check", lambda: self._reconcile(trials, ending=False))
        elif self._pending:
            self._guard("retry", lambda: self._flush())

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info):
        def body():
            self._live.add(str(trial.trial_id))
            self._failures.pop(str(trial.trial_id), None)
            self._submit(*self._start_ops(trial))

        self._guard("on_trial_start", body)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        def body():
            tid = str(trial.trial_id)
            if tid not in self._live:  # a trial we did not see start (recorder created mid-run)
                self._live.add(tid)
                self._pending.extend(self._start_ops(trial))
            self._submit(*self._result_ops(tid, result))

        self._guard("on_trial_result", body)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info):
        def body():
            self._live.discard(str(trial.trial_id))
            self._submit(self._close_op(trial))

        self._guard("on_trial_complete", body)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info):
        def body():
            tid = str(trial.trial_id)
            self._submit(_Op("child_tags", tid, {"tags": {"granq.last_error": failure_reason(trial),
                                                          TAG.STATUS: "retrying"}}))

        self._guard("on_trial_recover", body)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info):
        def body():
            self._live.discard(str(trial.trial_id))
            self._submit(self._close_op(trial, errored=True))

        self._guard("on_trial_error", body)

    def on_experiment_end(self, trials: list, **info):
        self._guard("on_experiment_end", lambda: self._reconcile(trials, ending=True))

    # --------------------------------------------------------------- resume and end

    def _reconcile(self, trials: list, ending: bool) -> None:
        """Bring MLflow in line with Ray's trials: replay missing results, close what ended."""
        self._pending.append(_Op("parent"))
        if not self._flush(force=ending):
            return
        ops: list[_Op] = []
        for trial in trials or []:
            tid = str(trial.trial_id)
            status = str(getattr(trial, "status", "") or "")
            child = self._children.get(tid)
            if status in ("TERMINATED", "ERROR"):
                last = getattr(trial, "last_result", None) or {}
                open_child = child is None or child.status == "RUNNING"
                lacks_final = last.get("final") == 1 and (child is None or not child.has_final)
                if not (open_child or lacks_final):
                    continue
                if child is None or lacks_final:
                    ops.extend(self._start_ops(trial))
                    ops.extend(self._replay_ops(trial, child))
                ops.append(self._close_op(trial, errored=status == "ERROR"))
            elif ending and status in _RAY_STATUS_OPEN and child is not None and child.status == "RUNNING":
                ops.append(self._close_op(trial, interrupted=True))
        if self._restored and not self._lost_checked:
            ops.extend(self._lost_ops(trials))
            self._lost_checked = True
        if ops:
            self._submit(*ops)
        if ending:
            self._flush(force=True)

    def _lost_ops(self, trials: list) -> list[_Op]:
        """Children of trials the killed driver started after Ray's last experiment snapshot.

        The restored experiment does not know them (they never reach Ray again); the searcher
        proposes their parameters to new Ray trials (which get their own child). Left in place
        they would be counted twice and stay RUNNING: they are closed, tagged ``lost`` and
        deleted (MLflow keeps deleted runs until ``mlflow gc``; ``mlflow.search_runs`` with
        ``run_view_type=ALL`` still finds them)."""
        known = {str(t.trial_id) for t in trials or []}
        ops = []
        for tid, child in sorted(self._children.items()):
            if tid not in known and child.status == "RUNNING":
                ops.append(_Op("lost", tid, {"reason": LOST_CHILD_REASON}))
        if ops:
            log.warning("search %s: %d MLflow trial run(s) of trials the stopped driver had started after "
                        "Ray's last snapshot are closed and deleted (their configurations run again as new "
                        "trials): %s", self.search_name, len(ops), ", ".join(op.trial_id or "" for op in ops))
        return ops

    def _replay_ops(self, trial: Any, child: _Child | None) -> list[_Op]:
        tid = str(trial.trial_id)
        logged: set[int] = set()
        if child is not None:
            try:
                logged = {m.step for m in self.client.get_metric_history(child.run_id, "epoch")}
            except Exception:  # noqa: BLE001 - replay everything then
                logged = set()
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
        ops: list[_Op] = []
        for res in results:
            step = res.get("epoch", res.get("training_iteration"))
            if step is not None and int(step) in logged and res.get("final") != 1:
                continue
            ops.extend(self._result_ops(tid, res))
        if ops:
            log.info("search %s: replaying %d result(s) of trial %s into MLflow", self.search_name,
                     len(results), tid)
        return ops

    def finish(self, status: str = "FINISHED") -> None:
        """Close the search: flush, close children still RUNNING, log leaderboard and plot,
        close the parent with ``status`` (FINISHED, KILLED or FAILED). Safe to call twice.

        Raises TrackingError (one line) when writes are still unrecorded after retrying.
        """
        status = status.upper()
        if status not in ("FINISHED", "KILLED", "FAILED"):
            raise ValueError(f"finish(status={status!r}): use FINISHED, KILLED or FAILED")
        if self._finished == status and not self._pending:
            return  # already closed with this status
        label = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed"}[status]
        deadline = time.monotonic() + float(getattr(self, "finish_wait_s", 0.0) or 0.0)  # older tuner.pkl
        attempt = 0
        while not self._flush(force=True):
            attempt += 1
            if attempt >= 3 and time.monotonic() >= deadline:
                break
            # a server that is restarting gets finish_wait_s to come back
            time.sleep(min(2.0 * attempt, self.retry_interval_s) if time.monotonic() >= deadline else 2.0)
        if not self._pending:
            try:
                self._close_stragglers()
                try:
                    self._log_parent_artifacts()
                except Exception as e:  # noqa: BLE001 - derived data: `leaderboard --plot` redraws it
                    log.warning("search %s: leaderboard.csv/pareto.png not stored in MLflow (%s: %s); "
                                "`granq-search leaderboard --plot FILE.png` recreates them",
                                self.search_name, type(e).__name__, e)
                parent = self._ensure_parent()
                self._log_tags(parent, {TAG.STATUS: label})
                set_terminated(self.client, parent, status)
                self._finished = status
            except Exception as e:  # noqa: BLE001 - reported below
                self._last_error = redact_text(
                    f"closing the search: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
                self._pending.append(_Op("parent"))
        if self._pending or not self._finished:
            raise TrackingError(
                f"{max(len(self._pending), 1)} MLflow write(s) of search '{self.search_name}' could not be "
                f"recorded at {redact_uri(self.tracking_uri)} ({self._last_error}); the results are safe in "
                "Ray's folder: once the tracking server answers, rerun with --resume to record them")

    def _close_stragglers(self) -> None:
        self._ensure_parent()
        running = search_runs_all(
            self.client, [self._experiment()],
            f"tags.`{TAG.PARENT}` = {_quote(self._parent_id or '')} and attributes.status = 'RUNNING'")
        for run in running:
            tid = run.data.tags.get(TAG.TRIAL_ID, run.info.run_id)
            self._log_tags(run.info.run_id, {TAG.STATUS: "interrupted"})
            set_terminated(self.client, run.info.run_id, "KILLED")
            if tid in self._children:
                self._children[tid].status = "KILLED"

    def _log_parent_artifacts(self) -> None:
        from granq_search.tracking.leaderboard import format_leaderboard, load_runs, plot_pareto

        try:
            board = load_runs(self.tracking_uri, self.search_name, experiment=self.experiment_name,
                              client=self.client)
        except TrackingError as e:  # no trials recorded: nothing to tabulate
            log.info("no leaderboard for search %s: %s", self.search_name, e)
            return
        with tempfile.TemporaryDirectory(prefix="granq_board_") as tmp:
            csv_path = Path(tmp, "leaderboard.csv")
            csv_path.write_text(format_leaderboard(board, "csv", all_trials=True), encoding="utf-8")
            self.client.log_artifact(self._parent_id, str(csv_path))
            try:
                png = plot_pareto(board.df, board.objectives, Path(tmp, "pareto.png"), search=board.search,
                                  teacher=board.teacher)
                self.client.log_artifact(self._parent_id, str(png))
            except Exception:  # noqa: BLE001 - a plot must not lose the record
                log.exception("search %s: the Pareto plot could not be drawn", self.search_name)
