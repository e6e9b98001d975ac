"""ASHA whose rung records survive a restart.

Ray saves the searcher on ``Tuner.restore`` but not the scheduler: the restored
``AsyncHyperBandScheduler`` (unpickled from ``tuner.pkl`` as it was *before* the first trial) has
empty rungs, so every resumed trial would pass every rung. :class:`PersistentASHA` writes its rung
records to ``DIR/NAME/scheduler_state.json`` (atomically) whenever they change and loads them
lazily, on the first call after it was built or unpickled.

Settings for a search (see :func:`asha_for`): time attribute ``epoch`` (1-based, warm-up
included), metric ``val_top1`` (mode max), ``max_t`` = ``train.epochs`` at search fidelity,
``grace_period`` = warm-up epochs + the space's grace (epochs of student training), one bracket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler

from granq_search.search.space import SearchSpace

__all__ = ["PersistentASHA", "asha_for", "ASHA_METRIC", "ASHA_MODE", "TIME_ATTR", "rung_epochs", "eval_epochs"]

TIME_ATTR = "epoch"
ASHA_METRIC = "val_top1"
ASHA_MODE = "max"


class PersistentASHA(AsyncHyperBandScheduler):
    """``AsyncHyperBandScheduler`` that keeps its rung records in ``state_path``."""

    def __init__(self, state_path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(**kwargs)
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
            bracket._rungs = [(milestone, {str(k): float(v) for k, v in saved.get(float(milestone), {}).items()})
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
        decision = super().on_trial_result(tune_controller, trial, result)
        self._persist()
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._ensure_loaded()
        if trial.trial_id in self._trial_info:
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
