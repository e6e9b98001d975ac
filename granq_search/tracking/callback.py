"""The MLflow record of a search: one parent run per search, one child run per Ray trial.

:class:`SearchRecorder` is a Ray Tune callback that maps trial events to writes; the writes
themselves (queue, retries, batching, runs) are :class:`~granq_search.tracking.writer.SearchWriter`'s.
It never uses MLflow's fluent active-run state, so it never touches another run a user has open
in the same process.

Identity and resume
    The parent run is found by tag ``granq.search=NAME`` before one is created, so a resumed
    search (``--resume``, a new recorder instance) reuses it; a child by ``granq.trial_id`` (and
    ``mlflow.parentRunId``): retries and resumes reuse it and set it back to RUNNING. Params are
    immutable in MLflow: only params not yet logged are written; a changed value is reported.

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
    accuracy, the driver's tags (``granq.space_file``, ``granq.fidelity``, ``granq.production``,
    ...), and at the end the artifacts ``leaderboard.csv`` and ``pareto.png``.

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
    Logging never stops the search, and is never silently lossy: a failed write is kept in
    memory, in order, and retried on the next callback and at :meth:`finish`, which keeps
    retrying for ``finish_wait_s`` seconds, then raises :class:`TrackingError`
    (:mod:`granq_search.tracking.writer`: probing, retry interval, writes MLflow rejects as
    invalid dropped and counted in :attr:`SearchRecorder.dropped`). ``--resume`` replays what
    is missing from Ray's results: when the experiment is restored, trials Ray already holds as
    finished or errored but whose MLflow child is missing, open or lacks the final metrics are
    replayed from the trial's ``result.json`` (or last result) and closed.

Pickling
    Ray pickles the run config (callbacks included) into ``tuner.pkl``; after
    ``Tuner.restore`` Ray calls the unpickled copy. Only the constructor's arguments are
    pickled (the writer and what the recorder has seen are not); ``finish`` works on any
    instance for the same search because the state lives in MLflow (a recorder finds its
    parent and children there).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ray.tune import Callback

from granq_search import metrics as M
from granq_search.config import ExperimentConfig
from granq_search.tracking.log_redact import redacted_logger
from granq_search.tracking.mlflow_io import MAX_TAG
from granq_search.tracking.names import run_name, searched_paths
from granq_search.tracking.ray_trial import clip_reason, failure_reason, report_step, reported_metrics, stored_results
from granq_search.tracking.schema import DEFAULT_EXPERIMENT, METRICS, TAG, normalize_objectives
from granq_search.tracking.search_runs import Child, Op
from granq_search.tracking.store import quote as _quote
from granq_search.tracking.writer import SearchWriter

__all__ = ["SearchRecorder"]

log = redacted_logger(__name__)

LOST_CHILD_REASON = ("lost when the driver stopped: started after Ray's last experiment snapshot, so the "
                     "resumed search does not know this Ray trial; its configuration ran again as a new trial")
_RAY_STATUS_OPEN = {"RUNNING", "PENDING", "PAUSED"}


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

    _RUNTIME = ("_writer", "_configs", "_final_seen", "_failures", "_reconciled", "_live", "_requested",
                "_restored", "_lost_checked", "resumed")

    def _reset_runtime(self) -> None:
        self._writer = SearchWriter(
            tracking_uri=self.tracking_uri, experiment_name=self.experiment_name, search_name=self.search_name,
            objectives=self.objectives, parent_tags=self.parent_tags, parent_params=self.parent_params,
            command_line=self.command_line, searched=self.searched, retry_interval_s=self.retry_interval_s)
        self._configs: dict[str, ExperimentConfig | None] = {}
        self._final_seen: set[str] = set()
        self._failures: dict[str, str] = {}
        self._reconciled = False
        self._live: set[str] = set()
        self._requested: set[str] = set()
        self._restored = False
        self._lost_checked = False
        self.resumed = False
        """Set by the driver on the instance Ray restored for ``--resume`` (see :meth:`_lost_ops`)."""

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
    def client(self):
        """The writer's ``MlflowClient``."""
        return self._writer.runs.client

    @property
    def parent_run_id(self) -> str | None:
        return self._writer.runs.parent_run_id

    @property
    def pending(self) -> int:
        """Writes not yet recorded (kept in memory, retried)."""
        return self._writer.pending

    @property
    def dropped(self) -> list[str]:
        """Writes MLflow rejected as invalid and that were dropped (one line each)."""
        return self._writer.dropped

    def child_run_id(self, trial_id: str) -> str | None:
        child = self._writer.runs.children.get(trial_id)
        return child.run_id if child else None

    def _submit(self, *ops: Op) -> None:
        self._writer.submit(*ops)

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
        names = self._writer.runs.child_names
        if tid not in names:
            searched = self.searched if self.searched is not None else \
                searched_paths(getattr(trial, "config", None))
            try:
                name = run_name(trial, self._config_of(trial), searched)
            except Exception as e:  # noqa: BLE001 - a name must never stop the record
                log.warning("trial %s: no readable run name (%s: %s)", tid, type(e).__name__, e)
                name = tid
            names[tid] = (name, list(searched))
        return names[tid][1]

    def _start_ops(self, trial: Any) -> list[Op]:
        tid = str(trial.trial_id)
        cfg = self._config_of(trial)
        searched = self._remember(trial)
        proposal = ""
        try:
            proposal = json.dumps(getattr(trial, "config", {}) or {}, default=str, sort_keys=True)
        except (TypeError, ValueError):
            pass
        if len(proposal) > MAX_TAG:  # cut, it would not be JSON: `export` could not read it
            log.warning("trial %s: its proposal is %d characters, more than an MLflow tag holds (%d); tag %s "
                        "not recorded (`export` cannot rebuild this trial's config)", tid, len(proposal), MAX_TAG,
                        TAG.PROPOSAL)
            proposal = ""
        ops = [Op("start", tid, {"proposal": proposal, "searched": searched, "config": cfg})]
        recorded = self._writer.runs.parent_tags_now
        if cfg is not None and TAG.TEACHER not in recorded and TAG.TEACHER not in self._requested:
            ops.append(Op("parent_tags", None, {"tags": {TAG.TEACHER: cfg.model.name}}))
            self._requested.add(TAG.TEACHER)
        if TAG.SEARCHED not in recorded and TAG.SEARCHED not in self._requested:
            ops.append(Op("parent_tags", None, {"tags": {TAG.SEARCHED: json.dumps(searched)}}))
            self._requested.add(TAG.SEARCHED)
        return ops

    def _result_ops(self, tid: str, result: Mapping[str, Any]) -> list[Op]:
        metrics = reported_metrics(result, set(METRICS) | {o["metric"] for o in self.objectives})
        step = report_step(result)
        ops = []
        if metrics:
            ops.append(Op("metrics", tid, {"metrics": metrics, "step": step, "timestamp": int(time.time() * 1000)}))
        reason = result.get("failure_reason")
        if isinstance(reason, str) and reason.strip():
            self._failures[tid] = clip_reason(reason)
        if metrics.get(M.FINAL) == 1.0:
            self._final_seen.add(tid)
            sites = result.get("sites_json")
            if isinstance(sites, str) and sites:
                try:
                    sites = json.dumps(json.loads(sites), indent=2)
                except ValueError:
                    pass
                ops.append(Op("artifact", tid, {"name": "sites.json", "text": sites}))
            teacher = {}
            recorded = self._writer.runs.parent_tags_now
            for key, tag in ((M.TEACHER_VAL_TOP1, TAG.TEACHER_VAL), (M.TEACHER_TEST_TOP1, TAG.TEACHER_TEST)):
                if key in metrics and math.isfinite(metrics[key]) and tag not in recorded \
                        and tag not in self._requested:
                    teacher[tag] = repr(metrics[key])
            if teacher:
                self._requested.update(teacher)
                ops.append(Op("parent_tags", None, {"tags": teacher}))
        return ops

    def _close_op(self, trial: Any, *, errored: bool = False, interrupted: bool = False) -> Op:
        tid = str(trial.trial_id)
        self._remember(trial)  # a child first created by this op is named like the others
        last = getattr(trial, "last_result", None) or {}
        if interrupted and not errored and tid not in self._failures:
            return Op("close", tid, {"status": "KILLED", "label": "interrupted"})
        reported = last.get("failure_reason")
        if isinstance(reported, str) and reported.strip() and tid not in self._failures:
            self._failures[tid] = clip_reason(reported)  # e.g. seen again on resume
        if errored or tid in self._failures:
            reason = self._failures.get(tid) or failure_reason(trial)
            return Op("close", tid, {"status": "FAILED", "label": "failed", "reason": reason})
        child = self._writer.runs.children.get(tid)
        if tid in self._final_seen or last.get(M.FINAL) == 1 or (child is not None and child.has_final):
            return Op("close", tid, {"status": "FINISHED", "label": "finished"})
        return Op("close", tid, {"status": "KILLED", "label": "pruned"})

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        """Run a hook body; recording must never crash the search."""
        try:
            fn()
        except Exception:  # noqa: BLE001
            log.exception("granq_search MLflow recorder: %s failed (the search goes on)", what)

    # --------------------------------------------------------------- Ray Tune hooks

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._guard("setup", lambda: self._submit(Op("parent")))

    def on_step_begin(self, iteration: int, trials: list, **info):
        if not self._reconciled:
            self._reconciled = True
            # Ray's trials exist before the first step only when the experiment was restored
            self._restored = bool(trials) or self.resumed
            self._guard("resume check", lambda: self._reconcile(trials, ending=False))
        elif self._writer.pending:
            self._guard("retry", lambda: self._writer.flush())

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
                self._writer.enqueue(*self._start_ops(trial))
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
            self._submit(Op("child_tags", tid, {"tags": {TAG.LAST_ERROR: failure_reason(trial),
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
        self._writer.enqueue(Op("parent"))
        if not self._writer.flush(force=ending):
            return
        ops: list[Op] = []
        for trial in trials or []:
            tid = str(trial.trial_id)
            status = str(getattr(trial, "status", "") or "")
            child = self._writer.runs.children.get(tid)
            if status in ("TERMINATED", "ERROR"):
                last = getattr(trial, "last_result", None) or {}
                open_child = child is None or child.status == "RUNNING"
                lacks_final = last.get(M.FINAL) == 1 and (child is None or not child.has_final)
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
            self._writer.flush(force=True)

    def _lost_ops(self, trials: list) -> list[Op]:
        """Children of trials the killed driver started after Ray's last experiment snapshot: Ray
        never reports them again and their parameters go to new trials, so they are closed, tagged
        ``lost`` and deleted (MLflow keeps deleted runs until ``mlflow gc``)."""
        known = {str(t.trial_id) for t in trials or []}
        ops = []
        for tid, child in sorted(self._writer.runs.children.items()):
            if tid not in known and child.status == "RUNNING":
                ops.append(Op("lost", tid, {"reason": LOST_CHILD_REASON}))
        if ops:
            log.warning("search %s: %d MLflow trial run(s) of trials the stopped driver had started after "
                        "Ray's last snapshot are closed and deleted (their configurations run again as new "
                        "trials): %s", self.search_name, len(ops), ", ".join(op.trial_id or "" for op in ops))
        return ops

    def _replay_ops(self, trial: Any, child: Child | None) -> list[Op]:
        tid = str(trial.trial_id)
        logged = self._writer.runs.logged_steps(child) if child is not None else set()
        results = stored_results(trial)
        ops: list[Op] = []
        replayed = 0
        for res in results:
            if report_step(res) in logged and res.get(M.FINAL) != 1:
                continue
            replayed += 1
            ops.extend(self._result_ops(tid, res))
        if ops:
            log.info("search %s: replaying %d of %d stored result(s) of trial %s into MLflow (%d write(s))",
                     self.search_name, replayed, len(results), tid, len(ops))
        return ops

    def finish(self, status: str = "FINISHED") -> None:
        """Close the search: flush, close children still RUNNING, log leaderboard and plot,
        close the parent with ``status`` (FINISHED, KILLED or FAILED). Safe to call twice.

        Raises TrackingError (one line) when writes are still unrecorded after retrying.
        """
        wait_s = float(getattr(self, "finish_wait_s", 0.0) or 0.0)  # older tuner.pkl
        self._writer.finish(status, wait_s=wait_s)
