"""A search-space document -> a validated :class:`~granq_search.search.space_model.SearchSpace`.

Every check of the file format described in :mod:`granq_search.search.space`: unknown keys,
parameter paths that are not config fields, bounds the config rejects, objectives on test
metrics, pins given with ``--set``, initial points and the ASHA budget; each problem is one
:class:`~granq_search.errors.SearchSpaceError` line that names the file and the key.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from granq_search.config import ExperimentConfig, check_path, load_config, preset_path, with_overrides
from granq_search.errors import ConfigError, GranqError, SearchSpaceError
from granq_search.metrics import CONSTRAINT_METRICS, EPOCH_COSTS, OBJECTIVE_METRICS
from granq_search.search.space_model import Objective, ParamSpec, SamplerSpec, SchedulerSpec, SearchSpace

__all__ = ["parse_space"]

_TOP_KEYS = ("base", "base_overrides", "fidelity", "objectives", "constraints", "parameters",
             "initial_points", "scheduler", "sampler")
_PARAM_KEYS = {
    "float": ("type", "low", "high", "log", "step"),
    "int": ("type", "low", "high", "log", "step"),
    "categorical": ("type", "choices"),
}
_SCHED_KEYS = {"asha": ("type", "reduction_factor", "grace_period", "rank_by"), "none": ("type",)}
_SAMPLER_KEYS = {"tpe": ("type", "seed", "n_startup_trials"), "random": ("type", "seed")}


# --------------------------------------------------------------------------- parsing helpers


class _Where:
    """Builds one-line errors that name the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, message: str) -> SearchSpaceError:
        return SearchSpaceError(f"search space '{self.source}': {key}: {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _strict_keys(where: _Where, prefix: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            tip = f"; did you mean '{close[0]}'?" if close else f"; allowed: {', '.join(allowed)}"
            raise where.error(f"{prefix}{key}" if prefix else str(key), f"unknown key{tip}")


def _mapping(where: _Where, key: str, value: Any, default: Any = None) -> dict[str, Any]:
    if value is None:
        return {} if default is None else default
    if not isinstance(value, Mapping):
        raise where.error(key, f"expected a mapping, got {value!r}")
    return dict(value)


def _check_field(where: _Where, key: str, path: Any) -> Any:
    if not isinstance(path, str) or not path:
        raise where.error(key, f"{path!r} is not a dotted config path (for example quant.act.bits)")
    try:
        return check_path(path)
    except ConfigError as e:
        raise where.error(key, str(e)) from None


def _apply(where: _Where, key: str, cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    try:
        return with_overrides(cfg, overrides)
    except ConfigError as e:
        raise where.error(key, f"the config rejects it: {e}") from None


def _resolve_base(where: _Where, ref: Any, space_file: Path | None) -> ExperimentConfig:
    if not isinstance(ref, str) or not ref:
        raise where.error("base", "name a preset (digits, cifar10_resnet20, ...) or a config file")
    candidate = None
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        p = Path(ref)
        if not p.is_absolute() and space_file is not None:
            p = space_file.parent / p
        candidate = p
        if not p.is_file():
            raise where.error("base", f"config file '{p}' does not exist")
    try:
        return load_config(candidate if candidate is not None else preset_path(ref))
    except GranqError as e:
        raise where.error("base", str(e)) from None


def _hint_kind(hint: Any) -> set[str]:
    """Which parameter types fit a config field: float, int or categorical only."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kinds: set[str] = {"categorical"}
    for a in args:
        if a is float:
            kinds |= {"float", "int"}
        elif a is int:
            kinds.add("int")
    return kinds


def _parse_param(where: _Where, path: Any, spec: Any) -> ParamSpec:
    key = f"parameters.{path}"
    hint = _check_field(where, key, path)
    if not isinstance(spec, Mapping):
        raise where.error(key, "expected {type: float|int|categorical, ...}")
    kind = spec.get("type")
    if kind not in _PARAM_KEYS:
        raise where.error(f"{key}.type", f"{kind!r} is not a parameter type; use float, int or categorical")
    _strict_keys(where, f"{key}.", spec, _PARAM_KEYS[kind])
    if kind not in _hint_kind(hint):
        fits = "categorical" if _hint_kind(hint) == {"categorical"} else "int or categorical"
        raise where.error(f"{key}.type", f"'{path}' is not a {kind} field; use type {fits}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise where.error(f"{key}.choices", "needs a non-empty list of values")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise where.error(f"{key}.choices", f"{c!r} is not a scalar (null, bool, number or string)")
        if len({(type(c), c) for c in choices}) != len(choices):
            raise where.error(f"{key}.choices", f"{choices} lists a value twice")
        return ParamSpec(path=path, type="categorical", choices=tuple(choices))
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if not _is_number(v):
            raise where.error(f"{key}.{name}", f"needs a finite number, got {v!r}")
        if kind == "int" and not float(v).is_integer():
            raise where.error(f"{key}.{name}", f"{v!r} is not an integer")
    if low > high:
        raise where.error(key, f"low {low} is greater than high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise where.error(f"{key}.log", f"expected true or false, got {log!r}")
    if log and low <= 0:
        raise where.error(f"{key}.low", f"a log range needs low > 0, got {low}")
    if log and kind == "int" and low < 1:
        raise where.error(f"{key}.low", f"an integer log range needs low >= 1, got {low}")
    step = spec.get("step")
    if step is not None:
        if not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise where.error(f"{key}.step", f"needs a {'positive integer' if kind == 'int' else 'number > 0'}, "
                              f"got {step!r}")
        if log:
            raise where.error(f"{key}.step", "step and log cannot be combined; drop one")
    if kind == "int":
        low, high = int(low), int(high)
        step = None if step is None else int(step)
    else:
        low, high = float(low), float(high)
        step = None if step is None else float(step)
    return ParamSpec(path=path, type=kind, low=low, high=high, log=log, step=step)


def _pin_value(spec: ParamSpec, value: Any) -> Any:
    """``value`` (inside ``spec``) as the parameter's own type: int, float, or the matching choice."""
    if spec.type == "int":
        return int(value)
    if spec.type == "float":
        return float(value)
    for c in spec.choices:  # an exact (same type) match first, then an equal one (3.0 -> 3)
        if value == c and type(value) is type(c):
            return c
    return next(c for c in spec.choices if value == c)


def _point_key(point: Mapping[str, Any]) -> tuple:
    """Identity of an initial point (1, 1.0 and True differ)."""
    return tuple(sorted((k, type(v).__name__, repr(v)) for k, v in point.items()))


def _parse_objectives(where: _Where, value: Any) -> tuple[Objective, ...]:
    if not isinstance(value, list) or not value:
        raise where.error("objectives", "needs a list of {metric, mode}, for example "
                          "[{metric: val_drop, mode: min}, {metric: bitops, mode: min}]")
    out: list[Objective] = []
    for i, item in enumerate(value):
        key = f"objectives[{i}]"
        if not isinstance(item, Mapping):
            raise where.error(key, f"expected {{metric: NAME, mode: min|max}}, got {item!r}")
        _strict_keys(where, f"{key}.", item, ("metric", "mode"))
        metric, mode = item.get("metric"), item.get("mode")
        if not isinstance(metric, str):
            raise where.error(f"{key}.metric", "name a metric, for example val_drop")
        if metric.startswith("test_") or "_test_" in metric or metric.endswith("_test"):
            raise where.error(f"{key}.metric", f"'{metric}' is a test metric; a search selects on validation "
                              "metrics only (the test split is only reported): use val_drop or val_top1")
        if metric not in OBJECTIVE_METRICS:
            close = difflib.get_close_matches(metric, OBJECTIVE_METRICS, n=1)
            tip = f"; did you mean '{close[0]}'?" if close else f"; choose from {', '.join(OBJECTIVE_METRICS)}"
            raise where.error(f"{key}.metric", f"unknown metric '{metric}'{tip}")
        if mode not in ("min", "max"):
            raise where.error(f"{key}.mode", f"{mode!r} is not a mode; use min or max")
        if any(o.metric == metric for o in out):
            raise where.error(f"{key}.metric", f"'{metric}' is listed twice")
        out.append(Objective(metric=metric, mode=mode))
    return tuple(out)


def _parse_scheduler(where: _Where, value: Any, objectives: tuple[Objective, ...] = ()) -> SchedulerSpec:
    data = _mapping(where, "scheduler", value, {"type": "asha"})
    kind = data.get("type", "asha")
    if kind not in _SCHED_KEYS:
        raise where.error("scheduler.type", f"{kind!r} is not a scheduler; use asha or none")
    _strict_keys(where, "scheduler.", data, _SCHED_KEYS[kind])
    if kind == "none":
        return SchedulerSpec(type="none")
    rf = data.get("reduction_factor", 2)
    if not _is_number(rf) or rf <= 1:
        raise where.error("scheduler.reduction_factor", f"needs a number > 1, got {rf!r}")
    grace = data.get("grace_period", 1)
    if isinstance(grace, bool) or not isinstance(grace, int) or grace < 1:
        raise where.error("scheduler.grace_period", f"needs an integer >= 1 (epochs after warm-up), got {grace!r}")
    costs = tuple((o.metric, o.mode) for o in objectives if o.metric in EPOCH_COSTS)
    rank_by = data.get("rank_by", "pareto" if costs else "val_top1")
    if rank_by not in ("val_top1", "pareto"):
        raise where.error("scheduler.rank_by", f"{rank_by!r}: use val_top1 or pareto")
    if rank_by == "pareto" and not costs:
        raise where.error("scheduler.rank_by", "pareto ranks on cost objectives reported every epoch ("
                          f"{', '.join(EPOCH_COSTS)}); the objectives have none: use val_top1")
    return SchedulerSpec(type="asha", reduction_factor=float(rf), grace_period=grace, rank_by=rank_by,
                         costs=costs if rank_by == "pareto" else ())


def _parse_sampler(where: _Where, value: Any) -> SamplerSpec:
    data = _mapping(where, "sampler", value, {"type": "tpe"})
    kind = data.get("type", "tpe")
    if kind not in _SAMPLER_KEYS:
        raise where.error("sampler.type", f"{kind!r} is not a sampler; use tpe or random")
    _strict_keys(where, "sampler.", data, _SAMPLER_KEYS[kind])
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise where.error("sampler.seed", f"needs an integer >= 0, got {seed!r}")
    startup = data.get("n_startup_trials", 10)
    if isinstance(startup, bool) or not isinstance(startup, int) or startup < 0:
        raise where.error("sampler.n_startup_trials", f"needs an integer >= 0, got {startup!r}")
    return SamplerSpec(type=kind, seed=seed, n_startup_trials=startup)


def _parse_constraints(where: _Where, value: Any) -> dict[str, float]:
    data = _mapping(where, "constraints", value)
    out = {}
    for metric, limit in data.items():
        key = f"constraints.{metric}"
        if metric not in CONSTRAINT_METRICS:
            raise where.error(key, f"'{metric}' cannot be budgeted before training; "
                              f"constraints accept {', '.join(CONSTRAINT_METRICS)}")
        if not _is_number(limit) or limit <= 0:
            raise where.error(key, f"needs the largest allowed value (a number > 0), got {limit!r}")
        out[metric] = float(limit)
    return out


def parse_space(data: Any, source: str, *, space_file: Path | None = None,
                set_overrides: Mapping[str, Any] | None = None,
                base_cfg: ExperimentConfig | None = None) -> SearchSpace:
    """Validate a parsed search-space document (format: :mod:`granq_search.search.space`).

    ``base_cfg``: the production base already resolved (a resumed search rebuilds its space from
    search.json without reading the base file again).
    """
    where = _Where(source)
    if data is None:
        raise where.error("document", "the file is empty; see search_spaces/digits.yaml for an example")
    if not isinstance(data, Mapping):
        raise where.error("document", f"expected a mapping of keys ({', '.join(_TOP_KEYS)})")
    _strict_keys(where, "", data, _TOP_KEYS)
    for required in ("base", "objectives", "parameters"):
        if required not in data:
            raise where.error(required, "missing; every search space names base, objectives and parameters")
    set_overrides = dict(set_overrides or {})

    base_overrides = _mapping(where, "base_overrides", data.get("base_overrides"))
    fidelity = _mapping(where, "fidelity", data.get("fidelity"))
    for name, block in (("base_overrides", base_overrides), ("fidelity", fidelity)):
        for path in block:
            _check_field(where, f"{name}.{path}", path)
    for path in set_overrides:
        _check_field(where, f"--set {path}", path)

    raw_params = _mapping(where, "parameters", data.get("parameters"))
    if not raw_params:
        raise where.error("parameters", "needs at least one parameter to search")
    declared = {str(p): _parse_param(where, p, s) for p, s in raw_params.items()}
    for path in fidelity:
        if path in declared:
            raise where.error(f"fidelity {path}", "is also a searched parameter; fix it in one place only")
    # a --set override of a searched parameter pins it for this search (both bases get the value)
    pinned: dict[str, Any] = {}
    for path, value in set_overrides.items():
        spec = declared.get(path)
        if spec is None:
            continue
        if not spec.contains(value):
            allowed = (f"one of {list(spec.choices)}" if spec.type == "categorical"
                       else f"inside {spec.to_record()}")
            raise where.error(f"--set {path}", f"{value!r} is outside the searched parameter's range; a searched "
                              f"parameter given with --set is pinned and must be {allowed}")
        pinned[path] = _pin_value(spec, value)
    parameters = {p: s for p, s in declared.items() if p not in pinned}
    if not parameters:
        raise where.error("--set", f"pins every searched parameter ({', '.join(pinned)}); nothing left to search: "
                          "drop a --set, or train the config with `granq-search train` instead")

    if base_cfg is None:
        base = _resolve_base(where, data["base"], space_file)
        base = _apply(where, "base_overrides", base, base_overrides)
    else:
        base = base_cfg
    search_only = {k: v for k, v in set_overrides.items() if k in fidelity}
    production_set = {k: pinned.get(k, v) for k, v in set_overrides.items() if k not in fidelity}
    # with base_cfg (a rebuilt space) the base already holds every --set value, pins included
    if base_cfg is None and production_set:
        base = _apply(where, "--set", base, production_set)
    fidelity_eff = {**fidelity, **search_only}
    search_base = _apply(where, "fidelity", base, fidelity_eff)

    for path, spec in parameters.items():
        for value in spec.extremes():
            try:
                with_overrides(search_base, {path: value})
            except ConfigError as e:
                what = "choice" if spec.type == "categorical" else "bound"
                raise where.error(f"parameters.{path}", f"{what} {value!r} is rejected by the config: {e}") from None

    objectives = _parse_objectives(where, data.get("objectives"))
    constraints = _parse_constraints(where, data.get("constraints"))
    scheduler = _parse_scheduler(where, data.get("scheduler"), objectives)
    sampler = _parse_sampler(where, data.get("sampler"))

    points_raw = data.get("initial_points") or []
    if not isinstance(points_raw, list):
        raise where.error("initial_points", "expected a list of {parameter: value} mappings")
    points: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for i, point in enumerate(points_raw):
        key = f"initial_points[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise where.error(key, "expected a non-empty mapping of parameter values")
        for path, value in point.items():  # checked against the file's parameters, pinned or not
            if path not in declared:
                close = difflib.get_close_matches(str(path), list(declared), n=1)
                tip = f"; did you mean '{close[0]}'?" if close else ""
                raise where.error(f"{key}.{path}", f"is not a searched parameter{tip}")
            if not declared[path].contains(value):
                raise where.error(f"{key}.{path}", f"{value!r} is outside the parameter's range "
                                  f"{declared[path].to_record()}")
        kept = {p: v for p, v in point.items() if p not in pinned}
        if not kept or _point_key(kept) in seen:  # only pinned values, or the same as an earlier point
            continue
        _apply(where, key, search_base, kept)
        seen.add(_point_key(kept))
        points.append(kept)

    space = SearchSpace(
        source=source, base_ref=str(data["base"]), base=base, fidelity=fidelity_eff, search_base=search_base,
        objectives=objectives, parameters=parameters, constraints=constraints, initial_points=tuple(points),
        scheduler=scheduler, sampler=sampler, raw=dict(data), set_overrides=set_overrides, pinned=pinned,
    )
    if scheduler.type == "asha":
        if "train.epochs" in parameters:
            raise where.error("parameters.train.epochs", "ASHA needs one epoch budget (its max_t); fix "
                              "train.epochs in fidelity, or use scheduler: {type: none}")
        if space.asha_grace_period > space.asha_max_t:
            raise where.error("scheduler.grace_period",
                              f"warm-up ({space.asha_grace_period - scheduler.grace_period}) + grace_period "
                              f"({scheduler.grace_period}) = {space.asha_grace_period} epochs exceeds "
                              f"train.epochs = {space.asha_max_t} at search fidelity; raise train.epochs, "
                              "lower grace_period, or use scheduler: {type: none}")
    return space
