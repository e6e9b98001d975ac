"""Launching a :class:`~granq_search.search.plan.SearchPlan`: Ray, the record, the Tuner, the fit.

Ray is started only when it is not running yet (``address`` None: a local instance, its dashboard
only with ``dashboard``; ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``: an existing cluster), and
shut down only when this launch started it. A line on stderr names the dashboard's address or says
why there is none. Ray's own progress output is off; the live status table
(:mod:`~granq_search.search.status`) replaces it.

Trial settings follow ../shared/SEARCH.md: ``TuneConfig`` never gets ``metric``/``mode`` (the
objectives live on the searcher), ``max_concurrent_trials`` is always set, the scheduler gets
its own metric and mode, ``FailureConfig(max_failures=2)`` (worker deaths; failures that would
repeat are reported by the trainable instead), ``CheckpointConfig(num_to_keep=2)``, experiment
snapshots every :data:`SNAPSHOT_PERIOD_S` (``TUNE_GLOBAL_CHECKPOINT_S``, for ``--resume`` after a
killed driver) and ``RAY_CHDIR_TO_TRIAL_DIR=0`` for the trials. At the end of a launch, even an
interrupted one, no Optuna trial is left RUNNING, the record has the search's status and the
MLflow parent run is closed; a launch that fails before the fit starts leaves no folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from granq_search.config import to_dict
from granq_search.errors import GranqError
from granq_search.search.layout import SearchError, write_record
from granq_search.search.plan import SearchPlan
from granq_search.search.space import SearchSpace, TrialConfig, space_record_text

__all__ = ["SearchRun", "launch", "SNAPSHOT_PERIOD_S", "FINISH_WAIT_S"]

SNAPSHOT_PERIOD_S = 1.0
"""Seconds between Ray's experiment-state snapshots (``TUNE_GLOBAL_CHECKPOINT_S``; Ray's default
'auto' is at least 10 s). The environment variable, when set, wins."""

FINISH_WAIT_S = 30.0
"""Seconds the MLflow recorder keeps retrying at the end of a search when the tracking server does
not answer (a server being restarted) before the search ends with 'rerun with --resume'."""


@dataclass
class SearchRun:
    """What a launch did and how it ended, for :func:`~granq_search.search.outcome.finalise`."""

    record: dict[str, Any]
    """The search's record (``search.json``) as last written."""
    started_ray: bool = False
    dashboard_url: str | None = None
    made_root: bool = False
    fit_started: bool = False
    recorder: Any = None
    status: str = "interrupted"
    num_trials: int = 0
    notes: list[str] = field(default_factory=list)


def launch(plan: SearchPlan, *, trainable: Callable[..., Any] | None = None,
           callbacks: Sequence[Any] = ()) -> SearchRun:
    """Connect Ray, write the record, build (or restore) the Tuner and fit it; then close what the
    fit left open (:func:`_close`), also when it raised."""
    from granq_search.search.study import open_study

    # before any folder: a refused connection leaves nothing
    from granq_search.user_code import code_roots

    # the folders of the config's own modules (model.name / data.dataset import paths) for local trials
    code_paths = code_roots((plan.trial_base.model.name, plan.trial_base.data.dataset))
    started_ray, dashboard_url = _connect(plan.address, plan.progress, dashboard=plan.dashboard,
                                          code_paths=code_paths)
    run = SearchRun(record=dict(plan.record), started_ray=started_ray, dashboard_url=dashboard_url,
                    made_root=not plan.paths.root.exists())
    table = _status_table(plan.space, plan.name, plan.num_samples, plan.status_interval_s) if plan.progress \
        else None
    try:
        with _env(_trial_env()):
            tuner = _tuner(plan, run, table, trainable, callbacks)
            run.fit_started = True
            grid = tuner.fit()
        run.num_trials = len(grid)
        finished = grid.num_terminated + grid.num_errors == run.num_trials
        study, _ = open_study(plan.space, str(plan.paths.journal), plan.name)
        exhausted = bool(study.user_attrs.get("exhausted"))
        if finished and (run.num_trials >= plan.num_samples or exhausted):
            run.status = "exhausted" if exhausted and run.num_trials < plan.num_samples else "finished"
    finally:  # run.status stays "interrupted" when anything above raised
        _close(plan, run)
    return run


def _trial_env() -> dict[str, str]:
    """The environment of a launch (and so of every trial actor: Ray propagates it)."""
    # Trials must not depend on their working directory: Ray propagates this variable to every
    # trial actor (and relative paths were made absolute in the plan).
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0",
           # Ray's own progress output is off (the legacy engine at verbose 0 prints nothing; the new
           # one prints headers and per-trial boxes even at verbose 0); the status table replaces it
           "RAY_AIR_NEW_OUTPUT": "0",
           # Ray snapshots the experiment (trials, searcher) every ~10 s by default; trials a killed
           # driver started after the last snapshot are unknown to Ray on --resume (the searcher
           # then proposes their parameters again). A short period keeps that gap small.
           "TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S)),
           # one checkpoint per epoch with num_to_keep=2 forces frequent snapshots, by design
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S":
               os.environ.get("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
           # trials validate only at the scheduler's rung epochs and the last one (eval_epochs):
           # the other epochs' reports carry no val_top1, which ASHA skips and the searcher and
           # recorder accept; Ray's check that every report names the scheduler metric is off
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    return env


def _tuner(plan: SearchPlan, run: SearchRun, table: Any, trainable: Callable[..., Any] | None,
           callbacks: Sequence[Any]):
    """The search's folder and record, and its Tuner: new, or restored from Ray's state."""
    from ray import tune

    from granq_search.search.costs import EfficiencyCost
    from granq_search.search.resume import replayable_results, restored_recorder
    from granq_search.search.scheduler import asha_for, eval_epochs
    from granq_search.search.searcher import OptunaSearcher
    from granq_search.search.study import open_study
    from granq_search.search.trainable import make_trainable

    space, paths, name = plan.space, plan.paths, plan.name
    paths.root.mkdir(parents=True, exist_ok=True)
    if not plan.resume:
        run.record = _new_record(plan)
        open_study(space, str(paths.journal), name, create=True)  # enqueues the initial points
    run.record.update(status="running", updated=time.time(), cpus_per_trial=plan.cpus_per_trial,
                      gpus_per_trial=plan.gpus_per_trial, address=plan.address,
                      resumes=int(run.record.get("resumes", -1)) + 1)
    write_record(paths.record, run.record)

    # A killed driver's last Ray snapshot may predate the end of some trials; the study
    # (written at once) has their last results: replayed, not trained again.
    replay = replayable_results(space, str(paths.journal), name) if plan.resume else {}
    # the one builder of the trials' configs: the trainable trains with it, the recorder logs it
    trials = TrialConfig(plan.trial_base)
    fn = make_trainable(trials, teacher_state=plan.teacher_state, teacher_sha256=plan.teacher_sha,
                        cpus_per_trial=plan.cpus_per_trial, gpus_per_trial=plan.gpus_per_trial, function=trainable,
                        replay=replay, teacher_metrics=plan.teacher_metrics, eval_epochs=eval_epochs(space))
    if plan.tracking:
        run.recorder = _recorder(plan, trials)
    if plan.resume:
        # The searcher, scheduler and recorder come back from Ray's tuner.pkl: they reopen
        # the journal, reload the rung records and find their MLflow runs by themselves.
        tuner = tune.Tuner.restore(plan.ray_path, trainable=fn, resume_unfinished=True, resume_errored=True)
        # finish() on the restored instance itself, so that writes it could not record
        # (a store that is down) are retried at the end rather than dropped with it
        run.recorder = restored_recorder(tuner, run.recorder)
        _replace_status_table(tuner, table)
        return tuner
    searcher = OptunaSearcher(space, journal_path=str(paths.journal), study_name=name,
                              cost_fn=EfficiencyCost() if space.constraints else None)
    scheduler = asha_for(space, paths.scheduler_state)
    return tune.Tuner(
        fn,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                                    max_concurrent_trials=plan.max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(
            name=plan.ray_name, storage_path=plan.ray_storage,
            failure_config=tune.FailureConfig(max_failures=2),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*([run.recorder] if run.recorder is not None else []),
                       *([table] if table is not None else []), *callbacks],
            verbose=0,
        ),
    )


def _new_record(plan: SearchPlan) -> dict[str, Any]:
    """A new search's record (``search.json``): what it searches and where its parts are."""
    space, paths = plan.space, plan.paths
    return {
        "name": plan.name,
        "created": time.time(),
        "space_file": space.source,
        "objectives": space.objective_records,
        "space": space.to_record(),
        "base_config": to_dict(space.base),
        "search_config": to_dict(space.search_base),
        "num_samples": plan.num_samples,
        "max_concurrent": plan.max_concurrent,
        "storage_path_arg": plan.storage_arg,
        "ray_path": plan.ray_path,
        "journal": str(paths.journal),
        "scheduler_state": str(paths.scheduler_state),
        "study_name": plan.name,
        "tracking_uri": plan.tracking_uri,
        "experiment": plan.experiment,
        "teacher": {"source": plan.teacher_source, "sha256": plan.teacher_sha},
        "teacher_metrics": plan.teacher_metrics,
    }


def _recorder(plan: SearchPlan, trials: TrialConfig):
    """The MLflow recorder (a Ray callback): the parent run of the search, a child run per trial."""
    from granq_search.search.trainable import threads_for_cpus
    from granq_search.tracking import SearchRecorder
    from granq_search.tracking.schema import TAG

    space = plan.space
    return SearchRecorder(
        tracking_uri=plan.tracking_uri, experiment_name=plan.experiment, search_name=plan.name,
        searched=list(space.parameters),
        parent_tags={
            TAG.SPACE: space.source,
            TAG.PINNED: json.dumps(dict(space.pinned), default=str),
            # what export rebuilds; made (and its size checked) by plan.validate
            TAG.SPACE_RECORD: plan.space_text if plan.space_text is not None else space_record_text(space),
            TAG.SEARCH_DIR: str(plan.paths.root),
            "granq.ray_path": plan.ray_path,
            TAG.TRIAL_THREADS: str(threads_for_cpus(plan.cpus_per_trial)),
        },
        objectives=space.objective_records,
        trial_config=trials,
        finish_wait_s=FINISH_WAIT_S,
    )


def _close(plan: SearchPlan, run: SearchRun) -> None:
    """The end of a launch, also of one that raised. A launch that made the search's folder but
    never started the fit leaves nothing behind (the folder removed, Ray shut down when this
    launch started it). Otherwise, after a fit (or a failed launch of a search that existed
    before): no Optuna trial left RUNNING, Ray shut down when this launch started it, the
    record's status, the recorder's parent run closed."""
    import ray

    from granq_search.search.resume import close_running_trials

    if run.made_root and not run.fit_started:  # nothing worth keeping was written
        shutil.rmtree(plan.paths.root, ignore_errors=True)
        if run.started_ray:
            ray.shutdown()
        return
    closed = close_running_trials(str(plan.paths.journal), plan.name)
    if closed and run.status != "interrupted":
        run.notes.append(f"{closed} Optuna trial(s) were still RUNNING at the end and were told FAIL")
    if run.started_ray and ray.is_initialized():
        ray.shutdown()
    if plan.paths.record.is_file():
        run.record.update(status=run.status, updated=time.time())
        write_record(plan.paths.record, run.record)
    if run.recorder is not None and run.fit_started:
        # also when fit() raised; the recorder's own error must not hide the first one
        try:
            run.recorder.finish("FINISHED" if run.status != "interrupted" else "KILLED")
        except GranqError as e:
            run.notes.append(str(e))


# --------------------------------------------------------------------------- Ray


def _connect(address: str | None, progress: bool, *, dashboard: bool = False,
             code_paths: Sequence[str] = ()) -> tuple[bool, str | None]:
    """Start Ray locally (``address`` None) or connect to a cluster, unless Ray is already up.
    Returns (True when this call started or connected Ray, and so must shut it down; the
    dashboard's URL or None) and says on stderr where the dashboard is, or why it is off.

    Ray's INFO logs (driver and trial processes: one line per checkpoint) stay off; warnings and
    errors are shown, the trials' own output only with ``progress``.

    ``code_paths``: folders a local Ray's workers need on ``PYTHONPATH`` (the modules of the
    config's import paths; Ray itself adds only the driver's working directory). A cluster gets
    code with the job (``ray job submit --working-dir``, ``runtime_env``), not from here."""
    import ray

    if ray.is_initialized():
        return False, None
    init: dict[str, Any] = {"log_to_driver": bool(progress), "configure_logging": True,
                            "logging_level": "WARNING",
                            "runtime_env": {"env_vars": {
                                "RAY_CHDIR_TO_TRIAL_DIR": "0",
                                # the trial processes' Ray logger at WARNING too (Ray logs one INFO
                                # line per checkpoint)
                                "RAY_LOGGER_LEVEL": os.environ.get("RAY_LOGGER_LEVEL", "warning")}}}
    if address is None:
        init["include_dashboard"] = bool(dashboard)
        if code_paths:
            from granq_search.user_code import worker_pythonpath

            init["runtime_env"]["env_vars"]["PYTHONPATH"] = worker_pythonpath(code_paths)
    else:
        init["address"] = address
    try:
        context = ray.init(**init)
    except Exception as e:  # noqa: BLE001 - one line for the user
        from granq_search.tracking.uri import redact_text, redact_uri

        first = redact_text(" ".join(str(e).split()))[:300]
        where = "start Ray locally" if address is None else f"connect to the Ray cluster at {redact_uri(address)}"
        hint = "; is it running (`ray status`)?"
        if "auth" in first.lower() or "token" in first.lower():
            hint = ("; the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                    "(`ray get-auth-token` on the head node), see docs/cluster.md")
        raise SearchError(f"cannot {where} ({type(e).__name__}: {first}){hint}") from None
    url = _dashboard_url(context)
    if url:
        line = f"Ray dashboard: {url}"
    elif address is None:
        line = "Ray dashboard: off (pass --dashboard to start it)"
    else:
        line = "Ray dashboard: the cluster reports none (`ray start --head --include-dashboard=true` starts it)"
    print(line, file=sys.stderr, flush=True)
    return True, url


def _dashboard_url(context: Any) -> str | None:
    url = str(getattr(context, "dashboard_url", "") or "").strip()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _status_table(space: SearchSpace, name: str, num_samples: int, interval_s: float):
    from granq_search.search.status import StatusTable

    epochs = None if "train.epochs" in space.parameters else int(space.search_base.train.epochs)
    return StatusTable(name=name, objectives=space.objective_records,
                       params=list(space.parameters), num_samples=num_samples, epochs=epochs, interval_s=interval_s)


def _replace_status_table(tuner: Any, table: Any) -> None:
    """A restored Tuner brings back the status table of the run before (Ray pickles callbacks):
    swap it for this run's (or drop it with ``progress`` off)."""
    from granq_search.search.resume import restored_callbacks
    from granq_search.search.status import StatusTable

    callbacks = restored_callbacks(tuner)
    if callbacks is None:
        return
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, StatusTable)]
    if table is not None:
        callbacks.append(table)


@contextlib.contextmanager
def _env(values: Mapping[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
