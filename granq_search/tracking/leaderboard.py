"""The leaderboard of a search, read back from MLflow: ranking, Pareto front, formats, plot.

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
trial's metrics are under-trained and a failed trial has none.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from granq_search.errors import TrackingError
from granq_search.jsonutil import json_safe
from granq_search.tracking.names import short_labels, short_value
from granq_search.tracking.store import search_runs_all
from granq_search.tracking.schema import DEFAULT_EXPERIMENT, TAG, normalize_objectives
from granq_search.tracking.uri import redact_uri, require_existing_store

__all__ = [
    "Leaderboard",
    "COLUMNS",
    "load_runs",
    "list_searches",
    "rank",
    "pareto_mask",
    "format_leaderboard",
    "plot_pareto",
    "FORMATS",
]

FORMATS = ("table", "csv", "markdown", "json")

METRIC_COLUMNS = [
    "rank", "trial", "status", "pareto", "val_top1", "val_drop", "test_top1", "test_drop", "bitops",
    "size_bits", "size_kib", "compression", "act_scale_factors", "fine_fraction", "act_memory_bits", "act_mem_kib",
    "residual_bits",
]
BITS_COLUMNS = ["quant.weight.bits", "quant.act.bits"]
"""Always shown (a trade-off of accuracy against bits), searched or not."""
TAIL_COLUMNS = ["epochs_run", "failure_reason", "run_name", "run_id"]
COLUMNS = METRIC_COLUMNS + BITS_COLUMNS + TAIL_COLUMNS
"""The fixed columns; a search's own parameters come between the bits and the tail."""

STATUS_ORDER = ("finished", "pruned", "running", "interrupted", "failed")


@dataclass
class Leaderboard:
    """One search's trials (``df``, ranked, with a ``pareto`` column) and its context."""

    df: pd.DataFrame
    search: str
    objectives: list[dict[str, str]]
    parent_run_id: str
    teacher: dict[str, Any] = field(default_factory=dict)
    """``{"name", "val_top1", "test_top1"}`` when known."""
    parent_status: str = ""
    tracking_uri: str = ""
    """Redacted."""
    experiment: str = DEFAULT_EXPERIMENT
    tags: dict[str, str] = field(default_factory=dict)
    """The parent run's tags (fidelity, production budget, version, commit, ...)."""
    params: list[str] = field(default_factory=list)
    """The configuration columns of ``df`` (dotted paths): the bits, then the searched parameters."""
    searched: list[str] = field(default_factory=list)
    """The dotted paths the search varies, in the space's order."""

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
    for tag in (TAG.SEARCHED, "granq.proposal"):
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


def _parents(client, experiment: str, uri: str, where: str):

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
    _, runs = _parents(client, experiment, tracking_uri, redact_uri(tracking_uri))
    return list(dict.fromkeys(r.data.tags.get(TAG.SEARCH, r.info.run_name) for r in runs))


def load_runs(tracking_uri: str, search: str | None = None, experiment: str = DEFAULT_EXPERIMENT, *,
              client=None) -> Leaderboard:
    """The leaderboard of ``search`` (default: the most recently started search).

    Raises TrackingError (one line) for a store without searches, an unknown search (the
    message lists the known ones) or a search without trials. Never creates a store.
    """
    from granq_search.tracking.uri import sqlite_path

    db = sqlite_path(tracking_uri)
    where = str(db.parent) if db is not None else redact_uri(tracking_uri)
    if client is None:
        require_existing_store(tracking_uri)
        client = _client(tracking_uri)
    exp_id, parents = _parents(client, experiment, tracking_uri, where)
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
    for key, tag in (("val_top1", TAG.TEACHER_VAL), ("test_top1", TAG.TEACHER_TEST)):
        value = _float(tags.get(tag))
        if not math.isfinite(value):  # fall back to any child's final report
            vals = [c.data.metrics.get(f"teacher_{key}") for c in children]
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
                       parent_run_id=parent.info.run_id, teacher=teacher, parent_status=parent.info.status,
                       tracking_uri=redact_uri(tracking_uri), experiment=experiment, tags=tags, params=params,
                       searched=searched)


def _row(run, teacher: Mapping[str, Any], parent_open: bool, params: Sequence[str]) -> dict[str, Any]:
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    status = t.get(TAG.STATUS) or {"FINISHED": "finished", "KILLED": "pruned", "FAILED": "failed"}.get(
        run.info.status, "running")
    if status in ("retrying", "running") or run.info.status == "RUNNING":
        status = "running" if parent_open else "interrupted"
    final = m.get("final") == 1.0
    val = m.get("best_val_top1", m.get("val_top1", float("nan")))
    if final and "val_drop" in m:
        drop = m["val_drop"]
    elif "val_top1" in teacher:
        drop = teacher["val_top1"] - val
    else:
        drop = m.get("val_drop", float("nan"))
    test = m.get("best_test_top1", m.get("test_top1", float("nan")))
    test_drop = m.get("test_drop", teacher["test_top1"] - test if "test_top1" in teacher else float("nan"))
    size_bits = m.get("size_bits", float("nan"))
    row: dict[str, Any] = {
        "trial": t.get(TAG.TRIAL_ID, run.info.run_name),
        "status": status,
        "val_top1": val,
        "val_drop": drop,
        "test_top1": test,
        "test_drop": test_drop,
        "bitops": m.get("bitops", float("nan")),
        "size_bits": size_bits,
        "size_kib": size_bits / 8192.0,
        "compression": m.get("compression", float("nan")),
        "act_scale_factors": m.get("act_scale_factors", float("nan")),
        "fine_fraction": m.get("fine_fraction", float("nan")),
        "act_memory_bits": m.get("act_memory_bits", float("nan")),
        "act_mem_kib": m.get("act_memory_bits", float("nan")) / 8192.0,
        "residual_bits": m.get("residual_bits", float("nan")),
    }
    for key in params:
        row[key] = _param(p, key)
    row["epochs_run"] = m.get("epochs_run", m.get("epoch", float("nan")))
    row["failure_reason"] = t.get(TAG.FAILURE, "") if status == "failed" else ""
    row["run_name"] = run.info.run_name or ""
    row["run_id"] = run.info.run_id
    return row


# ----------------------------------------------------------------------------- ranking


def _objective_matrix(df: pd.DataFrame, objectives: Sequence[Mapping[str, str]]) -> np.ndarray:
    """Objective values oriented so that lower is better, shape (rows, objectives)."""
    cols = []
    for obj in normalize_objectives(objectives):
        if obj["metric"] not in df.columns:
            raise TrackingError(f"objective '{obj['metric']}' is not a leaderboard column; "
                                f"columns: {', '.join(df.columns)}")
        v = pd.to_numeric(df[obj["metric"]], errors="coerce").to_numpy(dtype=float)
        cols.append(-v if obj["mode"] == "max" else v)
    return np.stack(cols, axis=1) if cols else np.zeros((len(df), 0))


def rank(df: pd.DataFrame, objectives: Sequence[Mapping[str, str]]) -> pd.DataFrame:
    """Finished trials first, best first objective first (later objectives break ties);
    the others after them by status. Adds ``rank`` (1.. for finished trials, else <NA>)."""
    objectives = normalize_objectives(objectives)
    out = df.drop(columns=["rank"], errors="ignore").copy()
    if out.empty:
        out.insert(0, "rank", pd.Series(dtype="Int64"))
        return out
    keys = _objective_matrix(out, objectives)
    order_status = out["status"].map({s: i for i, s in enumerate(STATUS_ORDER)}).fillna(len(STATUS_ORDER))
    sort_cols = {"__status": order_status.to_numpy()}
    for i in range(keys.shape[1]):
        col = keys[:, i].copy()
        col[~np.isfinite(col)] = np.inf  # missing values last
        sort_cols[f"__k{i}"] = col
    tmp = pd.DataFrame(sort_cols, index=out.index)
    if "trial" in out.columns:
        tmp["__trial"] = out["trial"].astype(str)
    order = tmp.sort_values(list(tmp.columns), kind="mergesort").index
    out = out.loc[order].reset_index(drop=True)
    finished = (out["status"] == "finished").to_numpy()
    ranks = pd.array([pd.NA] * len(out), dtype="Int64")
    ranks[finished] = np.arange(1, int(finished.sum()) + 1)
    out.insert(0, "rank", ranks)
    return out


def pareto_mask(df: pd.DataFrame, objectives: Sequence[Mapping[str, str]]) -> pd.Series:
    """True for finished trials no other finished trial dominates (<= in every objective and
    < in one, after orienting max objectives). Equal points do not dominate each other; rows
    with a missing objective value are never on the front."""
    if df.empty:
        return pd.Series([], dtype=bool, index=df.index)
    vals = _objective_matrix(df, objectives)
    ok = (df["status"] == "finished").to_numpy() & np.isfinite(vals).all(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    cand = vals[ok]
    idx = np.flatnonzero(ok)
    for pos, i in enumerate(idx):
        v = vals[i]
        dominated = np.any(np.all(cand <= v, axis=1) & np.any(cand < v, axis=1))
        mask[i] = not dominated
    return pd.Series(mask, index=df.index, name="pareto")


# ----------------------------------------------------------------------------- formats


def _select(board: Leaderboard | pd.DataFrame, all_trials: bool, top: int | None) -> pd.DataFrame:
    df = board.df if isinstance(board, Leaderboard) else board
    if not all_trials:
        df = df[df["status"] == "finished"]
    if top is not None:
        df = df.head(max(int(top), 0))
    return df


def _si(x: float) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _num(x: Any, fmt: str) -> str:
    if x is None or x is pd.NA:
        return "-"
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(xf):
        return "-"
    return format(xf, fmt)


def _missing(x: Any) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _param_columns(df: pd.DataFrame, board: Leaderboard | None) -> list[str]:
    """The configuration columns of ``df`` shown one by one (the bits are one ``W/A`` column)."""
    params = board.params if board is not None else [c for c in df.columns if "." in str(c)]
    return [c for c in params if c in df.columns and c not in BITS_COLUMNS]


def _cell(df_row: Mapping[str, Any], col: str) -> str:
    value = df_row.get(col)
    if _missing(value):
        return "-"
    if col == "quant.act.threshold" and df_row.get("quant.act.granularity") not in (None, "threshold"):
        return "-"  # tau only matters where it chooses the granularity
    return short_value(value)


def _display_rows(df: pd.DataFrame, reason_width: int | None,
                  board: Leaderboard | None = None) -> tuple[list[str], list[list[str]], list[bool]]:
    params = _param_columns(df, board)
    labels = short_labels(params)
    headers = ["rank", "trial", "status", "front", "val top1", "val drop", "test top1", "BitOPs", "KiB",
               "compr", "act KiB", "resid", "W/A"] + [labels[c] for c in params] + ["epochs"]
    numeric = [True, False, False, False, True, True, True, True, True, True, True, True, False] + \
        [bool(pd.api.types.is_numeric_dtype(df[c])) and not pd.api.types.is_bool_dtype(df[c]) for c in params] + [True]
    show_reason = bool(df["failure_reason"].astype(str).str.len().gt(0).any()) if len(df) else False
    if show_reason:
        headers.append("failure reason")
        numeric.append(False)
    rows = []
    for record in df.to_dict(orient="records"):
        r = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}
        bits = f"{_num(r.get('quant.weight.bits'), '.0f')}/{_num(r.get('quant.act.bits'), '.0f')}"
        rank_ = r.get("rank")
        compression = _num(r.get("compression"), ".1f")
        cells = [
            "" if _missing(rank_) else str(rank_),
            str(r.get("trial")), str(r.get("status")), "*" if r.get("pareto") is True else "",
            _num(r.get("val_top1"), ".2f"), _num(r.get("val_drop"), ".2f"), _num(r.get("test_top1"), ".2f"),
            _si(r.get("bitops")), _num(r.get("size_kib"), ".1f"), compression + ("x" if compression != "-" else ""),
            _num(r.get("act_mem_kib"), ".0f"),
            "fp" if r.get("residual_bits") == 32 else _num(r.get("residual_bits"), ".0f"),
            bits, *[_cell(r, c) for c in params], _num(r.get("epochs_run"), ".0f"),
        ]
        if show_reason:
            reason = str(r.get("failure_reason") or "")
            if reason_width and len(reason) > reason_width:
                reason = reason[: reason_width - 3] + "..."
            cells.append(reason)
        rows.append(cells)
    return headers, rows, numeric


def _legend(df: pd.DataFrame, board: Leaderboard | None) -> str:
    params = _param_columns(df, board)
    labels = short_labels(params)
    pairs = [f"{labels[c]} = {c}" for c in params if labels[c] != c]
    return ("columns: W/A = quant.weight.bits/quant.act.bits" + "".join(f", {p}" for p in pairs)
            + " (CSV and JSON use the dotted names)")


def _header_lines(board: Leaderboard | None) -> list[str]:
    if board is None:
        return []
    counts = ", ".join(f"{n} {s}" for s, n in board.counts().items())
    objs = ", ".join(f"{o['metric']} ({o['mode']})" for o in board.objectives)
    lines = [f"search '{board.search}': {counts}; objectives: {objs}"]
    try:
        pinned = json.loads(board.tags.get("granq.pinned") or "{}")
    except ValueError:
        pinned = {}
    if isinstance(pinned, Mapping) and pinned:
        lines.append("pinned: " + ", ".join(f"{k}={short_value(v)}" for k, v in pinned.items()))
    t = board.teacher
    if t:
        parts = [t.get("name", "teacher")]
        if "val_top1" in t:
            parts.append(f"val top-1 {t['val_top1']:.2f}%")
        if "test_top1" in t:
            parts.append(f"test top-1 {t['test_top1']:.2f}%")
        lines.append("FP teacher: " + ", ".join(parts))
    return lines


def _footer(board: Leaderboard | None, shown: pd.DataFrame, all_trials: bool) -> list[str]:
    lines = ["front = * : on the Pareto front (finished trials only); val top-1 is the best epoch's, "
             "test top-1 that student's"]
    legend = _legend(shown, board)
    if legend:
        lines.append(legend)
    if board is not None and not all_trials:
        hidden = len(board.df) - int((board.df["status"] == "finished").sum())
        if hidden:
            lines.append(f"{hidden} unfinished trial(s) (pruned, failed, running) not shown; --all shows them")
    return lines


def format_leaderboard(board: Leaderboard | pd.DataFrame, fmt: str = "table", *, top: int | None = None,
                       all_trials: bool = False) -> str:
    """The leaderboard as text: ``table`` (fixed width), ``csv``, ``markdown`` or ``json``
    (one document). Finished trials only unless ``all_trials``; ``top`` keeps the first K."""
    if fmt not in FORMATS:
        raise TrackingError(f"unknown leaderboard format '{fmt}'; choose one of {', '.join(FORMATS)}")
    lb = board if isinstance(board, Leaderboard) else None
    df = _select(board, all_trials, top)
    if fmt == "csv":
        buf = io.StringIO()
        df.to_csv(buf, index=False, float_format="%.6g")
        return buf.getvalue()
    if fmt == "json":
        doc: dict[str, Any] = {}
        if lb is not None:
            doc.update(search=lb.search, parent_run_id=lb.parent_run_id, tracking_uri=lb.tracking_uri,
                       experiment=lb.experiment, objectives=lb.objectives, searched=lb.searched,
                       teacher=lb.teacher, counts=lb.counts())
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")
        doc["trials"] = records
        return json.dumps(json_safe(doc), indent=2) + "\n"
    headers, rows, numeric = _display_rows(df, 60 if fmt == "table" else None, lb)
    if fmt == "markdown":
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        out = [f"**{esc(line)}**  " for line in _header_lines(lb)[:1]] + \
              [f"{esc(line)}  " for line in _header_lines(lb)[1:]]
        if out:
            out.append("")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
        for note in _footer(lb, df, all_trials):
            out += ["", esc(note)]
        return "\n".join(out) + "\n"
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    out = _header_lines(lb)
    if out:
        out.append("")
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    if not rows:
        out.append("(no finished trials yet)" if not all_trials else "(no trials)")
    out += [""] + _footer(lb, df, all_trials)
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- plot


def _short(trial: str) -> str:
    trial = str(trial)
    return trial if len(trial) <= 14 else trial[-8:]


def plot_pareto(df: pd.DataFrame, objectives: Sequence[Mapping[str, str]], path: str | Path, *,
                search: str | None = None, teacher: Mapping[str, Any] | None = None) -> Path:
    """Scatter of validation top-1 (or -drop) against bit-operations (log x) with the
    Pareto front of finished trials as a highlighted step line; writes a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg output

    objectives = normalize_objectives(objectives)
    teacher = dict(teacher or {})
    acc_like = {"val_top1", "val_drop", "test_top1", "test_drop"}
    cost = next((o["metric"] for o in objectives if o["metric"] not in acc_like and o["metric"] in df.columns),
                "bitops")
    use_acc = "val_top1" in df.columns and pd.to_numeric(df["val_top1"], errors="coerce").notna().any()
    ycol = "val_top1" if use_acc else "val_drop"
    x = pd.to_numeric(df.get(cost, pd.Series(np.nan, index=df.index)), errors="coerce")
    y = pd.to_numeric(df.get(ycol, pd.Series(np.nan, index=df.index)), errors="coerce")
    if not use_acc:
        y = -y
    status = df["status"] if "status" in df.columns else pd.Series("finished", index=df.index)
    front = df["pareto"].astype(bool) if "pareto" in df.columns else pareto_mask(df, objectives)
    plottable = x.notna() & y.notna() & np.isfinite(x) & np.isfinite(y)

    fig = Figure(figsize=(9, 5.8), dpi=120)
    ax = fig.subplots()
    groups = [
        ("finished", (status == "finished") & ~front, dict(marker="o", s=36, color="#4C72B0", alpha=0.75,
                                                            label="finished")),
        ("pruned", status == "pruned", dict(marker="x", s=30, color="#8C8C8C", alpha=0.8,
                                             label="pruned (stopped early, not ranked)")),
        ("running", status.isin(["running", "interrupted"]), dict(marker="o", s=30, facecolors="none",
                                                                   edgecolors="#8C8C8C",
                                                                   label="running / interrupted")),
        ("failed", status == "failed", dict(marker="X", s=40, color="#C44E52", label="failed")),
    ]
    for _, mask, style in groups:
        sel = mask & plottable
        if sel.any():
            ax.scatter(x[sel], y[sel], zorder=2, **style)
    fsel = front & plottable
    if fsel.any():
        fx, fy = x[fsel].to_numpy(), y[fsel].to_numpy()
        order = np.lexsort((-fy, fx))
        fx, fy = fx[order], fy[order]
        ax.step(fx, fy, where="post", color="#DD8452", lw=2, zorder=3)
        ax.scatter(fx, fy, s=90, color="#DD8452", edgecolors="black", linewidths=0.8, zorder=4,
                   label="Pareto front (finished)")
        rows = df[fsel].iloc[order]
        grans = {g for g in rows.get("quant.act.granularity", pd.Series(dtype=object)) if isinstance(g, str)}
        labels: dict[tuple[float, float], list[str]] = {}
        for xi, yi, (_, r) in zip(fx, fy, rows.iterrows()):
            desc = ""
            w, a = r.get("quant.weight.bits"), r.get("quant.act.bits")
            if not _missing(w) and not _missing(a):
                desc = f"W{int(w)}A{int(a)}"
            if len(grans) > 1 and isinstance(r.get("quant.act.granularity"), str):  # only when it varies
                desc += f" {short_value(r['quant.act.granularity'])}"
            labels.setdefault((float(xi), float(yi)), []).append((_short(r["trial"]), desc))
        for (xi, yi), items in labels.items():  # coincident points share one label
            ids = ", ".join(i for i, _ in items)
            descs = list(dict.fromkeys(d for _, d in items if d))
            text = ids + (f"\n{' / '.join(descs)}" if descs else "")
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(7, -4), va="top", fontsize=7.5,
                        color="#5A3A1A", zorder=5)
    ref = teacher.get("val_top1")
    if use_acc and ref is not None and math.isfinite(ref):
        ax.axhline(ref, color="black", ls="--", lw=1, zorder=1,
                   label=f"FP teacher{' ' + teacher['name'] if teacher.get('name') else ''} ({ref:.2f}%)")
    elif not use_acc and ref is not None:
        ax.axhline(0.0, color="black", ls="--", lw=1, zorder=1, label="FP teacher (no drop)")
    if plottable.any() and (x[plottable] > 0).all():
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        si = FuncFormatter(lambda v, _pos: _si(v))
        ax.xaxis.set_major_formatter(si)
        ax.xaxis.set_minor_formatter(si if x[plottable].max() / x[plottable].min() < 30 else FuncFormatter(
            lambda v, _pos: ""))
        ax.tick_params(axis="x", which="both", labelsize=8)
    ax.margins(x=0.08, y=0.1)
    nice = {"bitops": "bit-operations (BitOPs, log scale)", "size_bits": "model size (bits, log scale)",
            "latency_ms": "latency (ms, log scale)"}
    ax.set_xlabel(nice.get(cost, cost))
    ax.set_ylabel("best validation top-1 (%)" if use_acc else "-(validation drop) (points)")
    n = {s: int((status == s).sum()) for s in ("finished", "pruned", "failed", "running", "interrupted")}
    missing = status[~plottable].value_counts()
    not_plotted = ", ".join(f"{n} {s}" for s, n in missing.items())
    counts = ", ".join(f"{v} {k}" for k, v in n.items() if v)
    what = "BitOPs" if cost == "bitops" else cost
    sub = counts + (f"; not plotted (no {what} or accuracy recorded): {not_plotted}" if not_plotted else "")
    ax.set_title(f"Pareto front of search '{search}'" if search else "Pareto front", fontsize=12)
    fig.text(0.5, 0.005, sub, ha="center", va="bottom", fontsize=8.5, color="#444444")
    if not plottable.any():
        ax.text(0.5, 0.5, "no trial with metrics yet", transform=ax.transAxes, ha="center", va="center",
                color="#888888")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
