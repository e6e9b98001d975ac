"""Which trial to export: by id, the best, the cheapest within a drop budget, or the knee."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from granq_search import metrics as M
from granq_search.errors import TrackingError
from granq_search.tracking.pareto import objective_matrix, pareto_mask, rank
from granq_search.tracking.schema import normalize_objectives

__all__ = ["RULES", "select_trial", "describe_rule"]

RULES = ("trial", "best", "max_drop", "knee")


def _rule_name(rule: str) -> str:
    name = rule.replace("-", "_").lstrip("_")
    if name not in RULES:
        raise TrackingError(f"unknown selection rule '{rule}'; choose one of --trial ID, --best, --max-drop X, --knee")
    return name


def describe_rule(rule: str, *, trial: str | None = None, max_drop: float | None = None,
                  objectives: Sequence[Mapping[str, str]] | None = None) -> str:
    name = _rule_name(rule)
    first = normalize_objectives(objectives)[0]
    if name == "trial":
        return f"trial {trial} (named)"
    if name == "best":
        return f"best {first['metric']} ({first['mode']}) among finished trials"
    if name == "max_drop":
        return f"fewest BitOPs among finished trials with val_drop <= {max_drop}"
    return "knee of the Pareto front (farthest from the line between its ends, objectives scaled to [0, 1])"


def _finished(df: pd.DataFrame) -> pd.DataFrame:
    fin = df[df["status"] == "finished"]
    if fin.empty:
        counts = df["status"].value_counts().to_dict()
        summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"
        raise TrackingError(f"no finished trial to export ({summary}); wait for a trial to finish or "
                            "export one by --trial ID")
    return fin


def _best(df: pd.DataFrame, objectives) -> pd.Series:
    fin = rank(_finished(df), objectives)
    keys = objective_matrix(fin, objectives)
    if not np.isfinite(keys[:, 0]).any():
        raise TrackingError(f"no finished trial reports the objective '{objectives[0]['metric']}'")
    return fin.iloc[0]


def _by_id(df: pd.DataFrame, trial: str) -> pd.Series:
    trial = str(trial).strip()
    hit = df[(df["trial"].astype(str) == trial) | (df["run_id"].astype(str) == trial)]
    if hit.empty:  # a unique suffix or prefix (Ray ids are long: 'a1b2c3d4_00003')
        ids = df["trial"].astype(str)
        hit = df[ids.str.endswith(trial) | ids.str.startswith(trial)]
        if len(hit) > 1:
            raise TrackingError(f"--trial {trial} matches {len(hit)} trials "
                                f"({', '.join(hit['trial'].astype(str).head(5))}); give the full id")
    if hit.empty:
        known = ", ".join(df["trial"].astype(str).head(8)) + (" ..." if len(df) > 8 else "")
        raise TrackingError(f"no trial '{trial}' in this search; trials: {known}")
    row = hit.iloc[0]
    if row["status"] == "failed":
        reason = row.get("failure_reason") or "no reason recorded"
        raise TrackingError(f"trial {row['trial']} failed ({reason}); export a finished or pruned trial")
    return row


def _max_drop(df: pd.DataFrame, max_drop: float) -> pd.Series:
    if max_drop is None:
        raise TrackingError("--max-drop needs a number of accuracy points, e.g. --max-drop 1.5")
    fin = _finished(df)
    drop = pd.to_numeric(fin[M.VAL_DROP], errors="coerce")
    bitops = pd.to_numeric(fin[M.BITOPS], errors="coerce")
    ok = fin[(drop <= float(max_drop)) & bitops.notna()]
    if ok.empty:
        if drop.notna().any():
            best = fin.loc[drop.idxmin()]
            raise TrackingError(f"no finished trial has val_drop <= {max_drop:g} points; the smallest drop is "
                                f"{best[M.VAL_DROP]:.2f} (trial {best['trial']}); raise --max-drop or use --best")
        raise TrackingError("no finished trial reports val_drop and bitops; use --trial ID")
    ok = ok.assign(__b=pd.to_numeric(ok[M.BITOPS]), __d=pd.to_numeric(ok[M.VAL_DROP]))
    return ok.sort_values(["__b", "__d"], kind="mergesort").drop(columns=["__b", "__d"]).iloc[0]


def _knee(df: pd.DataFrame, objectives) -> pd.Series:
    fin = _finished(df)
    front_mask = fin["pareto"].astype(bool) if "pareto" in fin.columns else pareto_mask(fin, objectives)
    front = rank(fin[front_mask], objectives)
    if len(front) < 3:
        return _best(df, objectives)
    v = objective_matrix(front, objectives)  # lower is better in every column
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (v - lo) / span
    order = np.lexsort(tuple(z[:, k] for k in reversed(range(z.shape[1]))))
    a, b = z[order[0]], z[order[-1]]
    if np.allclose(a, b):
        return _best(df, objectives)
    u = (b - a) / np.linalg.norm(b - a)
    rel = z - a
    perp = rel - np.outer(rel @ u, u)
    dist = np.linalg.norm(perp, axis=1)
    ideal = -a - ((-a) @ u) * u  # from the line towards the ideal point (0, ..., 0)
    signed = np.where(perp @ ideal >= 0, dist, -dist)
    i = int(np.argmax(signed))  # first maximum: the better first objective wins ties (rank order)
    if signed[i] <= 1e-12:
        return _best(df, objectives)
    return front.iloc[i]


def select_trial(df: pd.DataFrame, rule: str = "best", *, trial: str | None = None,
                 max_drop: float | None = None,
                 objectives: Sequence[Mapping[str, str]] | None = None) -> pd.Series:
    """The leaderboard row to export.

    ``trial``: the trial with this id (or run id, or a unique prefix/suffix); ``best``: the
    finished trial best on the first objective; ``max_drop``: the finished trial with the
    fewest BitOPs whose val_drop <= ``max_drop``; ``knee``: the Pareto point farthest from the
    line between the front's ends in objective space scaled to [0, 1] (the best with fewer
    than 3 front points). Raises TrackingError when nothing qualifies.
    """
    name = _rule_name(rule)
    objectives = normalize_objectives(objectives)
    if df.empty:
        raise TrackingError("the search has no trials to export")
    if name == "trial":
        if not trial:
            raise TrackingError("--trial needs a trial id (see `granq-search leaderboard --all`)")
        return _by_id(df, trial)
    if name == "best":
        return _best(df, objectives)
    if name == "max_drop":
        return _max_drop(df, max_drop)  # type: ignore[arg-type]
    return _knee(df, objectives)
