"""ASHA whose rung records survive a restart.

Ray saves the searcher on ``Tuner.restore`` but not the scheduler: the restored
``AsyncHyperBandScheduler`` (unpickled from ``tuner.pkl`` as it was *before* the first trial) has
empty rungs, so every resumed trial would pass every rung. :class:`PersistentASHA` writes its rung
records to ``DIR/NAME/scheduler_state.json`` (atomically) whenever they change and loads them
lazily, on the first call after it was built or unpickled (step 5 of ``--resume``,
:mod:`granq_search.search.resume`).

Settings for a search (see :func:`asha_for`): time attribute ``epoch`` (1-based, warm-up
included), metric ``val_top1`` (mode max), ``max_t`` = ``train.epochs`` at search fidelity,
``grace_period`` = warm-up epochs + the space's grace (epochs of student training), one bracket.

Multi-objective rungs (``scheduler.rank_by: pareto``, the default when the objectives include a
cost such as ``bitops``): classic ASHA stops a trial whose validation top-1 falls below the
rung's median, so in a search over bit-widths every cheap configuration is stopped for being
less accurate than expensive ones, and the cheap end of the front is never trained. A Pareto
rung (in the spirit of MO-ASHA, Schmucker et al. 2021) records each trial's point (validation
top-1, costs) instead and lets a trial continue iff it is among the best ``ceil(n / rf)`` of the
``n`` points at the rung, ordered by non-dominated front (NSGA-II sorting), then by crowding
distance within the front (extreme points first). With one cost level it is classic ASHA.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from granq_search.search.space import SearchSpace

__all__ = ["PersistentASHA", "asha_for", "ASHA_METRIC", "ASHA_MODE", "TIME_ATTR", "rung_epochs", "eval_epochs",
           "pareto_order", "pareto_continues"]

TIME_ATTR = "epoch"
ASHA_METRIC = "val_top1"
ASHA_MODE = "max"


Point = tuple[float, ...]


def _dominates(a: Point, b: Point) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_order(points: Mapping[str, Point]) -> list[str]:
    """Keys of ``points`` (every coordinate: higher is better) best first: by non-dominated
    front, then by crowding distance within a front (larger first; a front's extremes are
    infinite), then by the order of ``points`` (earlier first)."""
    keys = list(points)
    rest = set(keys)
    order: list[str] = []
    while rest:
        front = [k for k in keys if k in rest and not any(_dominates(points[o], points[k]) for o in rest if o != k)]
        crowd = {k: 0.0 for k in front}
        for d in range(len(points[front[0]])):
            srt = sorted(front, key=lambda k: points[k][d])
            lo, hi = points[srt[0]][d], points[srt[-1]][d]
            crowd[srt[0]] = crowd[srt[-1]] = math.inf
            if hi > lo:
                for i in range(1, len(srt) - 1):
                    crowd[srt[i]] += (points[srt[i + 1]][d] - points[srt[i - 1]][d]) / (hi - lo)
        order += sorted(front, key=lambda k: -crowd[k])  # stable: ties keep the insertion order
        rest -= set(front)
    return order


def pareto_continues(recorded: Mapping[str, Point], trial_id: str, point: Point, rf: float) -> bool:
    """True when ``point`` is among the best ``ceil(n / rf)`` of the rung's ``n`` points (the
    recorded ones and itself). Like Ray's cutoff (a trial continues unless it is strictly below
    the rung's quantile), the new point ranks before equally good recorded points."""
    everyone = {trial_id: tuple(point), **{k: tuple(v) for k, v in recorded.items() if k != trial_id}}
    keep = max(1, math.ceil(len(everyone) / rf))
    return trial_id in pareto_order(everyone)[:keep]


class PersistentASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` that keeps its rung records in ``state_path``; with ``costs``
    (``[(metric, mode), ...]``) its rungs rank trials by Pareto order of (metric, costs)."""

    def __init__(self, state_path: str | os.PathLike, costs: Sequence[Sequence[str]] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.costs = [(str(m), str(mode)) for m, mode in costs]
        self.state_path = str(state_path)
        self._loaded = False
        self._written: str | None = None

    # ----------------------------------------------------------------- persistence

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._loaded = False  # read the file on first use: Tuner.restore unpickles a stale copy

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "costs": [list(c) for c in getattr(self, "costs", [])],
            "time_attr": self._time_attr,
            "metric": self._metric,
            "mode": self._mode,
            "max_t": self._max_t,
            "num_stopped": self._num_stopped,
            "brackets": [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in self._brackets],
        }

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = Path(self.state_path)
        if not path.is_file():
            return
        data = json.loads(path.read_text(encoding="utf-8"))
        brackets = data.get("brackets", [])
        if len(brackets) != len(self._brackets):
            raise ValueError(f"{path} holds {len(brackets)} ASHA brackets, the scheduler has {len(self._brackets)}")
        for bracket, rungs in zip(self._brackets, brackets):
            saved = {float(m): rec for m, rec in rungs}
            bracket._rungs = [(milestone, {str(k): (tuple(float(x) for x in v) if isinstance(v, list) else float(v))
                                           for k, v in saved.get(float(milestone), {}).items()})
                              for milestone, _ in bracket._rungs]
        self._num_stopped = int(data.get("num_stopped", 0))
        self._written = json.dumps(self.state_dict(), sort_keys=True)

    def _persist(self) -> None:
        text = json.dumps(self.state_dict(), sort_keys=True)
        if text == self._written:
            return
        path = Path(self.state_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        self._written = text

    # ----------------------------------------------------------------- scheduler hooks

    def on_trial_add(self, tune_controller, trial) -> None:
        self._ensure_loaded()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._ensure_loaded()
        if trial.trial_id not in self._trial_info:  # e.g. a result racing a restore
            super().on_trial_add(tune_controller, trial)
        if getattr(self, "costs", None):
            decision = self._pareto_result(trial, result)
        else:
            decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def _point(self, result: Mapping[str, Any]) -> Point | None:
        """(metric, costs) oriented so that higher is better; None when any is missing."""
        keys = [(self._metric, "max" if self._metric_op > 0 else "min"), *self.costs]
        values = []
        for key, mode in keys:
            v = result.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                return None
            values.append(float(v) if mode == "max" else -float(v))
        return tuple(values)

    def _pareto_result(self, trial, result: Mapping[str, Any], decide: bool = True) -> str:
        """Ray's rung walk (see ``_Bracket.on_result``) with a Pareto cutoff; ``decide=False``
        only records the point (a trial that completed)."""
        point = self._point(result) if self._time_attr in result else None
        if point is None:
            return TrialScheduler.CONTINUE
        cur_iter = result[self._time_attr]
        if decide and cur_iter >= self._max_t and self._stop_last_trials:
            self._num_stopped += 1
            return TrialScheduler.STOP
        bracket = self._trial_info[trial.trial_id]
        action = TrialScheduler.CONTINUE
        for milestone, recorded in bracket._rungs:
            if cur_iter < milestone or trial.trial_id in recorded:
                continue
            if decide and recorded and not pareto_continues(recorded, trial.trial_id, point, bracket.rf):
                action = TrialScheduler.STOP
            recorded[trial.trial_id] = point
            break
        if action == TrialScheduler.STOP:
            self._num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._ensure_loaded()
        if trial.trial_id in self._trial_info:
            if getattr(self, "costs", None):
                self._pareto_result(trial, result, decide=False)
            else:
                super().on_trial_complete(tune_controller, trial, result)
            self._trial_info.pop(trial.trial_id, None)
        self._persist()

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._ensure_loaded()
        self._trial_info.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._ensure_loaded()
        self._trial_info.pop(trial.trial_id, None)

    def save(self, checkpoint_path: str) -> None:
        self._persist()
        super().save(checkpoint_path)


def asha_for(space: SearchSpace, state_path: str | os.PathLike) -> PersistentASHA | None:
    """The scheduler a space asks for (None for ``scheduler: {type: none}``)."""
    if space.scheduler.type != "asha":
        return None
    return PersistentASHA(
        state_path,
        costs=space.scheduler.costs,
        time_attr=TIME_ATTR,
        metric=ASHA_METRIC,
        mode=ASHA_MODE,
        max_t=space.asha_max_t,
        grace_period=space.asha_grace_period,
        reduction_factor=space.scheduler.reduction_factor,
        brackets=1,
    )


def rung_epochs(space: SearchSpace) -> list[int]:
    """The epochs (1-based) at which ASHA decides, as Ray's one-bracket ASHA places its rungs:
    ``grace * rf**k`` below or at ``max_t``. Empty without ASHA."""
    if space.scheduler.type != "asha":
        return []
    grace, rf, max_t = space.asha_grace_period, space.scheduler.reduction_factor, space.asha_max_t
    rungs = []
    k = 0
    while grace * rf ** k <= max_t:
        rungs.append(int(grace * rf ** k))
        k += 1
    return rungs


def eval_epochs(space: SearchSpace) -> list[int] | None:
    """The epochs a trial validates after: ASHA's rungs and the last epoch (ASHA reads the
    metric nowhere else, and the last epoch ranks the trial). None without ASHA (every epoch,
    which also lets the best-validation epoch be chosen from all of them)."""
    rungs = rung_epochs(space)
    if not rungs:
        return None
    return sorted(set(rungs) | {space.asha_max_t})
