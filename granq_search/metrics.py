"""The metrics contract: every figure a run reports, by name, with its unit and when it is reported.

One name means one figure everywhere: the trainer's metric dicts, the Ray result keys of a
trial, the MLflow metric names, the leaderboard columns and the search objectives
(docs/ARCHITECTURE.md, "Metrics a trial reports"). Code refers to a metric through the
constants below (``metrics.VAL_DROP``) instead of spelling the string again.

When a metric is reported (:attr:`Metric.kind`)
    ``epoch``: in every epoch's report; ``eval``: in the reports of the epochs that validate
    (the search's rung epochs and the last one; every epoch for ``train``); ``final``: only in
    the final report (the last epoch's, ``final == 1``); ``deploy``: logged by ``deploy`` to the
    student's MLflow run. :attr:`Metric.final` says whether the final report carries it too
    (there ``val_drop`` is measured against the BEST validation top-1: the search objective).

This module imports nothing from the package; everything else may import it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Metric",
    "Kind",
    "REGISTRY",
    "names",
    "EPOCH_METRICS",
    "FINAL_METRICS",
    "RECORDED_METRICS",
    "EPOCH_LOSSES",
    "EPOCH_COSTS",
    "OBJECTIVE_METRICS",
    "CONSTRAINT_METRICS",
]


class Kind:
    """When a metric is reported (module docstring)."""

    EPOCH = "epoch"
    EVAL = "eval"
    FINAL = "final"
    DEPLOY = "deploy"


_KINDS = (Kind.EPOCH, Kind.EVAL, Kind.FINAL, Kind.DEPLOY)


@dataclass(frozen=True)
class Metric:
    """One reported figure.

    ``mode``: ``max`` when higher is better, ``min`` when lower is better, None for figures
    that are not a quality or a cost (counters, learning rates, flags).
    """

    name: str
    unit: str
    kind: str
    final: bool
    mode: str | None
    description: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS or self.mode not in (None, "min", "max"):
            raise ValueError(f"metric {self.name!r}: kind {self.kind!r} / mode {self.mode!r}")


# ----------------------------------------------------------------------------- names

EPOCH = "epoch"
VAL_TOP1 = "val_top1"
VAL_TOP5 = "val_top5"
VAL_LOSS = "val_loss"
VAL_DROP = "val_drop"
BEST_VAL_TOP1 = "best_val_top1"
WARMUP = "warmup"
LR_STUDENT = "lr_student"
LR_GENERATOR = "lr_generator"
EPOCH_TIME_S = "epoch_time_s"
EPOCH_TRAIN_TIME_S = "epoch_train_time_s"
G_TOTAL = "g_total"
G_MARGIN = "g_margin"
G_CE = "g_ce"
G_BNS = "g_bns"
S_LOSS = "s_loss"
FINAL = "final"
TEST_TOP1 = "test_top1"
TEST_TOP5 = "test_top5"
BEST_TEST_TOP1 = "best_test_top1"
BEST_EPOCH = "best_epoch"
TEACHER_VAL_TOP1 = "teacher_val_top1"
TEACHER_TEST_TOP1 = "teacher_test_top1"
TEST_DROP = "test_drop"
PTQ_VAL_TOP1 = "ptq_val_top1"
PTQ_TEST_TOP1 = "ptq_test_top1"
EPOCHS_RUN = "epochs_run"
TRAIN_TIME_S = "train_time_s"
LATENCY_MS = "latency_ms"
LATENCY_FP_MS = "latency_fp_ms"
BITOPS = "bitops"
BITOPS_FP = "bitops_fp"
SIZE_BITS = "size_bits"
SIZE_BITS_FP = "size_bits_fp"
COMPRESSION = "compression"
ACT_SCALE_FACTORS = "act_scale_factors"
FINE_FRACTION = "fine_fraction"
ACT_SITES = "act_sites"
ACT_MEMORY_BITS = "act_memory_bits"
RESIDUAL_BITS = "residual_bits"
EVAL_TIME_S = "eval_time_s"
ONNX_AGREEMENT = "onnx_agreement"
ONNX_BYTES = "onnx_bytes"


REGISTRY: dict[str, Metric] = {m.name: m for m in (
    # every epoch / validation epochs
    Metric(EPOCH, "epoch", Kind.EPOCH, False, None, "1-based epoch, warm-up included (ASHA's time attribute)"),
    Metric(VAL_TOP1, "%", Kind.EVAL, True, "max", "validation top-1 of the epoch's (final: the final) student"),
    Metric(VAL_TOP5, "%", Kind.EVAL, True, "max", "validation top-5 of the epoch's (final: the final) student"),
    Metric(VAL_LOSS, "nats", Kind.EVAL, False, "min", "mean validation cross-entropy per image"),
    Metric(VAL_DROP, "points", Kind.EVAL, True, "min",
           "teacher validation top-1 minus this epoch's (final: minus the BEST validation top-1; the objective)"),
    Metric(BEST_VAL_TOP1, "%", Kind.EVAL, True, "max", "best validation top-1 so far"),
    Metric(WARMUP, "flag", Kind.EPOCH, False, None, "1.0 during the generator warm-up (no student step)"),
    Metric(LR_STUDENT, "lr", Kind.EPOCH, False, None, "student learning rate, the epoch's last (0 in warm-up)"),
    Metric(LR_GENERATOR, "lr", Kind.EPOCH, False, None, "generator learning rate, the epoch's last"),
    Metric(EPOCH_TIME_S, "s", Kind.EPOCH, False, None, "wall time of the epoch, validation included"),
    Metric(EPOCH_TRAIN_TIME_S, "s", Kind.EPOCH, False, None, "wall time of the epoch's training iterations alone"),
    Metric(G_TOTAL, "loss", Kind.EPOCH, False, None, "generator loss L_G, mean over the epoch's iterations"),
    Metric(G_MARGIN, "loss", Kind.EPOCH, False, None, "margin part of L_G, epoch mean"),
    Metric(G_CE, "loss", Kind.EPOCH, False, None, "cross-entropy part of L_G, epoch mean"),
    Metric(G_BNS, "loss", Kind.EPOCH, False, None, "BatchNorm-statistics part of L_G, epoch mean"),
    Metric(S_LOSS, "loss", Kind.EPOCH, False, None, "student loss L_S, epoch mean (0 in warm-up)"),
    # the final report
    Metric(FINAL, "flag", Kind.FINAL, True, None, "1.0 on the final report of a run not stopped early"),
    Metric(TEST_TOP1, "%", Kind.FINAL, True, "max", "test top-1 of the final student (reported, never selected on)"),
    Metric(TEST_TOP5, "%", Kind.FINAL, True, "max", "test top-5 of the final student"),
    Metric(BEST_TEST_TOP1, "%", Kind.FINAL, True, "max", "test top-1 of the best-validation student"),
    Metric(BEST_EPOCH, "epoch", Kind.FINAL, True, None, "1-based epoch of the best validation top-1"),
    Metric(TEACHER_VAL_TOP1, "%", Kind.FINAL, True, None, "validation top-1 of the FP teacher"),
    Metric(TEACHER_TEST_TOP1, "%", Kind.FINAL, True, None, "test top-1 of the FP teacher"),
    Metric(TEST_DROP, "points", Kind.FINAL, True, "min", "teacher test top-1 minus the best-validation student's"),
    Metric(PTQ_VAL_TOP1, "%", Kind.FINAL, True, "max", "validation top-1 of the post-training (pre-QAT) student"),
    Metric(PTQ_TEST_TOP1, "%", Kind.FINAL, True, "max", "test top-1 of the post-training (pre-QAT) student"),
    Metric(EPOCHS_RUN, "epochs", Kind.FINAL, True, None, "epochs trained (fewer when stopped early)"),
    Metric(TRAIN_TIME_S, "s", Kind.FINAL, True, None, "wall time of training, evaluations included"),
    Metric(LATENCY_MS, "ms", Kind.FINAL, True, "min", "median forward time of the quantized student for one batch"),
    Metric(LATENCY_FP_MS, "ms", Kind.FINAL, True, None, "median forward time of the FP teacher for the same batch"),
    Metric(BITOPS, "bit-ops", Kind.EPOCH, True, "min", "bit-operations of one image: MACs x weight bits x input bits"),
    Metric(BITOPS_FP, "bit-ops", Kind.FINAL, True, None, "bit-operations of the float model (32 x 32 bits)"),
    Metric(SIZE_BITS, "bits", Kind.EPOCH, True, "min", "stored weights, scales, zero points, biases and static ranges"),
    Metric(SIZE_BITS_FP, "bits", Kind.FINAL, True, None, "stored size of the float model"),
    Metric(COMPRESSION, "x", Kind.FINAL, True, "max", "size_bits_fp / size_bits"),
    Metric(ACT_SCALE_FACTORS, "scale factors", Kind.EPOCH, True, "min", "activation scale factors computed per image"),
    Metric(FINE_FRACTION, "fraction", Kind.EPOCH, True, "min", "share of activation sites finer than per tensor"),
    Metric(ACT_SITES, "sites", Kind.FINAL, True, None, "quantized activation sites"),
    Metric(ACT_MEMORY_BITS, "bits", Kind.FINAL, True, "min", "activation bits read by the layers for one image"),
    Metric(RESIDUAL_BITS, "bits", Kind.FINAL, True, None, "bits of the residual stream (32: float)"),
    Metric(EVAL_TIME_S, "s", Kind.FINAL, True, None, "wall time spent evaluating"),
    # deploy
    Metric(ONNX_AGREEMENT, "%", Kind.DEPLOY, False, "max", "images on which ONNX Runtime and PyTorch agree on top-1"),
    Metric(ONNX_BYTES, "bytes", Kind.DEPLOY, False, "min", "size of the exported ONNX file"),
)}


def names(*kinds: str, final: bool | None = None) -> tuple[str, ...]:
    """Registered names whose kind is one of ``kinds`` (all when none given), in registry order;
    ``final=True`` / ``False`` keeps only those the final report does / does not carry."""
    return tuple(m.name for m in REGISTRY.values()
                 if (not kinds or m.kind in kinds) and (final is None or m.final == final))


#: Reported with the epochs (every epoch, or every validating epoch).
EPOCH_METRICS = names(Kind.EPOCH, Kind.EVAL)
#: Carried by the final report.
FINAL_METRICS = names(final=True)
#: Every numeric figure of a training run recorded in MLflow (``deploy``'s are logged by deploy).
RECORDED_METRICS = tuple(dict.fromkeys(EPOCH_METRICS + FINAL_METRICS))

#: The epoch means of the iteration losses (one QAT step returns these).
EPOCH_LOSSES = (G_TOTAL, G_MARGIN, G_CE, G_BNS, S_LOSS)
#: Cost figures repeated in every epoch's report, so early-stopped trials can be priced too.
EPOCH_COSTS = names(Kind.EPOCH, final=True)
#: What a search may optimise (validation side only: test figures are never chosen on).
OBJECTIVE_METRICS = (VAL_DROP, VAL_TOP1, BEST_VAL_TOP1, VAL_TOP5, BITOPS, SIZE_BITS, COMPRESSION,
                     ACT_SCALE_FACTORS, FINE_FRACTION, ACT_MEMORY_BITS, LATENCY_MS)
#: Costs known from the config alone (no training), usable as search constraints.
CONSTRAINT_METRICS = (BITOPS, SIZE_BITS)
