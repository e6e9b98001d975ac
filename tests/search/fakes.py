"""Test-only Ray trainables (same keyword parameters as ``train_trial``).

They follow the trial contract with the product's :class:`RayReporter` (per-epoch reports with a
checkpoint, the last epoch held back and merged with the final metrics) but compute synthetic
metrics in milliseconds. Each start of a trial appends a line to ``$GRANQ_TEST_MARKERS/<pid>.jsonl``
(trial id, parameters, first epoch, CUDA_VISIBLE_DEVICES, node, start and end times), so tests can
count how often a configuration was trained and whether a restarted trial resumed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

MARKERS = "GRANQ_TEST_MARKERS"
SECONDS_PER_ITER = 0.01
"""An epoch sleeps ``train.iters_per_epoch * SECONDS_PER_ITER`` (the search fidelity sets its length)."""


def _mark(**info) -> None:
    d = os.environ.get(MARKERS)
    if d:
        with open(Path(d) / f"{os.getpid()}.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(info) + "\n")


def read_markers(directory) -> list[dict]:
    out = []
    for f in sorted(Path(directory).glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def accuracy(config: dict, epoch: int, epochs: int) -> float:
    """Synthetic validation top-1: better with a higher threshold and more bits, grows with epochs."""
    quality = float(config.get("quant.act.threshold", 0.5)) + 0.1 * int(config.get("quant.act.bits", 4))
    return 40.0 + 50.0 * min(quality, 1.0) * epoch / epochs


def synthetic_trial(config, *, base_cfg, teacher_state=None, teacher_sha256=None, replay=None, **_driver_facts):
    import ray
    from ray import tune

    from granq_search.search.report import RayReporter
    from granq_search.search.trainable import replay_finished

    if replay_finished(replay):
        return

    epochs = int(base_cfg["train"]["epochs"])
    delay = SECONDS_PER_ITER * int(base_cfg["train"]["iters_per_epoch"])
    start = 0
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = json.loads((Path(d) / "last.pt").read_text())["epoch"] + 1
    t0 = time.time()
    info = dict(trial_id=tune.get_context().get_trial_id(), params=dict(config), start_epoch=start,
                cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), node=ray.get_runtime_context().get_node_id(),
                pid=os.getpid(), t0=t0)
    reporter = RayReporter(epochs, extra={"node_id": info["node"]})
    work = Path(tempfile.mkdtemp(prefix="fake-trial-"))
    best = 0.0
    bitops = 1.0e6 * int(config.get("quant.act.bits", 4))  # every epoch reports its costs, as the trainer does
    for epoch in range(start, epochs):
        time.sleep(delay)
        acc = accuracy(config, epoch + 1, epochs)
        best = max(best, acc)
        (work / "last.pt").write_text(json.dumps({"epoch": epoch}))
        reporter.on_epoch_end(epoch, {"epoch": epoch + 1, "val_top1": acc, "val_drop": 95.0 - acc,
                                      "warmup": 0.0, "bitops": bitops}, work / "last.pt")
    info["t1"] = time.time()
    _mark(**info)
    drop = math.nan if float(config.get("optim.student.lr", 0.0)) > 1.0 else 95.0 - best
    reporter.on_end({"val_drop": drop, "val_top1": best, "bitops": bitops,
                     "test_top1": best, "epochs_run": epochs, "history": []})


def oom_or_synthetic_trial(config, *, base_cfg, teacher_state=None, teacher_sha256=None, replay=None,
                           **driver_facts):
    """``quant.act.bits == 3``: the REAL ``train_trial`` whose training runs out of memory (the
    product code that classifies the error is exercised); anything else: ``synthetic_trial``."""
    if int(config.get("quant.act.bits", 4)) != 3:
        return synthetic_trial(config, base_cfg=base_cfg, teacher_state=teacher_state,
                               teacher_sha256=teacher_sha256)
    import torch

    import granq_search.pipeline.trainer as trainer
    from granq_search.search.trainable import train_trial

    from ray import tune

    _mark(trial_id=tune.get_context().get_trial_id(), params=dict(config), start_epoch=0, oom=True)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    real = trainer.run_training
    trainer.run_training = out_of_memory  # this worker process only; restored below (actors are reused)
    try:
        train_trial(config, base_cfg=base_cfg, teacher_state=teacher_state, teacher_sha256=teacher_sha256,
                    **driver_facts)
    finally:
        trainer.run_training = real
