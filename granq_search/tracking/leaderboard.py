"""The leaderboard of a search, read back from MLflow into a DataFrame, ranked, its Pareto front marked.

Rows are the child runs of one search (tag ``mlflow.parentRunId``); columns follow the
metric contract of docs/ARCHITECTURE.md:

    trial, status, val_top1 (best validation top-1, %), val_drop (teacher val minus best val,
    points), test_top1 (test top-1 of the best-validation student), test_drop, bitops,
    size_bits, size_kib, compression, act_scale_factors, fine_fraction, act_memory_bits (activation
    storage per image), act_mem_kib, residual_bits (precision of the residual stream; 32 = float),
    then the configuration under its dotted config paths: ``quant.weight.bits``, ``quant.act.bits``
    and every parameter the search's space searches (all of them, in the space's order: tag
    ``granq.searched`` of the parent run), then epochs_run, failure_reason, run_name, run_id, plus
    ``rank`` and ``pareto``.

The searched parameters of a search recorded without ``granq.searched`` are the keys of its
trials' proposals (tag ``granq.proposal``), else the config params that differ between its
trials. CSV and JSON name the columns by their dotted paths; the table shows short labels
(``tau``, ``lr_S``, ...) and a legend.

Only finished trials (``final == 1``) are ranked and can be on the Pareto front: a pruned
trial's metrics are under-trained and a failed trial has none (:mod:`~granq_search.tracking.pareto`).
The text formats are :mod:`~granq_search.tracking.table`'s, the plot :mod:`~granq_search.tracking.plot`'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from granq_search import metrics as M
from granq_search.errors import TrackingError
from granq_search.tracking.pareto import STATUS_ORDER, pareto_mask, rank
from granq_search.tracking.schema import DEFAULT_EXPERIMENT, TAG, normalize_objectives
from granq_search.tracking.store import search_runs_all
from granq_search.tracking.uri import redact_uri, require_existing_store, sqlite_path

__all__ = [
    "Leaderboard",
    "COLUMNS",
    "load_runs",
    "list_searches",
    "searched_params",
]

METRIC_COLUMNS = [
    "rank", "trial", "status", "pareto", M.VAL_TOP1, M.VAL_DROP, M.TEST_TOP1, M.TEST_DROP, M.BITOPS,
    M.SIZE_BITS, "size_kib", M.COMPRESSION, M.ACT_SCALE_FACTORS, M.FINE_FRACTION, M.ACT_MEMORY_BITS, "act_mem_kib",
    M.RESIDUAL_BITS,
]
BITS_COLUMNS = ["quant.weight.bits", "quant.act.bits"]
"""Always shown (a trade-off of accuracy against bits), searched or not."""
TAIL_COLUMNS = [M.EPOCHS_RUN, "failure_reason", "run_name", "run_id"]
COLUMNS = METRIC_COLUMNS + BITS_COLUMNS + TAIL_COLUMNS
"""The fixed columns; a search's own parameters come between the bits and the tail."""


@dataclass
class Leaderboard:
    """One search's trials (``df``, ranked, with a ``pareto`` column) and its context."""

    df: pd.DataFrame
    search: str
    objectives: list[dict[str, str]]
    parent_run_id: str
    teacher: dict[str, Any] = field(default_factory=dict)
    """``{"name", "val_top1", "test_top1"}`` when known."""
    tracking_uri: str = ""
    """Redacted."""
    experiment: str = DEFAULT_EXPERIMENT
    tags: dict[str, str] = field(default_factory=dict)
    """The parent run's tags (fidelity, production budget, version, commit, ...)."""
    params: list[str] = field(default_factory=list)
    """The configuration columns of ``df`` (dotted paths): the bits, then the searched parameters."""
    searched: list[str] = field(default_factory=list)
    """The dotted paths the search varies, in the space's order."""
    proposals: dict[str, str] = field(default_factory=dict)
    """Child run id -> its tag ``granq.proposal`` (JSON of the searched values; what ``export`` reads)."""

    def counts(self) -> dict[str, int]:
        c = self.df["status"].value_counts().to_dict() if len(self.df) else {}
        return {s: int(c.get(s, 0)) for s in STATUS_ORDER if c.get(s, 0)} | \
            {s: int(n) for s, n in c.items() if s not in STATUS_ORDER}


# ----------------------------------------------------------------------------- reading


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def _float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _param(params: Mapping[str, str], key: str) -> Any:
    """A config param back as a value (params are strings; non-strings were written as JSON)."""
    raw = params.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    return value if isinstance(value, (int, float, bool, str, list)) else raw


def _json_list(raw: str | None) -> list[str] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, Mapping):  # a proposal: its dotted keys
        return [str(k) for k in value if "." in str(k)]
    return None


def searched_params(parent_tags: Mapping[str, str], children: Sequence[Any]) -> list[str]:
    """The dotted paths a search varies: the parent's ``granq.searched`` tag (the space's parameters,
    in order); else the children's ``granq.searched`` tags; else the keys of their proposals
    (``granq.proposal``: searches recorded before the tag existed); else the config params whose
    values differ between the trials."""
    own = _json_list(parent_tags.get(TAG.SEARCHED))
    if own is not None:
        return own
    for tag in (TAG.SEARCHED, TAG.PROPOSAL):
        found: dict[str, None] = {}
        for c in children:
            for path in _json_list(c.data.tags.get(tag)) or []:
                found[path] = None
        if found:
            return list(found)
    keys: dict[str, None] = {}
    for c in children:
        keys.update(dict.fromkeys(c.data.params))
    return [k for k in keys if "." in k and len({c.data.params.get(k) for c in children}) > 1]


def _typed(column: pd.Series) -> pd.Series:
    """Whole numbers as nullable integers (bits stay 3, not 3.0); other columns as they are."""
    values = [v for v in column if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return column.astype("Int64")
    if values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pd.to_numeric(column, errors="coerce").astype(float)
    return column.astype(object).where(column.notna(), None)


def _parents(client, experiment: str, where: str):
    if experiment != DEFAULT_EXPERIMENT:
        where = f"{where} (MLflow experiment '{experiment}')"
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no searches recorded in {where}; run `granq-search` first")
    runs = search_runs_all(client, [exp.experiment_id], f"tags.`{TAG.KIND}` = 'search'",
                           order_by=["attributes.start_time DESC"])
    if not runs:
        raise TrackingError(f"no searches recorded in {where}; run `granq-search` first")
    return exp.experiment_id, runs


def list_searches(tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT, *, client=None) -> list[str]:
    """Names of the searches in the store, newest first."""
    if client is None:
        require_existing_store(tracking_uri)
        client = _client(tracking_uri)
    _, runs = _parents(client, experiment, redact_uri(tracking_uri))
    return list(dict.fromkeys(r.data.tags.get(TAG.SEARCH, r.info.run_name) for r in runs))


def load_runs(tracking_uri: str, search: str | None = None, experiment: str = DEFAULT_EXPERIMENT, *,
              client=None) -> Leaderboard:
    """The leaderboard of ``search`` (default: the most recently started search).

    Raises TrackingError (one line) for a store without searches, an unknown search (the
    message lists the known ones) or a search without trials. Never creates a store.
    """
    db = sqlite_path(tracking_uri)
    where = str(db.parent) if db is not None else redact_uri(tracking_uri)
    if client is None:
        require_existing_store(tracking_uri)
        client = _client(tracking_uri)
    exp_id, parents = _parents(client, experiment, where)
    if search is None:
        parent = parents[0]
    else:
        named = [r for r in parents if r.data.tags.get(TAG.SEARCH) == search]
        if not named:
            known = list(dict.fromkeys(r.data.tags.get(TAG.SEARCH, "?") for r in parents))
            shown = ", ".join(known[:20]) + (f" (+{len(known) - 20} more)" if len(known) > 20 else "")
            raise TrackingError(f"no search named '{search}' in {where}; known searches (newest first): {shown}")
        parent = min(named, key=lambda r: r.info.start_time or 0)  # the recorder reuses the oldest
    name = parent.data.tags.get(TAG.SEARCH, parent.info.run_name)
    children = search_runs_all(client, [exp_id], f"tags.`{TAG.PARENT}` = '{parent.info.run_id}'",
                               order_by=["attributes.start_time ASC"])
    if not children:
        raise TrackingError(f"search '{name}' has no trials recorded yet in {where}; "
                            "wait for its first trial to start, or check that the search is running")
    tags = dict(parent.data.tags)
    objectives = normalize_objectives(tags.get(TAG.OBJECTIVES))
    teacher: dict[str, Any] = {}
    if tags.get(TAG.TEACHER):
        teacher["name"] = tags[TAG.TEACHER]
    for key, tag, metric in (("val_top1", TAG.TEACHER_VAL, M.TEACHER_VAL_TOP1),
                             ("test_top1", TAG.TEACHER_TEST, M.TEACHER_TEST_TOP1)):
        value = _float(tags.get(tag))
        if not math.isfinite(value):  # fall back to any child's final report
            vals = [c.data.metrics.get(metric) for c in children]
            vals = [v for v in vals if v is not None and math.isfinite(v)]
            value = vals[0] if vals else float("nan")
        if math.isfinite(value):
            teacher[key] = value
    parent_open = parent.info.status == "RUNNING"
    searched = searched_params(tags, children)
    params = list(dict.fromkeys(BITS_COLUMNS + searched))
    rows = [_row(c, teacher, parent_open, params) for c in children]
    df = pd.DataFrame(rows)
    for col in params:
        df[col] = _typed(df[col])
    for obj in objectives:  # an objective that is not a standard column: its raw metric
        if obj["metric"] not in df.columns:
            df[obj["metric"]] = [c.data.metrics.get(obj["metric"], float("nan")) for c in children]
    df = rank(df, objectives)
    df["pareto"] = pareto_mask(df, objectives)
    order = METRIC_COLUMNS + params + TAIL_COLUMNS
    extra = [c for c in df.columns if c not in order]
    df = df[[c for c in order if c in df.columns] + extra]
    return Leaderboard(df=df.reset_index(drop=True), search=name, objectives=objectives,
                       parent_run_id=parent.info.run_id, teacher=teacher, tracking_uri=redact_uri(tracking_uri),
                       experiment=experiment, tags=tags, params=params, searched=searched,
                       proposals={c.info.run_id: c.data.tags[TAG.PROPOSAL] for c in children
                                  if TAG.PROPOSAL in c.data.tags})


def _row(run, teacher: Mapping[str, Any], parent_open: bool, params: Sequence[str]) -> dict[str, Any]:
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    status = t.get(TAG.STATUS) or {"FINISHED": "finished", "KILLED": "pruned", "FAILED": "failed"}.get(
        run.info.status, "running")
    if status in ("retrying", "running") or run.info.status == "RUNNING":
        status = "running" if parent_open else "interrupted"
    nan = float("nan")
    final = m.get(M.FINAL) == 1.0
    val = m.get(M.BEST_VAL_TOP1, m.get(M.VAL_TOP1, nan))
    if final and M.VAL_DROP in m:
        drop = m[M.VAL_DROP]
    elif "val_top1" in teacher:
        drop = teacher["val_top1"] - val
    else:
        drop = m.get(M.VAL_DROP, nan)
    test = m.get(M.BEST_TEST_TOP1, m.get(M.TEST_TOP1, nan))
    test_drop = m.get(M.TEST_DROP, teacher["test_top1"] - test if "test_top1" in teacher else nan)
    size_bits = m.get(M.SIZE_BITS, nan)
    row: dict[str, Any] = {
        "trial": t.get(TAG.TRIAL_ID, run.info.run_name),
        "status": status,
        M.VAL_TOP1: val,
        M.VAL_DROP: drop,
        M.TEST_TOP1: test,
        M.TEST_DROP: test_drop,
        M.BITOPS: m.get(M.BITOPS, nan),
        M.SIZE_BITS: size_bits,
        "size_kib": size_bits / 8192.0,
        M.COMPRESSION: m.get(M.COMPRESSION, nan),
        M.ACT_SCALE_FACTORS: m.get(M.ACT_SCALE_FACTORS, nan),
        M.FINE_FRACTION: m.get(M.FINE_FRACTION, nan),
        M.ACT_MEMORY_BITS: m.get(M.ACT_MEMORY_BITS, nan),
        "act_mem_kib": m.get(M.ACT_MEMORY_BITS, nan) / 8192.0,
        M.RESIDUAL_BITS: m.get(M.RESIDUAL_BITS, nan),
    }
    for key in params:
        row[key] = _param(p, key)
    row[M.EPOCHS_RUN] = m.get(M.EPOCHS_RUN, m.get(M.EPOCH, nan))
    row["failure_reason"] = t.get(TAG.FAILURE, "") if status == "failed" else ""
    row["run_name"] = run.info.run_name or ""
    row["run_id"] = run.info.run_id
    return row
