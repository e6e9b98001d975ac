"""The search driver: :func:`run_search` validates, plans, launches and finalises a search.

Order of work in :func:`run_search`, one module a step:

1. validate (:func:`~granq_search.search.plan.validate`): every check a user can fail (space file,
   overrides, numbers, name collision or missing search to resume, tracking URI) and the checks of
   :mod:`~granq_search.search.preflight` (the cluster at ``address`` answers, ``--storage-path``
   and ``--output-dir`` take files: seconds, not minutes of Ray retries);
2. plan (:func:`~granq_search.search.plan.plan_teacher`): the teacher and, locally, its measures
   (which check the data), completing the frozen :class:`~granq_search.search.plan.SearchPlan`.
   Nothing is created and Ray is not started before these two steps have passed;
3. launch (:func:`~granq_search.search.launch.launch`): Ray, the folder and record, the Tuner
   (new or restored), the fit; Ray settings, trial settings (../shared/SEARCH.md) and what is
   closed at the end, even of an interrupted search, are described there;
4. finalise (:func:`~granq_search.search.outcome.finalise`): the outcome, the leaderboard, the
   best configuration exported to ``best.yaml``, the importances, the record's ``outcome``.

The folder layout (``DIR/NAME/search.json``, ``ray/``, ``optuna.journal``, ...) and the record's reading
and writing are in :mod:`~granq_search.search.layout`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from granq_search.search.launch import launch
from granq_search.search.layout import (
    SearchError,
    SearchPaths,
    default_space_dir,
    latest_search,
    read_search_record,
    resolve_space_arg,
)
from granq_search.search.outcome import SearchOutcome, finalise
from granq_search.search.plan import plan_teacher, validate
from granq_search.search.space import SearchSpace, TrialConfig

__all__ = ["run_search", "SearchOutcome", "SearchPaths", "latest_search", "read_search_record",
           "default_space_dir", "resolve_space_arg", "SearchError"]


def run_search(
    space: str | Path | SearchSpace | None = None,
    *,
    name: str | None = None,
    output_dir: str | Path = "runs/search",
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    resume: bool = False,
    set_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    trainable: Callable[..., Any] | None = None,
    callbacks: Sequence[Any] = (),
    leaderboard_top: int = 5,
    tracking: bool = True,
    dashboard: bool = False,
    status_interval_s: float = 15.0,
) -> SearchOutcome:
    """Run (or with ``resume`` continue) a search; see the module docstring.

    ``num_samples`` (default 8) and ``max_concurrent`` (default 2) are fixed when a search
    starts; a resumed search keeps them (giving other values is an error). ``trainable``
    replaces :func:`~granq_search.search.trainable.train_trial` (same keyword parameters) and
    ``callbacks`` are extra Ray callbacks: both for embedding and tests. ``tracking=False``
    records nothing in MLflow (tests of the search machinery only).

    ``progress``: the live status table (:mod:`granq_search.search.status`, on stderr, at most
    every ``status_interval_s`` seconds) in place of Ray's own output, which is always off (Ray's
    warnings and errors stay visible). ``dashboard``: start Ray's dashboard with a local Ray
    (needs ``ray[default]``); a line on stderr names its address, or says it is off.
    """
    t0 = time.time()
    plan = plan_teacher(validate(
        space, name=name, output_dir=output_dir, num_samples=num_samples, max_concurrent=max_concurrent,
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, address=address, storage_path=storage_path,
        tracking_uri=tracking_uri, experiment=experiment, resume=resume, set_overrides=set_overrides,
        progress=progress, tracking=tracking, dashboard=dashboard, status_interval_s=status_interval_s,
    ))
    run = launch(plan, trainable=trainable, callbacks=callbacks)
    return finalise(plan, run, started=t0, leaderboard_top=leaderboard_top)


_TrialConfig = TrialConfig  # the recorder's builder in the tuner.pkl of a search started before it moved

