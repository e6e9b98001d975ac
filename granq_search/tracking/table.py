"""A leaderboard as text: a fixed-width ``table``, ``csv``, ``markdown`` or ``json``.

CSV and JSON name the columns by their dotted config paths; the table and markdown show short
labels (``tau``, ``lr_S``, ...: :func:`granq_search.tracking.names.short_labels`), the bits as one
``W/A`` column, and a legend.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from granq_search import metrics as M
from granq_search.errors import TrackingError
from granq_search.jsonutil import json_safe
from granq_search.tracking.leaderboard import BITS_COLUMNS, Leaderboard
from granq_search.tracking.names import short_labels, short_value
from granq_search.tracking.schema import TAG

__all__ = ["FORMATS", "format_leaderboard", "si_text", "is_missing"]

FORMATS = ("table", "csv", "markdown", "json")


def _select(board: Leaderboard | pd.DataFrame, all_trials: bool, top: int | None) -> pd.DataFrame:
    df = board.df if isinstance(board, Leaderboard) else board
    if not all_trials:
        df = df[df["status"] == "finished"]
    if top is not None:
        df = df.head(max(int(top), 0))
    return df


def si_text(x: float) -> str:
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


def is_missing(x: Any) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def _param_columns(df: pd.DataFrame, board: Leaderboard | None) -> list[str]:
    """The configuration columns of ``df`` shown one by one (the bits are one ``W/A`` column)."""
    params = board.params if board is not None else [c for c in df.columns if "." in str(c)]
    return [c for c in params if c in df.columns and c not in BITS_COLUMNS]


def _cell(df_row: Mapping[str, Any], col: str) -> str:
    value = df_row.get(col)
    if is_missing(value):
        return "-"
    if col == "quant.act.threshold" and df_row.get("quant.act.granularity") not in (None, "threshold"):
        return "-"  # tau only matters where it chooses the granularity
    return short_value(value)


def _display_rows(df: pd.DataFrame, reason_width: int | None, params: list[str],
                  labels: Mapping[str, str]) -> tuple[list[str], list[list[str]], list[bool]]:
    """Headers, cells and which columns are numeric; ``params``: :func:`_param_columns`, ``labels``
    their short labels."""
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
        compression = _num(r.get(M.COMPRESSION), ".1f")
        cells = [
            "" if is_missing(rank_) else str(rank_),
            str(r.get("trial")), str(r.get("status")), "*" if r.get("pareto") is True else "",
            _num(r.get(M.VAL_TOP1), ".2f"), _num(r.get(M.VAL_DROP), ".2f"), _num(r.get(M.TEST_TOP1), ".2f"),
            si_text(r.get(M.BITOPS)), _num(r.get("size_kib"), ".1f"), compression + ("x" if compression != "-" else ""),
            _num(r.get("act_mem_kib"), ".0f"),
            "fp" if r.get(M.RESIDUAL_BITS) == 32 else _num(r.get(M.RESIDUAL_BITS), ".0f"),
            bits, *[_cell(r, c) for c in params], _num(r.get(M.EPOCHS_RUN), ".0f"),
        ]
        if show_reason:
            reason = str(r.get("failure_reason") or "")
            if reason_width and len(reason) > reason_width:
                reason = reason[: reason_width - 3] + "..."
            cells.append(reason)
        rows.append(cells)
    return headers, rows, numeric


def _legend(params: list[str], labels: Mapping[str, str]) -> str:
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
        pinned = json.loads(board.tags.get(TAG.PINNED) or "{}")
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


def _footer(board: Leaderboard | None, legend: str, all_trials: bool) -> list[str]:
    lines = ["front = * : on the Pareto front (finished trials only); val top-1 is the best epoch's, "
             "test top-1 that student's"]
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
    params = _param_columns(df, lb)
    labels = short_labels(params)
    headers, rows, numeric = _display_rows(df, 60 if fmt == "table" else None, params, labels)
    footer = _footer(lb, _legend(params, labels), all_trials)
    head = _header_lines(lb)
    if fmt == "markdown":
        esc = lambda s: s.replace("|", "\\|")  # noqa: E731
        out = [f"**{esc(line)}**  " for line in head[:1]] + [f"{esc(line)}  " for line in head[1:]]
        if out:
            out.append("")
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join("---:" if n else ":---" for n in numeric) + "|")
        out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
        for note in footer:
            out += ["", esc(note)]
        return "\n".join(out) + "\n"
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()

    out = head
    if out:
        out.append("")
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    if not rows:
        out.append("(no finished trials yet)" if not all_trials else "(no trials)")
    out += [""] + footer
    return "\n".join(out) + "\n"

