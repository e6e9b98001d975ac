"""The live status table of a search on the terminal (stderr), in place of Ray's output.

One compact line per trial: short id, state (pending, running, finished, pruned, failed, error),
epoch, the space's objectives (the latest value reported: ``val_drop`` at the validated epochs,
costs every epoch) and the searched parameters. :class:`StatusTable` (a Ray Tune callback) prints
it when something changed and at least ``interval_s`` seconds passed since the last print, and
once more when the experiment ends; the driver then prints the leaderboard.

States: a trial Ray ended after a report with ``final == 1`` finished (or failed when that report
carries a ``failure_reason``); ended without it, ASHA stopped it (pruned); ``error``: the trial
raised in Ray (its traceback is Ray's own error log).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from ray.tune import Callback

from granq_search.tracking.table import si_text

__all__ = ["StatusTable", "TrialRow", "render_status", "short_param_names"]

_RAY_STATE = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "ERROR": "error"}


@dataclass
class TrialRow:
    trial: str
    state: str
    epoch: int | None = None
    values: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


def short_param_names(paths: Sequence[str]) -> dict[str, str]:
    """Column names for dotted parameter paths: the last component, or the last two where the
    last one is shared or says little alone (``quant.act.bits`` -> ``act.bits``,
    ``optim.student.lr`` -> ``student.lr``, ``loss.alpha_ds`` -> ``alpha_ds``)."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    out = {}
    for p, name in zip(paths, last):
        out[p] = ".".join(p.split(".")[-2:]) if last.count(name) > 1 or len(name) <= 3 else name
    return out


def _value(metric: str, x: Any) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(float(x)):
        return "-"
    if metric.endswith(("top1", "top5", "drop")):
        return f"{x:.2f}"
    if abs(x) >= 1e4:
        return si_text(float(x))
    return f"{x:.4g}"


def _param(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    text = str(x)
    return text if len(text) <= 14 else text[:13] + "~"


def render_status(rows: Sequence[TrialRow], *, title: str, objectives: Sequence[Mapping[str, str]],
                  params: Sequence[str], epochs: int | None = None, max_rows: int = 30,
                  width: int | None = None) -> str:
    """The table as text: ``title``, a header and one line per trial (the last ``max_rows``
    trials; a line says how many earlier ones are hidden). Parameter columns that do not fit in
    ``width`` characters are left out (a line names them)."""
    names = short_param_names(list(params))
    metrics = [o["metric"] for o in objectives]
    headers = ["trial", "state", "epoch", *metrics]
    shown = list(rows)[-max_rows:] if max_rows > 0 else []
    cells = [[r.trial, r.state, "-" if r.epoch is None else (f"{r.epoch}/{epochs}" if epochs else str(r.epoch)),
              *(_value(m, r.values.get(m)) for m in metrics)] for r in shown]
    right = [False, False, True, *([True] * len(metrics))]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
    used = sum(widths) + 2 * (len(widths) - 1)
    left_out = []
    for p in params:
        col = [_param(r.params.get(p, "-")) for r in shown]
        w = max([len(names[p])] + [len(c) for c in col])
        if width is not None and used + 2 + w > width:
            left_out.append(names[p])
            continue
        used += 2 + w
        headers.append(names[p])
        right.append(True)
        widths.append(w)
        for c, v in zip(cells, col):
            c.append(v)

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    out = [title, line(headers)]
    hidden = len(rows) - len(shown)
    if hidden:
        out.append(f"({hidden} earlier trial(s) not shown)")
    out += [line(c) for c in cells]
    if left_out:
        out.append(f"(columns left out for the terminal width: {', '.join(left_out)})")
    return "\n".join(out)


def _counts(rows: Sequence[TrialRow]) -> str:
    order = ["running", "pending", "paused", "finished", "pruned", "failed", "error"]
    seen = {s: sum(1 for r in rows if r.state == s) for s in order}
    return ", ".join(f"{n} {s}" for s, n in seen.items() if n)


class StatusTable(Callback):
    """A Ray Tune callback printing :func:`render_status` of the search's trials.

    Args:
        name: the search's name (title line).
        objectives: ``[{"metric": ..., "mode": ...}, ...]`` (the columns after the epoch).
        params: the searched dotted paths, in the space's order.
        num_samples: the search's trial count (title line).
        epochs: epochs per trial (the epoch column reads ``e/epochs``).
        interval_s: least seconds between two prints while the search runs.
        stream: where to print; ``sys.stderr`` at print time when None (it is not pickled: Ray
            keeps its callbacks in the experiment snapshot).
    """

    def __init__(self, *, name: str, objectives: Sequence[Mapping[str, str]], params: Sequence[str],
                 num_samples: int, epochs: int | None = None, interval_s: float = 15.0,
                 stream: TextIO | None = None, max_rows: int = 30) -> None:
        self.name = name
        self.objectives = [dict(o) for o in objectives]
        self.params = list(params)
        self.num_samples = int(num_samples)
        self.epochs = epochs
        self.interval_s = float(interval_s)
        self.max_rows = int(max_rows)
        self._stream = stream
        self._latest: dict[str, dict[str, Any]] = {}
        self._t0 = time.time()
        self._last_print = 0.0
        self._changed = False
        self.prints = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    # ---------------------------------------------------------------- Ray hooks

    def setup(self, **info: Any) -> None:
        self._t0 = time.time()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._changed = True

    def _kept(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """What the table keeps of a result: epoch, final, failure_reason and the objectives."""
        keys = ("epoch", "final", "failure_reason", *(o["metric"] for o in self.objectives))
        return {k: result[k] for k in keys if k in result and result[k] is not None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._latest.setdefault(trial.trial_id, {}).update(self._kept(result))
        self._changed = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._changed = True

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._changed = True

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self._changed and time.time() - self._last_print >= self.interval_s:
            self.print_table(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.print_table(trials)

    # ---------------------------------------------------------------- table

    def _seen(self, trial: Any) -> dict[str, Any]:
        """The trial's latest values: as reported to this table, else (a trial that ended before a
        ``--resume`` made this table, and so reports nothing new) Ray's ``trial.last_result``."""
        seen = self._latest.get(trial.trial_id)
        if seen is None:
            seen = self._kept(getattr(trial, "last_result", None) or {})
        return seen

    def _state(self, trial: Any) -> str:
        status = str(getattr(trial, "status", "") or "")
        if status != "TERMINATED":
            return _RAY_STATE.get(status, status.lower() or "?")
        seen = self._seen(trial)
        if seen.get("failure_reason"):
            return "failed"
        return "finished" if seen.get("final") == 1.0 else "pruned"

    def rows(self, trials: Sequence[Any]) -> list[TrialRow]:
        out = []
        for t in trials:
            seen = self._seen(t)
            epoch = seen.get("epoch")
            out.append(TrialRow(
                trial=str(t.trial_id)[:8], state=self._state(t),
                epoch=int(epoch) if isinstance(epoch, (int, float)) and math.isfinite(epoch) else None,
                values={o["metric"]: seen[o["metric"]] for o in self.objectives if o["metric"] in seen},
                params={p: (t.config or {}).get(p, "-") for p in self.params}))
        return out

    def render(self, trials: Sequence[Any], width: int | None = None) -> str:
        rows = self.rows(trials)
        elapsed = int(time.time() - self._t0)
        objs = ", ".join(f"{o['metric']} ({o['mode']})" for o in self.objectives)
        title = (f"search {self.name} [{elapsed // 60}:{elapsed % 60:02d}] trials {len(rows)}/{self.num_samples}: "
                 f"{_counts(rows) or 'none yet'}; objectives: {objs}")
        return render_status(rows, title=title, objectives=self.objectives, params=self.params, epochs=self.epochs,
                             max_rows=self.max_rows, width=width)

    def print_table(self, trials: Sequence[Any]) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        width = shutil.get_terminal_size((120, 24)).columns
        print(self.render(trials, width=width) + "\n", file=stream, flush=True)
        self._last_print = time.time()
        self._changed = False
        self.prints += 1
