"""Ranking a leaderboard and its Pareto front (pandas only: no MLflow here).

Only finished trials (``status == "finished"``) are ranked and can be on the Pareto front: a
pruned trial's metrics are under-trained and a failed trial has none. Objectives are
``[{"metric": column, "mode": "min"|"max"}, ...]`` over the leaderboard's columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from granq_search.errors import TrackingError
from granq_search.tracking.schema import normalize_objectives

__all__ = ["STATUS_ORDER", "objective_matrix", "rank", "pareto_mask"]

STATUS_ORDER = ("finished", "pruned", "running", "interrupted", "failed")
"""How trial statuses are ordered in a leaderboard (and in its counts)."""


def objective_matrix(df: pd.DataFrame, objectives: Sequence[Mapping[str, str]]) -> np.ndarray:
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
    keys = objective_matrix(out, objectives)
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
    vals = objective_matrix(df, objectives)
    ok = (df["status"] == "finished").to_numpy() & np.isfinite(vals).all(axis=1)
    mask = np.zeros(len(df), dtype=bool)
    cand = vals[ok]
    idx = np.flatnonzero(ok)
    for i in idx:
        v = vals[i]
        dominated = np.any(np.all(cand <= v, axis=1) & np.any(cand < v, axis=1))
        mask[i] = not dominated
    return pd.Series(mask, index=df.index, name="pareto")
