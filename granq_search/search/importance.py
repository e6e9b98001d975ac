"""What the search learned: hyperparameter importance per objective, from the Optuna study.

Only finished (COMPLETE) trials count: pruned trials were stopped early and their objectives are
under-trained; failed trials have none; a duplicate proposal (``duplicate_of``) repeats another
trial's outcome and would count it twice. Parameters with one value in every finished trial are
left out and listed (fANOVA would give them 0, but PED-ANOVA scores such a column far from 0).
Importance is derived data: :func:`log_importance_artifacts` never raises.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from granq_search.errors import GranqError

__all__ = ["EVALUATORS", "Importance", "study_importance", "search_importance", "format_importance",
           "plot_importance", "log_importance_artifacts"]

log = logging.getLogger(__name__)

EVALUATORS = ("fanova", "ped-anova")
"""fanova: ``FanovaImportanceEvaluator(seed=0)`` (variance explained, deterministic); ped-anova:
``PedAnovaImportanceEvaluator()`` (what the best 10 % of trials share)."""
_LABEL = {"fanova": "fANOVA, seed 0", "ped-anova": "PED-ANOVA, top 10 %"}
BASIS = "finished trials only (pruned trials are under-trained)"


@dataclass
class Importance:
    """Parameter importance of one search, per objective (each objective's values sum to 1)."""

    search: str
    evaluator: str
    objectives: list[dict[str, str]]
    importances: dict[str, dict[str, float]]  # {metric: {param: importance}}, descending; {} if constant
    trials_used: int
    left_out: dict[str, int] = field(default_factory=dict)  # reason (pruned, failed, ...) -> trials
    constant: dict[str, Any] = field(default_factory=dict)  # param -> its one value (not ranked)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "basis": BASIS}


def study_importance(study, objectives: Sequence[Mapping[str, str]], *, evaluator: str = "fanova",
                     search: str = "") -> Importance:
    """Importance of each parameter for each objective of ``study`` (finished trials only).

    ``objectives`` are the search's ``[{metric, mode}]`` in the study's order. Raises GranqError
    (one line) when fewer than 2 finished trials or no parameter that varies among them.
    """
    import optuna
    from optuna.trial import TrialState, create_trial

    if evaluator not in EVALUATORS:
        raise GranqError(f"unknown importance evaluator '{evaluator}'; choose one of {', '.join(EVALUATORS)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = search or study.study_name
    objectives = [{"metric": str(o["metric"]), "mode": str(o.get("mode", "min"))} for o in objectives]
    if len(objectives) != len(study.directions):
        raise GranqError(f"search '{search}': {len(objectives)} objective(s) in search.json but "
                         f"{len(study.directions)} in its Optuna study; the search folder is inconsistent")
    used, left = [], {"pruned": 0, "failed": 0, "duplicate": 0, "running": 0}
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.COMPLETE and "duplicate_of" in t.user_attrs:
            left["duplicate"] += 1
        elif t.state == TrialState.COMPLETE and t.values and all(math.isfinite(v) for v in t.values):
            used.append(t)
        elif t.state in (TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING):
            left[{TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}.get(t.state, "running")] += 1
    left = {k: v for k, v in left.items() if v}
    if len(used) < 2:
        raise GranqError(f"search '{search}' has {len(used)} finished trial(s) ({left.get('pruned', 0)} pruned, "
                         "under-trained and not used); parameter importance needs at least 2: let the search "
                         "run longer (granq-search search --resume --name NAME --output-dir DIR)")
    names = sorted({p for t in used for p in t.params if all(p in u.params for u in used)})
    values = {p: {json.dumps(t.params[p], default=str) for t in used} for p in names}
    varying = [p for p in names if len(values[p]) > 1]
    constant = {p: used[0].params[p] for p in names if len(values[p]) == 1}
    if not varying:
        raise GranqError(f"the {len(used)} finished trials of search '{search}' all have the same parameters; "
                         "parameter importance needs finished trials that differ in at least one parameter")
    # an in-memory copy: our trials only, the journal is never written
    copy = optuna.create_study(directions=study.directions)
    for t in used:
        copy.add_trial(create_trial(params={p: t.params[p] for p in varying}, values=list(t.values),
                                    distributions={p: t.distributions[p] for p in varying}))
    result = Importance(search=search, evaluator=evaluator, objectives=objectives, importances={},
                        trials_used=len(used), left_out=left, constant=constant)
    for i, obj in enumerate(objectives):
        ys = [t.values[i] for t in used]
        if max(ys) == min(ys):
            result.importances[obj["metric"]] = {}
            result.notes.append(f"{obj['metric']} is the same in every finished trial: no parameter explains it")
            continue
        sign = -1.0 if evaluator == "ped-anova" and obj["mode"] == "max" else 1.0  # PED-ANOVA: low is good
        make = (optuna.importance.FanovaImportanceEvaluator(seed=0) if evaluator == "fanova"
                else optuna.importance.PedAnovaImportanceEvaluator())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = optuna.importance.get_param_importances(copy, evaluator=make,
                                                             target=lambda t, i=i, s=sign: s * t.values[i])
        result.importances[obj["metric"]] = {p: float(v) for p, v in
                                             sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))}
    if evaluator == "ped-anova" and len(used) < 50:
        result.notes.append(f"PED-ANOVA on {len(used)} trials: fewer than 5 trials in the top 10 %, a rough guide")
    return result


def _open_study(journal: Path, study_name: str):
    """The study in ``journal``, read only (no sampler, no Ray import; the journal must exist)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if not journal.is_file():  # JournalFileBackend would create an empty file
        raise GranqError(f"no Optuna journal at '{journal}'; importance needs the search folder DIR/NAME: "
                         "pass --output-dir DIR of the search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=JournalStorage(JournalFileBackend(str(journal))))
    except KeyError:
        raise GranqError(f"no Optuna study '{study_name}' in '{journal}'") from None


def search_importance(output_dir: str | Path, name: str | None = None, *,
                      evaluator: str = "fanova") -> Importance:
    """Importance of the search ``output_dir/name`` (default: the latest search there), read from
    its ``search.json`` (objectives) and ``optuna.journal``."""
    from granq_search.search.runner import SearchPaths, latest_search, read_search_record

    output_dir = Path(output_dir)
    paths = SearchPaths(output_dir, name or latest_search(output_dir))
    if not paths.record.is_file():
        raise GranqError(f"no search folder '{paths.root}' (search.json); importance reads the Optuna study "
                         "there: pass --output-dir DIR of the search")
    record = read_search_record(paths.record)
    study = _open_study(paths.journal, str(record.get("study_name") or paths.name))
    return study_importance(study, record.get("objectives") or [], evaluator=evaluator, search=paths.name)


def format_importance(result: Importance, fmt: str = "table") -> str:
    """``result`` as ``table`` (parameters x objectives, fixed width), ``markdown`` or ``json``."""
    if fmt == "json":  # importances are finite floats; a constant parameter's value is a JSON scalar
        return json.dumps(result.to_dict(), indent=2, default=str) + "\n"
    if fmt not in ("table", "markdown"):
        raise GranqError(f"unknown importance format '{fmt}'; choose table, markdown or json")
    metrics, imp = [o["metric"] for o in result.objectives], result.importances
    headers = ["parameter"] + [f"{o['metric']} ({o['mode']})" for o in result.objectives]
    rows = [[p] + [f"{imp[m][p]:.3f}" if p in imp.get(m, {}) else "-" for m in metrics]
            for p in dict.fromkeys(p for m in metrics for p in imp.get(m, {}))]
    left = ", ".join(f"{n} {k}" for k, n in result.left_out.items())
    title = (f"What the search learned: parameter importance in search '{result.search}' "
             f"({_LABEL[result.evaluator]}; each objective's column sums to 1)")
    used = f"from {result.trials_used} {BASIS}" + (f"; left out: {left}" if left else "")
    const = ", ".join(f"{p}={v}" for p, v in result.constant.items())
    notes = ([f"the same in every finished trial (not ranked): {const}"] if const else []) + result.notes
    if fmt == "markdown":
        out = [f"**{title}**  ", used, "", "| " + " | ".join(headers) + " |",
               "|:---|" + "---:|" * len(metrics)] + ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out + [line for note in notes for line in ("", note)]) + "\n"
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [title, used, "", line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out + ([""] + notes if notes else [])) + "\n"


def plot_importance(result: Importance, path: str | Path) -> Path:
    """One horizontal bar panel per objective (most important on top); writes a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg output

    path = Path(path)
    n = len(result.objectives)
    rows = max([len(v) for v in result.importances.values()] + [1])
    fig = Figure(figsize=(5.0 * n, 1.2 + 0.45 * rows), dpi=120, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, obj in zip(axes, result.objectives):
        scores = result.importances.get(obj["metric"], {})
        names = list(scores)[::-1]
        ax.bar_label(ax.barh(names, [scores[p] for p in names], color="#4C72B0"), fmt="%.2f", padding=2)
        ax.set_xlim(0, 1)
        ax.set_xlabel("importance")
        ax.set_title(f"{obj['metric']} ({obj['mode']})" + ("" if scores else ": constant"), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"search '{result.search}': {_LABEL[result.evaluator]}, {result.trials_used} finished trials",
                 fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def log_importance_artifacts(tracking_uri: str, search_name: str, journal: str | Path,
                             objectives: Sequence[Mapping[str, str]], *, evaluator: str = "fanova",
                             experiment: str = "granq_search") -> bool:
    """Log ``importance.json`` and ``importance.png`` on the search's MLflow parent run; True when
    done. Never raises: warns and returns False (too few finished trials, MLflow unwritable)."""
    try:
        from mlflow.tracking import MlflowClient

        from granq_search.tracking.store import find_parent

        result = study_importance(_open_study(Path(journal), search_name), objectives, evaluator=evaluator,
                                  search=search_name)
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        parent = find_parent(client, exp.experiment_id, search_name) if exp is not None else None
        if parent is None:
            raise GranqError(f"no MLflow parent run for search '{search_name}'")
        with tempfile.TemporaryDirectory(prefix="granq_importance_") as tmp:
            Path(tmp, "importance.json").write_text(format_importance(result, "json"), encoding="utf-8")
            client.log_artifact(parent.info.run_id, str(Path(tmp, "importance.json")))
            client.log_artifact(parent.info.run_id, str(plot_importance(result, Path(tmp, "importance.png"))))
        return True
    except Exception as e:  # noqa: BLE001 - derived data must not fail a search
        from granq_search.tracking.uri import redact_text

        log.warning("search %s: importance.json/png not stored in MLflow (%s); `granq-search leaderboard "
                    "--importance` computes them", search_name, redact_text(f"{type(e).__name__}: {e}"))
        return False
