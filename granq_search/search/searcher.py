"""Our Ray Tune searcher: an Optuna study driven by ask/tell (not the stock ``OptunaSearch``).

Why not the stock integration (see ../shared/SEARCH.md): it turns multi-objective studies into
single-objective ones next to ``TuneConfig(metric=...)``, enters early-stopped trials as
COMPLETE (on the Pareto front with under-trained metrics), leaves NaN trials RUNNING forever
and pays twice for duplicate proposals. This searcher:

* owns the study (:mod:`granq_search.search.study`): explicit seeded sampler, ``directions`` and
  metric names from the space's objectives, storage ``DIR/NAME/optuna.journal`` (the driver is
  its only writer), the space's ``initial_points`` enqueued once when the study is created;
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
  the journal. On restore it reconciles that mapping with the journal: Optuna trials asked after
  Ray's last experiment snapshot (a killed driver) are *adopted* by the next new Ray trials, with
  their parameters and Optuna trial unchanged (:class:`~granq_search.search.resume.OrphanAdoption`;
  the whole ``--resume`` protocol is :mod:`granq_search.search.resume`). A Ray trial that
  finishes after its Optuna trial was closed (interrupted search resumed, errored trial retried)
  is recorded as a new Optuna trial with ``resumed_from``.

The objects pickle without the study (Ray pickles the searcher into ``tuner.pkl``); the study is
reopened lazily from the journal, its sampler reseeded
(:func:`~granq_search.search.study.open_study`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from ray.tune.search import Searcher

from granq_search.errors import ConfigError
from granq_search.search.report import own_metrics
from granq_search.search.resume import OrphanAdoption, error_state
from granq_search.search.space import SearchSpace
from granq_search.search.study import open_study

__all__ = ["OptunaSearcher", "params_key"]

log = logging.getLogger(__name__)


def _norm(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.12g}")
    return v


def params_key(params: Mapping[str, Any]) -> tuple:
    """Identity of a parameter set (floats compared to 12 significant digits)."""
    return tuple(sorted((k, type(v).__name__ if isinstance(v, bool) else "", _norm(v)) for k, v in params.items()))


class OptunaSearcher(OrphanAdoption, Searcher):
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
        """Ray's snapshot of the map, then :meth:`reconcile` with the journal (``--resume``, step 4
        of :mod:`granq_search.search.resume`)."""
        with open(checkpoint_path, encoding="utf-8") as fh:
            self.set_state(json.load(fh))
        self.reconcile()
