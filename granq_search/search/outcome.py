"""The end of a search: its :class:`SearchOutcome`, leaderboard, exported best config and
parameter importances, and the outcome kept in its record."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from granq_search.errors import GranqError
from granq_search.search.launch import SearchRun
from granq_search.search.layout import write_record
from granq_search.search.plan import SearchPlan
from granq_search.search.space import SearchSpace

__all__ = ["SearchOutcome", "finalise"]


@dataclass
class SearchOutcome:
    name: str
    path: str
    status: str
    """finished | interrupted | exhausted (the sampler ran out of new configurations)."""
    num_trials: int
    """Ray trials run (a duplicate proposal is not a Ray trial)."""
    counts: dict[str, int]
    """Optuna trial states: complete, pruned, fail (+ running, always 0 at the end)."""
    pareto: list[dict[str, Any]]
    objectives: list[dict[str, str]]
    ray_path: str
    journal: str
    tracking_uri: str
    wall_time_s: float
    best_config: str | None = None
    experiment: str = ""
    """The MLflow experiment of the record ('' without tracking)."""
    leaderboard: str | None = None
    notes: list[str] = field(default_factory=list)
    dashboard_url: str | None = None
    """Ray's dashboard, when this search started or reached one that reports it."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _pareto(study, space: SearchSpace) -> list[dict[str, Any]]:
    out, seen = [], set()
    try:
        best = study.best_trials
    except Exception:  # noqa: BLE001 - no finished trial
        best = []
    for t in sorted(best, key=lambda t: t.values):
        source = t.user_attrs.get("duplicate_of", t.number)
        if source in seen:
            continue
        seen.add(source)
        out.append({"number": t.number, "ray_trial_id": t.user_attrs.get("ray_trial_id"),
                    "values": dict(zip(space.metrics, t.values)), "params": dict(t.params)})
    return out


def finalise(plan: SearchPlan, run: SearchRun, *, started: float, leaderboard_top: int = 5) -> SearchOutcome:
    """The outcome of a launched search (``started``: its ``time.time()`` at the call); with
    tracking and a complete trial, also its leaderboard, ``best.yaml`` and importances (a failure
    of these is a note, not an error). The outcome is written to the record."""
    from granq_search.search.study import open_study, trial_counts
    from granq_search.tracking import redact_uri

    paths, name, uri, notes = plan.paths, plan.name, plan.tracking_uri, run.notes
    study, _ = open_study(plan.space, str(paths.journal), name)
    outcome = SearchOutcome(
        name=name, path=str(paths.root), status=run.status, num_trials=run.num_trials, counts=trial_counts(study),
        pareto=_pareto(study, plan.space), objectives=run.record["objectives"], ray_path=plan.ray_path,
        journal=str(paths.journal), tracking_uri=redact_uri(uri) if uri else "", wall_time_s=time.time() - started,
        experiment=plan.experiment if plan.experiment is not None else "",
        notes=notes, dashboard_url=run.dashboard_url,
    )
    if plan.tracking and outcome.counts["complete"]:
        from granq_search.export.production import export_config
        from granq_search.tracking import format_leaderboard, load_runs

        try:
            outcome.leaderboard = format_leaderboard(load_runs(uri, name, experiment=outcome.experiment), "table",
                                                     top=leaderboard_top)
        except GranqError as e:
            notes.append(f"leaderboard: {e}")
        try:
            outcome.best_config = str(export_config(uri, name, "best", output=paths.best,
                                                    experiment=outcome.experiment))
        except GranqError as e:
            notes.append(f"export: {e}")
        if outcome.counts["complete"] >= 2:
            from granq_search.search.importance import log_importance_artifacts

            if not log_importance_artifacts(uri, name, paths.journal, run.record["objectives"],
                                            experiment=outcome.experiment):
                notes.append("importance: importance.json/png not stored in MLflow (see the warning above); "
                             "`granq-search leaderboard --importance` computes them")
    run.record.update(outcome={k: v for k, v in outcome.to_dict().items() if k not in ("leaderboard",)})
    write_record(paths.record, run.record)
    return outcome
