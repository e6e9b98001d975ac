"""The MLflow runs of one search: its parent run, one child run per Ray trial, written directly.

:class:`SearchRuns` applies one write (:class:`Op`) at a time and knows nothing of Ray or of
retrying (:class:`~granq_search.tracking.writer.SearchWriter` queues and retries the ops; the
recorder makes them). It talks to MLflow only through an explicit ``MlflowClient(tracking_uri)``
(no fluent active-run state).

The parent run is found by tag ``granq.search=NAME`` before one is created (a resumed search
reuses it); a child by tags ``mlflow.parentRunId`` + ``granq.trial_id`` (reused and set back to
RUNNING). Params are immutable in MLflow: only params not yet logged are written; a changed value
is reported, not written. Tags and params go in batches of at most 100, metrics of at most 1000.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.config import dump_config, flatten
from granq_search.errors import TrackingError
from granq_search.tracking.log_redact import redacted_logger
from granq_search.tracking.mlflow_io import (
    MAX_METRICS,
    chunks,
    ensure_experiment,
    log_tags,
    new_params,
    open_client,
)
from granq_search.tracking.provenance import git_commit, git_dirty, package_version
from granq_search.tracking.schema import TAG, param_value
from granq_search.tracking.store import find_parent, quote as _quote, search_runs_all, set_terminated
from granq_search.tracking.uri import redact_argv

__all__ = ["SearchRuns", "Op", "Child", "CLOSING_LABEL"]

log = redacted_logger(__name__)

CLOSING_LABEL = {"FINISHED": "finished", "KILLED": "interrupted", "FAILED": "failed"}
"""Closing status of the parent run -> its tag ``granq.status``."""


@dataclass
class Child:
    """What is known of a trial's child run."""

    run_id: str
    status: str
    params: dict[str, str] = field(default_factory=dict)
    has_final: bool = False
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Op:
    """One write; ``kind`` names its handler ``SearchRuns._do_<kind>``, ``data`` its arguments:

    ``parent`` (find or create the parent run); ``parent_tags`` {tags}; ``start`` {proposal,
    searched, config} (the child RUNNING, its tags, params and ``config.yaml``); ``metrics``
    {metrics, step, timestamp}; ``child_tags`` {tags}; ``artifact`` {name, text}; ``close``
    {status, label, reason}; ``lost`` {reason} (the child closed, tagged ``lost`` and deleted).
    """

    kind: str
    trial_id: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}{'(' + self.trial_id + ')' if self.trial_id else ''}"


class SearchRuns:
    """The parent and children of search ``search_name`` (arguments as the recorder's;
    ``searched``: tag ``granq.searched`` of the parent, None to leave it to the recorder)."""

    def __init__(self, *, tracking_uri: str, experiment_name: str, search_name: str,
                 objectives: list[dict[str, str]], parent_tags: Mapping[str, str],
                 parent_params: Mapping[str, Any], command_line: Sequence[str],
                 searched: Sequence[str] | None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.search_name = search_name
        self.objectives = objectives
        self.parent_tags = parent_tags
        self.parent_params = parent_params
        self.command_line = command_line
        self.searched = searched
        self._client = None
        self._experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.parent_tags_now: dict[str, str] = {}
        """The parent run's tags as recorded."""
        self.children: dict[str, Child] = {}
        """Ray trial id -> its child run, as far as known."""
        self.child_names: dict[str, tuple[str, list[str]]] = {}
        """Ray trial id -> (run name, searched paths), for children created from now on."""

    @property
    def client(self):
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def apply(self, op: Op) -> None:
        getattr(self, f"_do_{op.kind}")(op)

    # --------------------------------------------------------------- finding and creating runs

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(self.client, self.experiment_name, self.tracking_uri)
        return self._experiment_id

    def _ensure_parent(self) -> str:
        if self.parent_run_id is not None:
            return self.parent_run_id
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
                tags[TAG.COMMAND_RESUME] = command
            if run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
        run_id = run.info.run_id
        self._log_tags(run_id, {k: v for k, v in tags.items() if existing_tags.get(k) != v})
        self._log_params(run_id, {k: param_value(v) for k, v in self.parent_params.items()}, existing_params,
                         what="search")
        # children first: should their query fail, the next call finds the parent again and
        # retries it (a parent id set before would leave ``children`` empty for good)
        self._load_children(run_id)
        self.parent_tags_now = {**existing_tags, **tags}
        self.parent_run_id = run_id
        return run_id

    def _load_children(self, parent_run_id: str) -> None:
        runs = search_runs_all(self.client, [self._experiment()], f"tags.`{TAG.PARENT}` = {_quote(parent_run_id)}",
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
        log_tags(self.client, run_id, tags)

    def _log_params(self, run_id: str, params: Mapping[str, str], existing: dict[str, str], what: str) -> None:
        from mlflow.entities import Param

        def changed(k: str, old: str, v: str) -> None:
            log.warning("MLflow param %s of %s run %s stays %r (params are immutable); new value %r "
                        "not recorded", k, what, run_id, old, v)

        new = new_params(params, existing, changed)
        for chunk in chunks([Param(k, v) for k, v in new.items()]):
            self.client.log_batch(run_id, params=chunk)
            existing.update({p.key: p.value for p in chunk})

    def logged_steps(self, child: Child) -> set[int]:
        """The epochs ``child`` has metrics for (none when they cannot be read)."""
        try:
            return {m.step for m in self.client.get_metric_history(child.run_id, M.EPOCH)}
        except Exception:  # noqa: BLE001 - replay everything then
            return set()

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
            tags[TAG.PROPOSAL] = op.data["proposal"]
        if op.data.get("searched") is not None:
            tags[TAG.SEARCHED] = json.dumps(op.data["searched"])
        if child.tags.get(TAG.FAILURE):
            tags[TAG.PREVIOUS_FAILURE] = child.tags[TAG.FAILURE]
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
        for chunk in chunks(batch, MAX_METRICS):
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

    # --------------------------------------------------------------- closing the search

    def close_search(self, status: str) -> None:
        """Close children still RUNNING (``interrupted``), log ``leaderboard.csv`` and
        ``pareto.png`` to the parent, close the parent with ``status`` (a :data:`CLOSING_LABEL` key)."""
        self._close_stragglers()
        try:
            self._log_parent_artifacts()
        except Exception as e:  # noqa: BLE001 - derived data: `leaderboard --plot` redraws it
            log.warning("search %s: leaderboard.csv/pareto.png not stored in MLflow (%s: %s); "
                        "`granq-search leaderboard --plot FILE.png` recreates them",
                        self.search_name, type(e).__name__, e)
        parent = self._ensure_parent()
        self._log_tags(parent, {TAG.STATUS: CLOSING_LABEL[status]})
        set_terminated(self.client, parent, status)

    def _close_stragglers(self) -> None:
        self._ensure_parent()
        running = search_runs_all(
            self.client, [self._experiment()],
            f"tags.`{TAG.PARENT}` = {_quote(self.parent_run_id or '')} and attributes.status = 'RUNNING'")
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
            self.client.log_artifact(self.parent_run_id, str(csv_path))
            try:
                png = plot_pareto(board.df, board.objectives, Path(tmp, "pareto.png"), search=board.search,
                                  teacher=board.teacher)
                self.client.log_artifact(self.parent_run_id, str(png))
            except Exception:  # noqa: BLE001 - a plot must not lose the record
                log.exception("search %s: the Pareto plot could not be drawn", self.search_name)
