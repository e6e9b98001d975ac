"""The Pareto plot of a search: validation accuracy against a cost, the front highlighted."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from granq_search import metrics as M
from granq_search.tracking.names import short_value
from granq_search.tracking.pareto import STATUS_ORDER, pareto_mask
from granq_search.tracking.schema import normalize_objectives
from granq_search.tracking.table import is_missing, si_text

__all__ = ["plot_pareto"]


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
    acc_like = {M.VAL_TOP1, M.VAL_DROP, M.TEST_TOP1, M.TEST_DROP}
    cost = next((o["metric"] for o in objectives if o["metric"] not in acc_like and o["metric"] in df.columns),
                M.BITOPS)
    use_acc = M.VAL_TOP1 in df.columns and pd.to_numeric(df[M.VAL_TOP1], errors="coerce").notna().any()
    ycol = M.VAL_TOP1 if use_acc else M.VAL_DROP
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
        ((status == "finished") & ~front, dict(marker="o", s=36, color="#4C72B0", alpha=0.75, label="finished")),
        (status == "pruned", dict(marker="x", s=30, color="#8C8C8C", alpha=0.8,
                                  label="pruned (stopped early, not ranked)")),
        (status.isin(["running", "interrupted"]), dict(marker="o", s=30, facecolors="none", edgecolors="#8C8C8C",
                                                        label="running / interrupted")),
        (status == "failed", dict(marker="X", s=40, color="#C44E52", label="failed")),
    ]
    for mask, style in groups:
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
            if not is_missing(w) and not is_missing(a):
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
        si = FuncFormatter(lambda v, _pos: si_text(v))
        ax.xaxis.set_major_formatter(si)
        ax.xaxis.set_minor_formatter(si if x[plottable].max() / x[plottable].min() < 30 else FuncFormatter(
            lambda v, _pos: ""))
        ax.tick_params(axis="x", which="both", labelsize=8)
    ax.margins(x=0.08, y=0.1)
    nice = {M.BITOPS: "bit-operations (BitOPs, log scale)", M.SIZE_BITS: "model size (bits, log scale)",
            M.LATENCY_MS: "latency (ms, log scale)"}
    ax.set_xlabel(nice.get(cost, cost))
    ax.set_ylabel("best validation top-1 (%)" if use_acc else "-(validation drop) (points)")
    n = {s: int((status == s).sum()) for s in STATUS_ORDER}
    missing = status[~plottable].value_counts()
    not_plotted = ", ".join(f"{n} {s}" for s, n in missing.items())
    counts = ", ".join(f"{v} {k}" for k, v in n.items() if v)
    what = "BitOPs" if cost == M.BITOPS else cost
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
