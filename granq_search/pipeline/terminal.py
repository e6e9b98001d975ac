"""Terminal reporter: a progress bar per epoch on stderr and a final summary table."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

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
    rows = [
        ("teacher val / test top-1", f"{_pct(final['teacher_val_top1'])} / {_pct(final['teacher_test_top1'])}"),
    ]
    if "ptq_val_top1" in final:
        rows.append(("post-training val / test", f"{_pct(final['ptq_val_top1'])} / {_pct(final['ptq_test_top1'])}"))
    rows += [
        ("final student val / test", f"{_pct(final['val_top1'])} / {_pct(final['test_top1'])}"),
        (f"best-val student (epoch {final['best_epoch']})",
         f"{_pct(final['best_val_top1'])} / {_pct(final['best_test_top1'])}"),
        ("drop vs FP (val / test)", f"{final['val_drop']:+.2f} / {final['test_drop']:+.2f} points"),
        ("bit-operations", f"{final['bitops']:.4g} ({final['bitops_fp'] / max(final['bitops'], 1):.1f}x fewer than FP)"),
        ("size", f"{final['size_bits'] / 8 / 1024:.1f} KiB ({final['compression']:.2f}x smaller than FP)"),
        ("activation scales / image", f"{final['act_scale_factors']} (fine sites {100 * final['fine_fraction']:.0f} %)"),
        ("latency (batch, ms)", f"{final['latency_ms']:.2f} quantized, {final['latency_fp_ms']:.2f} FP"),
        ("epochs run / time", f"{final['epochs_run']} / {final['train_time_s']:.1f} s"),
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
        print(f"teacher: val top-1 {info['teacher_val_top1']:.2f} %, test top-1 {info['teacher_test_top1']:.2f} %"
              + (f"; post-training student val {info['ptq_val_top1']:.2f} %" if "ptq_val_top1" in info else "")
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
            self._bar.set_postfix(g=f"{losses['g_total']:.3f}")

    def on_epoch_end(self, epoch, metrics, checkpoint: Path | None):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        phase = "warm-up" if metrics["warmup"] else "QAT"
        print(f"epoch {epoch + 1:>3}/{self.epochs} [{phase:>7}] val top-1 {metrics['val_top1']:6.2f} %  "
              f"g_loss {metrics['g_total']:.3f}  s_loss {metrics['s_loss']:.3f}  ({metrics['epoch_time_s']:.1f} s)",
              file=self.stream)

    def on_end(self, final):
        print(format_table(summary_rows(final), "summary (selection by validation; test only reported):"),
              file=self.stream)
