"""The search's Optuna study: its journal storage, its seeded sampler, opening it.

The study lives in ``DIR/NAME/optuna.journal``
(``JournalStorage(JournalFileBackend(...))``; the driver is its only writer). It is made once,
with the space's ``directions``, metric names (``study.metric_names``: the objectives' metrics,
which optuna-dashboard and Optuna's plots show) and ``initial_points``; every later opening
(the searcher's, ``--resume``'s, the driver's summary) checks the directions and reseeds the
sampler (:func:`open_study`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from granq_search.errors import SearchSpaceError

if TYPE_CHECKING:
    from granq_search.search.space import SearchSpace

__all__ = ["open_study", "make_sampler", "journal_storage", "trial_counts", "TRIAL_STATES"]

TRIAL_STATES = ("complete", "pruned", "fail", "running", "waiting")
"""The Optuna trial states :func:`trial_counts` counts, in its order."""


def make_sampler(space: SearchSpace, seed_offset: int = 0):
    """The explicit, seeded sampler of ``space.sampler``."""
    import optuna

    seed = space.sampler.seed + seed_offset
    if space.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.n_startup_trials)


def journal_storage(journal_path: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal_path)))


def trial_counts(study) -> dict[str, int]:
    """The study's trials by state (:data:`TRIAL_STATES`), and ``duplicates``: the trials that
    are duplicate proposals (``duplicate_of``)."""
    from optuna.trial import TrialState

    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "fail",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    trials = study.get_trials(deepcopy=False)
    counts = dict.fromkeys(TRIAL_STATES, 0)
    for t in trials:
        counts[names[t.state]] += 1
    counts["duplicates"] = sum(1 for t in trials if "duplicate_of" in t.user_attrs)
    return counts


def _name_metrics(study, space: SearchSpace) -> None:
    """``study.metric_names`` = the space's objective metrics (written only when they differ, so a
    reopened study adds nothing to the journal; a study made by an older version gets them)."""
    import optuna

    names = list(space.metrics)
    if study.metric_names == names:
        return
    with warnings.catch_warnings():  # set_metric_names is marked experimental (Optuna 3.2 - 5)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)


def open_study(space: SearchSpace, journal_path: str, study_name: str, *, create: bool = False):
    """Open (or with ``create`` make) the study; return ``(study, storage)``.

    Checks that the study's directions match the space; names its objectives (``metric_names``).

    A new study gets the space's ``initial_points`` enqueued. The sampler is seeded with
    ``seed + len(trials)`` so a reopened study continues rather than repeats its proposals.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = journal_storage(journal_path)
    existing = [s.study_name for s in storage.get_all_studies()]
    if study_name not in existing:
        if not create:
            raise SearchSpaceError(f"no Optuna study '{study_name}' in '{journal_path}'")
        study = optuna.create_study(storage=storage, study_name=study_name, directions=space.directions,
                                    sampler=make_sampler(space))
        _name_metrics(study, space)
        for point in space.initial_points:
            study.enqueue_trial(dict(point), user_attrs={"initial_point": True})
        return study, storage
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=make_sampler(space))
    have = [d.name.lower() for d in study.directions]
    if have != list(space.directions):
        raise SearchSpaceError(f"the Optuna study '{study_name}' in '{journal_path}' optimises {have}, "
                               f"but the space asks for {space.directions}")
    _name_metrics(study, space)
    n = len(study.get_trials(deepcopy=False))
    if n:
        study.sampler = make_sampler(space, seed_offset=n)
    return study, storage
