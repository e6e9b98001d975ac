"""Buffered MLflow writes of one search: its parent run, one child run per trial, in order.

:class:`SearchWriter` knows MLflow and nothing of Ray: the recorder
(:class:`~granq_search.tracking.callback.SearchRecorder`) turns trial events into :class:`Op`
writes and submits them here. It talks to MLflow only through an explicit
``MlflowClient(tracking_uri)`` (no fluent active-run state).

Runs
    The parent run is found by tag ``granq.search=NAME`` before one is created (a resumed
    search reuses it); a child by tags ``mlflow.parentRunId`` + ``granq.trial_id`` (reused and
    set back to RUNNING). Params are immutable in MLflow: only params not yet logged are
    written; a changed value is reported, not written. Tags and params go in batches of at
    most :data:`MAX_BATCH`, metrics in batches of at most 1000.

When the store fails
    A write that fails stays queued, in order, and is retried on the next submit (at most every
    ``retry_interval_s`` seconds; an http server is probed for 1 s first so a dead server does
    not stall the Tune loop) and in :meth:`SearchWriter.finish`, which keeps retrying for
    ``wait_s`` seconds before it raises :class:`~granq_search.errors.TrackingError`. Writes
    MLflow rejects as invalid (HTTP 400) cannot succeed by retrying: they are dropped with a
    warning and listed in :attr:`SearchWriter.dropped`. Every log line has its URIs redacted
    (:class:`RedactFilter`): MLflow's errors carry the request URL as given, credentials included.

State
    Nothing here is pickled: the recorder makes a new writer after unpickling, which finds its
    runs in MLflow again.
"""

from __future__ import annotations

import collections
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.config import dump_config, flatten
from granq_search.errors import TrackingError
from granq_search.tracking.provenance import git_commit, git_dirty, package_version
from granq_search.tracking.schema import TAG, param_value
from granq_search.tracking.store import find_parent, quote as _quote, search_runs_all, set_terminated
from granq_search.tracking.uri import redact_argv, redact_text, redact_uri, server_reachable, sqlite_path

__all__ = ["SearchWriter", "Op", "Child", "RedactFilter", "MAX_BATCH"]

log = logging.getLogger(__name__)


class RedactFilter(logging.Filter):
    """Every message of a logger, exception text included, with URIs redacted: MLflow's errors
    carry the request URL as given (``http://user:password@host/...``)."""

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


log.addFilter(RedactFilter())

MAX_BATCH = 100  # params/tags per log_batch (MLflow's limit)
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_DOES_NOT_EXIST"}
_CLOSING_LABEL = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed"}


def _chunks(items: list, n: int = MAX_BATCH):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@dataclass
class Child:
    """What the writer knows of a trial's child run."""

    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    has_final: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Op:
    """One queued write. ``kind`` names its handler (``SearchWriter._do_<kind>``):

    ``parent`` (find or create the parent run); ``parent_tags`` {tags}; ``start`` {proposal,
    searched, config} (child RUNNING, its tags, params and ``config.yaml``); ``metrics``
    {metrics, step, timestamp}; ``child_tags`` {tags}; ``artifact`` {name, text}; ``close``
    {status, label, reason}; ``lost`` {reason} (close, tag and delete the child).
    """

    kind: str
    trial_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}{'(' + self.trial_id + ')' if self.trial_id else ''}"


class SearchWriter:
    """The MLflow runs of search ``search_name`` and the queue of writes to them.

    Args: as :class:`~granq_search.tracking.callback.SearchRecorder`'s (``parent_tags``: the
    driver's extra parent tags; ``objectives`` normalized; ``searched``: tag ``granq.searched``
    of the parent, None to leave it to the recorder).
    """

    def __init__(self, *, tracking_uri: str, experiment_name: str, search_name: str,
                 objectives: list[dict[str, str]], parent_tags: Mapping[str, str],
                 parent_params: Mapping[str, Any], command_line: Sequence[str],
                 searched: Sequence[str] | None, retry_interval_s: float) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_name = search_name
        self.objectives = objectives
        self.parent_tags = parent_tags
        self.parent_params = parent_params
        self.command_line = command_line
        self.searched = searched
        self.retry_interval_s = retry_interval_s
        self._client = None
        self._experiment_id: str | None = None
        self._parent_id: str | None = None
        self.parent_tags_now: dict[str, str] = {}
        """The parent run's tags as recorded (or being recorded)."""
        self.children: dict[str, Child] = {}
        """Ray trial id -> its child run, as far as known."""
        self.child_names: dict[str, tuple[str, list[str]]] = {}
        """Ray trial id -> (run name, searched paths), for children created from now on."""
        self.dropped: list[str] = []
        """Writes MLflow rejected as invalid (one line each)."""
        self._pending: collections.deque[Op] = collections.deque()
        self._last_error: str | None = None
        self._last_failure_at = 0.0
        self._finished: str | bool = False

    @property
    def parent_run_id(self) -> str | None:
        return self._parent_id

    @property
    def pending(self) -> int:
        """Writes not yet recorded (kept in memory, retried)."""
        return len(self._pending)

    # --------------------------------------------------------------- runs

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
        self.parent_tags_now = {**existing_tags, **tags}
        self._parent_id = run_id
        self._load_children()
        return run_id

    def _load_children(self) -> None:
        runs = search_runs_all(self.client, [self._experiment()],
                               f"tags.`{TAG.PARENT}` = {_quote(self._parent_id or '')}",
                               order_by=["attributes.start_time ASC"])
        for run in runs:
            tid = run.data.tags.get(TAG.TRIAL_ID)
            if tid and tid not in self.children:
                self.children[tid] = self._child_from_run(run)

    @staticmethod
    def _child_from_run(run) -> Child:
        return Child(run_id=run.info.run_id, status=run.info.status, params=dict(run.data.params),
                     has_final=run.data.metrics.get(M.FINAL) == 1.0, tags=dict(run.data.tags))

    def _child(self, trial_id: str) -> Child:
        parent = self._ensure_parent()
        child = self.children.get(trial_id)
        if child is not None:
            return child
        runs = search_runs_all(
            self.client, [self._experiment()],
            f"tags.`{TAG.PARENT}` = {_quote(parent)} and tags.`{TAG.TRIAL_ID}` = {_quote(trial_id)}",
            order_by=["attributes.start_time ASC"])
        if runs:
            child = self._child_from_run(runs[0])
        else:
            name, searched = self.child_names.get(trial_id, (trial_id, None))
            tags = {TAG.KIND: "trial", TAG.SEARCH: self.search_name, TAG.TRIAL_ID: trial_id,
                    TAG.PARENT: parent, TAG.STATUS: "running"}
            if searched is not None:
                tags[TAG.SEARCHED] = json.dumps(searched)
            run = self.client.create_run(self._experiment(), tags=tags, run_name=name)
            child = Child(run_id=run.info.run_id, status="RUNNING", tags=tags)
        self.children[trial_id] = child
        return child

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

    def logged_steps(self, child: Child) -> set[int]:
        """The epochs ``child`` has metrics for (none when they cannot be read)."""
        try:
            return {m.step for m in self.client.get_metric_history(child.run_id, M.EPOCH)}
        except Exception:  # noqa: BLE001 - replay everything then
            return set()

    # --------------------------------------------------------------- the queue

    def enqueue(self, *ops: Op) -> None:
        """Queue ``ops`` behind the pending writes, without writing yet."""
        self._pending.extend(ops)

    def submit(self, *ops: Op) -> None:
        """Queue ``ops`` and write what the store takes now."""
        self._pending.extend(ops)
        self.flush()

    def flush(self, force: bool = False) -> bool:
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
                getattr(self, f"_do_{op.kind}")(op)
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

    # --------------------------------------------------------------- operations

    def _do_parent(self, op: Op) -> None:
        self._ensure_parent()

    def _do_parent_tags(self, op: Op) -> None:
        parent = self._ensure_parent()
        tags = {k: v for k, v in op.data["tags"].items() if self.parent_tags_now.get(k) != v}
        if tags:
            self._log_tags(parent, tags)
            self.parent_tags_now.update(tags)

    def _do_start(self, op: Op) -> None:
        child = self._child(op.trial_id or "")
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
        cfg = op.data.get("config")
        if cfg is not None:
            params = {k: param_value(v) for k, v in flatten(cfg).items()}
            self._log_params(child.run_id, params, child.params, what="trial")
            self.client.log_text(child.run_id, dump_config(cfg), "config.yaml")

    def _do_metrics(self, op: Op) -> None:
        from mlflow.entities import Metric

        child = self._child(op.trial_id or "")
        ts, step = op.data["timestamp"], op.data["step"]
        batch = [Metric(k, v, ts, step) for k, v in op.data["metrics"].items()]
        for chunk in _chunks(batch, 1000):
            self.client.log_batch(child.run_id, metrics=chunk)
        if op.data["metrics"].get(M.FINAL) == 1.0:
            child.has_final = True

    def _do_child_tags(self, op: Op) -> None:
        child = self._child(op.trial_id or "")
        self._log_tags(child.run_id, op.data["tags"])
        child.tags.update(op.data["tags"])

    def _do_lost(self, op: Op) -> None:
        tid = op.trial_id or ""
        child = self.children.get(tid)
        if child is None:
            return
        run = self.client.get_run(child.run_id)
        if run.info.lifecycle_stage != "deleted":
            self._log_tags(child.run_id, {TAG.STATUS: "lost", TAG.FAILURE: op.data["reason"]})
            if run.info.status == "RUNNING":
                set_terminated(self.client, child.run_id, "KILLED")
            self.client.delete_run(child.run_id)
        self.children.pop(tid, None)

    def _do_artifact(self, op: Op) -> None:
        child = self._child(op.trial_id or "")
        self.client.log_text(child.run_id, op.data["text"], op.data["name"])

    def _do_close(self, op: Op) -> None:
        child = self._child(op.trial_id or "")
        tags = {TAG.STATUS: op.data["label"]}
        if op.data.get("reason"):
            tags[TAG.FAILURE] = op.data["reason"]
        self._log_tags(child.run_id, tags)
        child.tags.update(tags)
        set_terminated(self.client, child.run_id, op.data["status"])
        child.status = op.data["status"]

    # --------------------------------------------------------------- the end

    def finish(self, status: str = "FINISHED", wait_s: float = 0.0) -> None:
        """Flush, close children still RUNNING, log leaderboard and plot, close the parent with
        ``status`` (FINISHED, KILLED or FAILED). Safe to call twice.

        A store that does not answer gets ``wait_s`` seconds (retried every 2 s; then at least
        3 attempts). Raises TrackingError (one line) when writes are still unrecorded.
        """
        status = status.upper()
        if status not in _CLOSING_LABEL:
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
                self._close_stragglers()
                try:
                    self._log_parent_artifacts()
                except Exception as e:  # noqa: BLE001 - derived data: `leaderboard --plot` redraws it
                    log.warning("search %s: leaderboard.csv/pareto.png not stored in MLflow (%s: %s); "
                                "`granq-search leaderboard --plot FILE.png` recreates them",
                                self.search_name, type(e).__name__, e)
                parent = self._ensure_parent()
                self._log_tags(parent, {TAG.STATUS: _CLOSING_LABEL[status]})
                set_terminated(self.client, parent, status)
                self._finished = status
            except Exception as e:  # noqa: BLE001 - reported below
                self._last_error = redact_text(f"closing the search: {type(e).__name__}: {_short(e)}")
                self._pending.append(Op("parent"))
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
            if tid in self.children:
                self.children[tid].status = "KILLED"

    def _log_parent_artifacts(self) -> None:
        from granq_search.tracking.leaderboard import load_runs
        from granq_search.tracking.plot import plot_pareto
        from granq_search.tracking.table import format_leaderboard

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
