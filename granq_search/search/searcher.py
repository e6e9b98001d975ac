"""Our Ray Tune searcher: an Optuna study driven by ask/tell (not the stock ``OptunaSearch``).

Why not the stock integration (see ../shared/SEARCH.md): it turns multi-objective studies into
single-objective ones next to ``TuneConfig(metric=...)``, enters early-stopped trials as
COMPLETE (on the Pareto front with under-trained metrics), leaves NaN trials RUNNING forever
and pays twice for duplicate proposals. This searcher:

* owns the study: explicit seeded sampler, ``directions`` and metric names
  (``study.metric_names``: the objectives' metrics, which optuna-dashboard and Optuna's plots
  show) from the space's objectives, storage
  ``JournalStorage(JournalFileBackend(DIR/NAME/optuna.journal))`` (the driver is its only
  writer), the space's ``initial_points`` enqueued once when the study is created;
* tells every trial exactly once: a Ray error -> FAIL; a result without ``final == 1`` (stopped by
  ASHA) -> PRUNED; ``failure_reason`` in the result (the trainable caught divergence, OOM, an invalid
  config) -> FAIL with the reason; a missing, NaN or infinite objective -> FAIL; otherwise
  COMPLETE with the objective values in the space's order;
* checks a proposal before any compute is spent: an invalid combination -> FAIL (``failure_reason``
  user attr), over a ``constraints`` budget -> constraint values set and PRUNED (TPE learns the
  infeasible region; ``study.best_trials`` only holds feasible COMPLETE trials), then asks again;
* never trains the same parameters twice. A proposal identical to a finished trial (COMPLETE,
  PRUNED, or FAIL for a reason of the trial's own) is told that trial's outcome
  (``duplicate_of`` user attr) and the sampler is asked again. A proposal identical to a
  trial that is still running is *deferred*: it stays RUNNING and waits for the original, is
  told the original's outcome when that finishes, and the sampler is asked again for this Ray
  trial. After three proposals in a row that are not worth training, a seeded random sampler
  proposes instead (TPE concentrates on what it knows; in a small space it then proposes only
  duplicates); after ``max_retries`` of them ``suggest`` returns ``Searcher.FINISHED`` (the space
  is exhausted);
* limits concurrency itself (``set_max_concurrency`` returns True, so Ray's
  ``ConcurrencyLimiter`` passes everything through; the limiter would otherwise drop the results
  of errored trials that ``--resume`` restarts);
* saves only the Ray-trial <-> Optuna-number mapping (``save``/``restore``); the study lives in
  the journal. On restore it reconciles: an Optuna trial still RUNNING that no restored Ray trial
  will finish was asked after Ray's last experiment snapshot (a killed driver; Ray does not know
  its Ray trial). It is *adopted*: the next Ray trial Ray asks for gets exactly its parameters and
  the same Optuna trial (``ray_trial_id`` updated, the old id kept in ``lost_ray_trial_ids``),
  so the study keeps one trial per configuration and the search still reaches ``num_samples``
  Ray trials. A Ray trial that finishes after its Optuna trial was closed (interrupted search
  resumed, errored trial retried) is recorded as a new Optuna trial with ``resumed_from``.

The objects pickle without the study (Ray pickles the searcher into ``tuner.pkl``); the study is
reopened lazily from the journal, with the sampler reseeded by ``seed + number of trials`` so
that a resumed search does not replay the proposals it already made.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune.search import Searcher

from granq_search.errors import ConfigError, SearchSpaceError
from granq_search.search.report import own_metrics
from granq_search.search.space import SearchSpace

__all__ = ["OptunaSearcher", "open_study", "close_running_trials", "make_sampler", "params_key",
           "replayable_results", "error_state", "LOST_REASON", "INTERRUPTED_REASON"]

log = logging.getLogger(__name__)

LOST_REASON = "lost when the driver stopped"
INTERRUPTED_REASON = "the search stopped before this trial finished (rerun with --resume to continue it)"


def make_sampler(space: SearchSpace, seed_offset: int = 0):
    """The explicit, seeded sampler of ``space.sampler``."""
    import optuna

    seed = space.sampler.seed + seed_offset
    if space.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=space.sampler.n_startup_trials)


def _storage(journal_path: str):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(journal_path)))


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
    storage = _storage(journal_path)
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


def close_running_trials(journal_path: str, study_name: str, reason: str = INTERRUPTED_REASON) -> int:
    """Tell FAIL to every Optuna trial still RUNNING (the end of every search); return how many."""
    import optuna
    from optuna.trial import TrialState

    if not os.path.isfile(journal_path):
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(journal_path)
    if study_name not in [s.study_name for s in storage.get_all_studies()]:
        return 0
    study = optuna.load_study(study_name=study_name, storage=storage)
    study_id = storage.get_study_id_from_name(study_name)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, t.number),
                                    "failure_reason", reason)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(running)


def error_state(state, reason: str | None) -> bool:
    """A FAIL that another try may cure (a Ray error, lost, interrupted), as opposed to one of
    the trial's own (divergence, out of memory, NaN objective, invalid config)."""
    from optuna.trial import TrialState

    return state == TrialState.FAIL and (not reason or reason in (LOST_REASON, INTERRUPTED_REASON)
                                         or str(reason).startswith("the trial raised an error"))


def replayable_results(space: SearchSpace, journal_path: str, study_name: str) -> dict[str, dict[str, Any]]:
    """``{Ray trial id: last result}`` of every trial the study holds as ended for good (COMPLETE,
    PRUNED, or FAIL for a reason of its own). A resumed search hands them to the trainable: a
    trial Ray restarts only because its last snapshot predates the trial's end is replayed, not
    trained again (:func:`granq_search.search.trainable.replay_finished`)."""
    from optuna.trial import TrialState

    if not os.path.isfile(journal_path):
        return {}
    study, _ = open_study(space, journal_path, study_name)
    out: dict[str, dict[str, Any]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        rid, last = t.user_attrs.get("ray_trial_id"), t.user_attrs.get("last_result")
        if rid and isinstance(last, dict) and not error_state(t.state, t.user_attrs.get("failure_reason")):
            out[str(rid)] = dict(last)
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.12g}")
    return v


def params_key(params: Mapping[str, Any]) -> tuple:
    """Identity of a parameter set (floats compared to 12 significant digits)."""
    return tuple(sorted((k, type(v).__name__ if isinstance(v, bool) else "", _norm(v)) for k, v in params.items()))


class OptunaSearcher(Searcher):
    """Ray Tune searcher over an Optuna study (see the module docstring).

    Args:
        space: the validated search space (distributions, objectives, constraints).
        journal_path: ``DIR/NAME/optuna.journal``.
        study_name: the Optuna study name (the search name).
        cost_fn: ``cfg -> {metric: value}`` for the space's constraints, computed from the
            config before a trial trains (picklable; see :class:`granq_search.search.costs.EfficiencyCost`).
        max_retries: proposals in a row not worth training before the search is declared done
            (after the first three of them, proposals come from a seeded random sampler).
    """

    def __init__(self, space: SearchSpace, *, journal_path: str, study_name: str,
                 cost_fn: Callable[[Any], Mapping[str, float]] | None = None, max_retries: int = 64) -> None:
        super().__init__(metric=None, mode=None)  # multi-objective lives here, never on TuneConfig
        if space.constraints and cost_fn is None:
            raise ValueError("a space with constraints needs cost_fn")
        self.space = space
        self.journal_path = str(journal_path)
        self.study_name = study_name
        self.cost_fn = cost_fn
        self.max_retries = int(max_retries)
        self.fallback_after = 3
        self.max_concurrent = 0
        self._live: dict[str, int] = {}      # Ray trial id -> Optuna number, asked and not yet told
        self._done: dict[str, int] = {}      # Ray trial id -> Optuna number, told
        self._twins: dict[int, list[int]] = {}  # running original -> deferred duplicates
        self._orphans: list[int] = []         # RUNNING trials no restored Ray trial knows (adopted first)
        self._study = None
        self._storage = None
        self.events: dict[str, int] = {"duplicates": 0, "deferred": 0, "invalid": 0, "infeasible": 0,
                                       "adopted": 0}

    # ----------------------------------------------------------------- pickling

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = state["_storage"] = None  # locks and file handles; reopened from the journal
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def study(self):
        if self._study is None:
            self._study, self._storage = open_study(self.space, self.journal_path, self.study_name, create=True)
        return self._study

    # ----------------------------------------------------------------- Ray hooks

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if metric or mode:
            raise ValueError("OptunaSearcher takes its objectives from the search space; leave "
                             "TuneConfig.metric/mode unset")
        if config:
            raise ValueError("OptunaSearcher takes its parameters from the search space; leave "
                             "Tuner(param_space=...) empty")
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.max_concurrent and len(self._live) >= self.max_concurrent:
            return None
        study = self.study
        from optuna.trial import TrialState

        adopted = self._adopt(trial_id)
        if adopted is not None:
            return adopted
        dists = self.space.distributions()
        for attempt in range(self.max_retries):
            trial = self._ask(study, dists, attempt)
            params = dict(trial.params)
            key = params_key(params)
            original = self._finished_twin(key, trial.number)
            if original is not None:
                self.events["duplicates"] += 1
                self._copy_outcome(trial.number, original)
                continue
            running = self._running_twin(key, trial.number)
            if running is not None:
                self.events["deferred"] += 1
                trial.set_user_attr("duplicate_of", running)
                self._twins.setdefault(running, []).append(trial.number)
                continue
            try:
                cfg = self.space.trial_config(params)
            except ConfigError as e:
                self.events["invalid"] += 1
                trial.set_user_attr("failure_reason", f"invalid config: {e}")
                study.tell(trial, state=TrialState.FAIL)
                continue
            if self.space.constraints:
                costs = dict(self.cost_fn(cfg))
                over = []
                for metric, limit in self.space.constraints.items():
                    value = float(costs[metric])
                    trial.set_user_attr(metric, value)
                    trial.set_constraint(metric, value / limit - 1.0)
                    if value > limit:
                        over.append(f"{metric} {value:.4g} > {limit:.4g}")
                if over:
                    self.events["infeasible"] += 1
                    trial.set_user_attr("infeasible", "; ".join(over))
                    study.tell(trial, state=TrialState.PRUNED)
                    continue
            trial.set_user_attr("ray_trial_id", trial_id)
            self._live[trial_id] = trial.number
            return params
        log.warning("the sampler proposed %d configurations in a row that are already known, deferred, "
                    "invalid or over budget; ending the search (the space looks exhausted)", self.max_retries)
        study.set_user_attr("exhausted", True)
        return Searcher.FINISHED

    def _adopt(self, trial_id: str) -> dict[str, Any] | None:
        """Hand the next orphan (see :meth:`reconcile`) to the new Ray trial ``trial_id``: its
        parameters, unchanged, and its Optuna trial. None when there is none to adopt."""
        from optuna.trial import TrialState

        dists = self.space.distributions()
        while self._orphans:
            number = self._orphans.pop(0)
            frozen = self._frozen(number)
            if frozen.state != TrialState.RUNNING:
                continue
            if set(frozen.params) != set(dists):  # asked but never given its parameters
                self._set_attr(number, "failure_reason", LOST_REASON)
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            old = frozen.user_attrs.get("ray_trial_id")
            if old:
                lost = [str(x) for x in frozen.user_attrs.get("lost_ray_trial_ids", [])]
                self._set_attr(number, "lost_ray_trial_ids", [*lost, str(old)])
            self._set_attr(number, "ray_trial_id", trial_id)
            self._live[trial_id] = number
            self.events["adopted"] = self.events.get("adopted", 0) + 1
            log.info("Optuna trial %d (Ray trial %s, started after Ray's last snapshot before the driver "
                     "stopped) continues as Ray trial %s with the same parameters", number, old, trial_id)
            return dict(frozen.params)
        return None

    def _ask(self, study, dists, attempt: int):
        """The space's sampler first; after ``fallback_after`` unusable proposals in a row a seeded
        random sampler (TPE concentrates on what it knows, and a small space then yields only
        duplicates)."""
        if attempt < self.fallback_after:
            return study.ask(dists)
        import optuna

        own = study.sampler
        study.sampler = optuna.samplers.RandomSampler(seed=self.space.sampler.seed + 7919 * (attempt + 1)
                                                      + len(study.get_trials(deepcopy=False)))
        try:
            return study.ask(dists)
        finally:
            study.sampler = own

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # intermediate results are ASHA's business; Optuna has no multi-objective pruner

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self._live.pop(trial_id, None)
        if number is None:
            number = self._done.get(trial_id)
            if number is None:
                log.warning("result for unknown trial %s ignored", trial_id)
                return
        state, values, reason = self.outcome(result, error)
        self._done[trial_id] = self._record(number, state, values, reason, trial_id, result)
        for twin in self._twins.pop(number, []):
            self._copy_outcome(twin, self._done[trial_id])

    # ----------------------------------------------------------------- outcome logic

    def outcome(self, result: Mapping[str, Any] | None, error: bool) -> tuple[Any, list[float] | None, str | None]:
        """(Optuna state, objective values or None, failure reason or None) of a finished trial."""
        from optuna.trial import TrialState

        if error:
            return TrialState.FAIL, None, "the trial raised an error (see error.txt in its Ray trial folder)"
        if not result or result.get("final") != 1:
            return TrialState.PRUNED, None, None
        if result.get("failure_reason"):
            return TrialState.FAIL, None, str(result["failure_reason"])
        values = []
        for metric in self.space.metrics:
            v = result.get(metric)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                return TrialState.FAIL, None, f"objective {metric} is {v!r}"
            values.append(float(v))
        return TrialState.COMPLETE, values, None

    def _trial_id(self, number: int) -> int:
        self.study  # noqa: B018 - opens the study (and its storage) when needed
        storage = self._storage
        return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.study_name),
                                                                number)

    def _frozen(self, number: int):
        return self._storage.get_trial(self._trial_id(number))

    def _set_attr(self, number: int, key: str, value: Any) -> None:
        self._storage.set_trial_user_attr(self._trial_id(number), key, value)

    def _record(self, number: int, state, values, reason, trial_id: str, result) -> int:
        """Tell ``number`` its outcome; a closed trial gets a new record. Returns the number."""
        from optuna.trial import TrialState, create_trial

        study = self.study
        frozen = self._frozen(number)
        if frozen.state == TrialState.RUNNING:
            if reason:
                self._set_attr(number, "failure_reason", reason)
            if result and result.get("epoch") is not None:
                self._set_attr(number, "epochs_run", result.get("epoch"))
            if result and not error_state(state, reason):
                # kept so that a resumed search can replay it rather than train the trial again
                self._set_attr(number, "last_result", own_metrics(result))
            study.tell(number, values=values, state=state)
            return number
        if frozen.state in (TrialState.COMPLETE, TrialState.PRUNED) or state == TrialState.FAIL:
            # already recorded (a replayed trial reports its recorded outcome again); a retry that
            # failed again adds nothing
            return number
        attrs = {"ray_trial_id": trial_id, "resumed_from": number}
        new = create_trial(state=state, values=values, params=frozen.params, distributions=frozen.distributions,
                           user_attrs=attrs, constraints=frozen.constraints or None)
        study.add_trial(new)
        return study.get_trials(deepcopy=False)[-1].number

    def _finished_twin(self, key: tuple, exclude: int) -> int | None:
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.FAIL)):
            if t.number == exclude or params_key(t.params) != key:
                continue
            if t.state == TrialState.FAIL and not self._own_failure(t):
                continue  # lost, interrupted or a Ray error: worth another try
            return t.number
        return None

    @staticmethod
    def _own_failure(t) -> bool:
        reason = t.user_attrs.get("failure_reason")
        return bool(reason) and not error_state(t.state, reason)

    def _running_twin(self, key: tuple, exclude: int) -> int | None:
        live = set(self._live.values())
        for t in self.study.get_trials(deepcopy=False):
            if t.number != exclude and t.number in live and params_key(t.params) == key:
                return t.number
        return None

    def _copy_outcome(self, number: int, original: int) -> None:
        """Tell ``number`` what ``original`` got (a duplicate is never trained)."""
        from optuna.trial import TrialState

        study = self.study
        src = self._frozen(original)
        self._set_attr(number, "duplicate_of", original)
        if src.constraints:
            from optuna.trial import Trial

            live = Trial(study, self._trial_id(number))
            for k, v in src.constraints.items():
                live.set_constraint(k, v)
        if src.state == TrialState.COMPLETE:
            study.tell(number, values=src.values, skip_if_finished=True)
        elif src.state == TrialState.RUNNING:
            self._twins.setdefault(original, []).append(number)
        else:
            if src.user_attrs.get("failure_reason"):
                self._set_attr(number, "failure_reason", src.user_attrs["failure_reason"])
            study.tell(number, state=src.state, skip_if_finished=True)

    # ----------------------------------------------------------------- save / restore

    def get_state(self) -> dict[str, Any]:
        return {"version": 1, "study_name": self.study_name, "live": dict(self._live), "done": dict(self._done),
                "twins": {str(k): list(v) for k, v in self._twins.items()}, "orphans": list(self._orphans),
                "events": dict(self.events)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._live = {str(k): int(v) for k, v in state.get("live", {}).items()}
        self._done = {str(k): int(v) for k, v in state.get("done", {}).items()}
        self._twins = {int(k): [int(x) for x in v] for k, v in state.get("twins", {}).items()}
        self._orphans = [int(x) for x in state.get("orphans", [])]
        self.events.update(state.get("events", {}))

    def save(self, checkpoint_path: str) -> None:
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.get_state(), fh)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, encoding="utf-8") as fh:
            self.set_state(json.load(fh))
        self.reconcile()

    def reconcile(self) -> list[int]:
        """After a restore: find the Optuna trials still RUNNING that no restored Ray trial will
        finish, and return their numbers (oldest first).

        They were handed to Ray after its last experiment snapshot, so the restored experiment
        does not know them (the driver was killed; the runner keeps the snapshot period at about
        a second). One still being checked (no ``ray_trial_id`` yet) never reached Ray: it is told
        FAIL ('lost when the driver stopped'). Rather than failing the others and asking the
        sampler for replacements (the study would then hold more trials than the search ran),
        they become *orphans*: :meth:`suggest` gives each one, with its parameters unchanged, to
        the next new Ray trial. A deferred duplicate waits for its original, live or orphan, as
        before; one whose original ended is told its outcome.
        """
        from optuna.trial import TrialState

        live = set(self._live.values())
        running = sorted(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)),
                         key=lambda t: t.number)
        running_numbers = {t.number for t in running}
        orphans: list[int] = [n for n in self._orphans if n in running_numbers and n not in live]
        for t in running:
            if t.number in live or t.number in orphans:
                continue  # Ray resumes it from its last checkpoint / adopted later
            original = next((o for o, twins in self._twins.items() if t.number in twins), None)
            if original is None and t.user_attrs.get("duplicate_of") is not None:
                original = int(t.user_attrs["duplicate_of"])  # deferred after the snapshot
            if original is not None:
                if original in running_numbers:  # live, or an orphan adopted later: told when it ends
                    if t.number not in self._twins.setdefault(original, []):
                        self._twins[original].append(t.number)
                else:
                    self._copy_outcome(t.number, original)
                continue
            if not t.user_attrs.get("ray_trial_id"):  # stopped while being checked: never reached Ray
                self._set_attr(t.number, "failure_reason", LOST_REASON)
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            orphans.append(t.number)
        self._orphans = orphans
        self._twins = {o: v for o, v in self._twins.items() if o in live or o in orphans}
        if orphans:
            log.warning("%d Optuna trial(s) (%s) started after Ray's last snapshot before the driver stopped; "
                        "their parameters are proposed again to the next Ray trials", len(orphans),
                        ", ".join(map(str, orphans)))
        return list(orphans)
