"""Terminal reporter: a progress bar per epoch on stderr and a final summary table."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from granq_search import metrics as M
from granq_search.pipeline.reporter import Reporter

__all__ = ["TerminalReporter", "summary_rows", "format_table"]


def format_table(rows: list[tuple[str, str]], title: str | None = None) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _pct(x: Any) -> str:
    return f"{x:6.2f} %" if isinstance(x, (int, float)) else str(x)


def summary_rows(final: Mapping[str, Any]) -> list[tuple[str, str]]:
    v = final
    rows = [
        ("teacher val / test top-1", f"{_pct(v[M.TEACHER_VAL_TOP1])} / {_pct(v[M.TEACHER_TEST_TOP1])}"),
    ]
    if M.PTQ_VAL_TOP1 in v:
        rows.append(("post-training val / test", f"{_pct(v[M.PTQ_VAL_TOP1])} / {_pct(v[M.PTQ_TEST_TOP1])}"))
    if M.TEST_TOP1 in v:
        rows += [
            ("final student val / test", f"{_pct(v[M.VAL_TOP1])} / {_pct(v[M.TEST_TOP1])}"),
            (f"best-val student (epoch {v[M.BEST_EPOCH]})",
             f"{_pct(v[M.BEST_VAL_TOP1])} / {_pct(v[M.BEST_TEST_TOP1])}"),
            ("drop vs FP (val / test)", f"{v[M.VAL_DROP]:+.2f} / {v[M.TEST_DROP]:+.2f} points"),
        ]
    else:  # stopped early: not evaluated on the test split
        rows += [
            ("final student val", _pct(v[M.VAL_TOP1])),
            (f"best-val student (epoch {v[M.BEST_EPOCH]})", _pct(v[M.BEST_VAL_TOP1])),
            ("drop vs FP (val)", f"{v[M.VAL_DROP]:+.2f} points"),
        ]
    rows += [
        ("bit-operations", f"{v[M.BITOPS]:.4g} ({v[M.BITOPS_FP] / max(v[M.BITOPS], 1):.1f}x fewer than FP)"),
        ("size", f"{v[M.SIZE_BITS] / 8 / 1024:.1f} KiB ({v[M.COMPRESSION]:.2f}x smaller than FP)"),
        ("activation scales / image", f"{v[M.ACT_SCALE_FACTORS]} (fine sites {100 * v[M.FINE_FRACTION]:.0f} %)"),
        ("latency (batch, ms)", f"{v[M.LATENCY_MS]:.2f} quantized, {v[M.LATENCY_FP_MS]:.2f} FP"),
        ("epochs run / time", f"{v[M.EPOCHS_RUN]} / {v[M.TRAIN_TIME_S]:.1f} s"),
    ]
    return rows


class TerminalReporter(Reporter):
    def __init__(self, stream: TextIO | None = None, progress: bool = True, epochs: int | None = None,
                 iters_per_epoch: int | None = None) -> None:
        self._stream = stream
        self.progress = progress
        self.epochs = epochs
        self.iters = iters_per_epoch
        self._bar: tqdm | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr  # looked up late: may be replaced

    def on_start(self, info):
        print(f"teacher: val top-1 {info[M.TEACHER_VAL_TOP1]:.2f} %, test top-1 {info[M.TEACHER_TEST_TOP1]:.2f} %"
              + (f"; post-training student val {info[M.PTQ_VAL_TOP1]:.2f} %" if M.PTQ_VAL_TOP1 in info else "")
              + (f"; resuming at epoch {info['start_epoch'] + 1}" if info.get("resumed") else ""),
              file=self.stream)

    def on_iteration(self, epoch, iteration, losses):
        if not self.progress:
            return
        if self._bar is None:
            self._bar = tqdm(total=self.iters, desc=f"epoch {epoch + 1}/{self.epochs}", file=self.stream,
                             leave=False, dynamic_ncols=True)
        self._bar.update(1)
        if iteration % 10 == 0:
            self._bar.set_postfix(g=f"{losses[M.G_TOTAL]:.3f}")

    def on_epoch_end(self, epoch, metrics, checkpoint: Path | None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        m = metrics
        phase = "warm-up" if m[M.WARMUP] else "QAT"
        print(f"epoch {epoch + 1:>3}/{self.epochs} [{phase:>7}] val top-1 {m[M.VAL_TOP1]:6.2f} %  "
              f"g_loss {m[M.G_TOTAL]:.3f}  s_loss {m[M.S_LOSS]:.3f}  ({m[M.EPOCH_TIME_S]:.1f} s)",
              file=self.stream)

    def on_end(self, final):
        print(format_table(summary_rows(final), "summary (selection by validation; test only reported):"),
              file=self.stream)
