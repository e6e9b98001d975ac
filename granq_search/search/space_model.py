"""What a search space is: its parameters, objectives, scheduler and sampler, the validated
:class:`SearchSpace` and :class:`TrialConfig`, the one builder of a trial's config.

:mod:`granq_search.search.space_parse` builds a :class:`SearchSpace` from a search-space file;
:mod:`granq_search.search.space` is the public entry point (the file format is described there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from granq_search.config import ExperimentConfig, to_dict, with_overrides

__all__ = ["SearchSpace", "TrialConfig", "ParamSpec", "Objective", "SchedulerSpec", "SamplerSpec"]


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class Objective:
    metric: str
    mode: str  # "min" | "max"

    @property
    def direction(self) -> str:
        return "minimize" if self.mode == "min" else "maximize"


@dataclass(frozen=True)
class ParamSpec:
    """One searched config field. ``type`` is float, int or categorical."""

    path: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def distribution(self):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "float":
            return FloatDistribution(float(self.low), float(self.high), log=self.log,
                                     step=None if self.step is None else float(self.step))
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log,
                                   step=1 if self.step is None else int(self.step))
        return CategoricalDistribution(list(self.choices))

    def extremes(self) -> list[Any]:
        """Values that must each be accepted by the config: both bounds, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def contains(self, value: Any) -> bool:
        dist = self.distribution()
        if self.type == "categorical":
            return any(value == c and type(value) is type(c) for c in self.choices) or (
                not isinstance(value, bool) and value in self.choices
                and not any(isinstance(c, bool) for c in self.choices))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and not float(value).is_integer():
            return False
        return bool(dist._contains(dist.to_internal_repr(value)))

    def to_record(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        out: dict[str, Any] = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    reduction_factor: float = 2.0
    grace_period: int = 1
    """Epochs of student training (after warm-up) before ASHA may stop a trial."""
    rank_by: str = "val_top1"
    """How a rung ranks trials: ``val_top1`` (classic ASHA) or ``pareto`` (multi-objective ASHA:
    non-dominated sorting of validation top-1 and the cost objectives, then crowding distance),
    so that a cheap configuration is not stopped for being less accurate than an expensive one.
    Default: ``pareto`` when the objectives include a cost known at every epoch."""
    costs: tuple[tuple[str, str], ...] = ()
    """(metric, mode) of the cost objectives a ``pareto`` rung ranks on."""


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 10


@dataclass(frozen=True)
class SearchSpace:
    """A validated search space (see :mod:`granq_search.search.space`)."""

    source: str
    """The space file (absolute path) or a description of where it came from."""
    base_ref: str
    """``base`` as written in the file (preset name or path)."""
    base: ExperimentConfig
    """Production base config: base + base_overrides + non-fidelity ``--set`` overrides."""
    fidelity: dict[str, Any]
    """Search-time overrides (file fidelity + ``--set`` overrides of fidelity keys)."""
    search_base: ExperimentConfig
    objectives: tuple[Objective, ...]
    parameters: dict[str, ParamSpec]
    constraints: dict[str, float] = field(default_factory=dict)
    initial_points: tuple[dict[str, Any], ...] = ()
    scheduler: SchedulerSpec = SchedulerSpec()
    sampler: SamplerSpec = SamplerSpec()
    raw: dict[str, Any] = field(default_factory=dict)
    """The file's content as parsed (recorded in search.json)."""
    set_overrides: dict[str, Any] = field(default_factory=dict)
    pinned: dict[str, Any] = field(default_factory=dict)
    """Searched parameters fixed for this search by ``--set`` (path -> value); they are part of
    both bases, not of ``parameters``."""

    # ----------------------------------------------------------------- derived views

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]

    @property
    def objective_records(self) -> list[dict[str, str]]:
        """``[{"metric": ..., "mode": ...}, ...]``: the objectives as records and callbacks take them."""
        return [{"metric": o.metric, "mode": o.mode} for o in self.objectives]

    def distributions(self) -> dict[str, Any]:
        return {p: spec.distribution() for p, spec in self.parameters.items()}

    def trial_config(self, params: Mapping[str, Any]) -> ExperimentConfig:
        """The config one trial runs: search base + proposed values, validated."""
        return TrialConfig(self.search_base)(params)

    def production_config(self, params: Mapping[str, Any]) -> ExperimentConfig:
        """The production config for ``params``: fidelity replaced by the base's values."""
        return with_overrides(self.base, dict(params)) if params else self.base

    @property
    def asha_max_t(self) -> int:
        return int(self.search_base.train.epochs)

    @property
    def asha_grace_period(self) -> int:
        """Warm-up epochs (the largest a trial may use) + ``scheduler.grace_period``."""
        warm = self.search_base.train.warmup_epochs
        spec = self.parameters.get("train.warmup_epochs")
        if spec is not None:
            warm = max(int(v) for v in spec.extremes())
        return int(warm) + int(self.scheduler.grace_period)

    def to_record(self) -> dict[str, Any]:
        """JSON-safe description (search.json and the search's MLflow parent run, see
        :func:`~granq_search.search.space.space_record_text`);
        :func:`~granq_search.search.space.space_from_record` rebuilds the space from it."""
        return {
            "source": self.source,
            "raw": self.raw,
            "base_config": to_dict(self.base),
            "set_overrides": dict(self.set_overrides),
            "objectives": self.objective_records,
            "fidelity": dict(self.fidelity),
            "parameters": {p: s.to_record() for p, s in self.parameters.items()},
            "constraints": dict(self.constraints),
            "pinned": dict(self.pinned),
        }


@dataclass(frozen=True)
class TrialConfig:
    """``params -> ExperimentConfig``: the config a trial runs, ``search_base`` + the proposed
    values, validated as a whole. Picklable: Ray pickles the MLflow recorder that holds one into
    ``tuner.pkl``.

    The searcher checks proposals with the space's own (:meth:`SearchSpace.trial_config`). The
    driver gives its trainable and its recorder one built on the search base with relative
    data/checkpoint paths made absolute (the trials must not depend on their working directory),
    so that the ``config.yaml`` a trial's MLflow run holds is the config the trial trained with.
    """

    search_base: ExperimentConfig

    def __call__(self, params: Mapping[str, Any]) -> ExperimentConfig:
        return with_overrides(self.search_base, dict(params)) if params else self.search_base
