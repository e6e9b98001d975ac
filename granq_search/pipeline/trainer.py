"""The GranQ zero-shot pipeline: a generator learns from the FP teacher, the quantized student
learns from the generator's images by QAT (GRANQ.md section 3, without the public code's bugs).

Honest evaluation: every choice (best epoch) is made on the validation split; the test split
is only reported. This module imports neither Ray nor MLflow; it reports through
:class:`~granq_search.pipeline.reporter.Reporter`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granq_search import metrics as M
from granq_search.config import ExperimentConfig, flatten
from granq_search.errors import GranqError
from granq_search.losses import bn_stats_recorder, bns_loss, generator_loss, student_loss
from granq_search.pipeline.build import (
    build_generator,
    build_student,
    calibrate_student,
    efficiency_figures,
    generator_optimizer,
    input_shape,
    is_resolved,
    resolve_config,
    student_optimizer,
)
from granq_search.pipeline.checkpoint import LAST, has_checkpoint, restore_training_state, save_training_state
from granq_search.pipeline.evaluation import evaluate, resolve_device
from granq_search.pipeline.reporter import NullReporter, Reporter, StopTraining
from granq_search.pipeline.schedule import lr_factor, set_lr
from granq_search.quant import needs_calibration, site_report

__all__ = ["run_training", "TrainingDiverged", "resolve_device", "Setup", "build_setup", "TrainResult",
           "measure_latency", "qat_step", "TeacherMetrics", "latency_shape", "check_checkpoint_dir"]


class TrainingDiverged(GranqError):
    """A loss became NaN or infinite; the configuration is unusable as given."""


@dataclass
class Setup:
    """What a run needs before training: teacher, data and their reference accuracies."""

    cfg: ExperimentConfig
    device: torch.device
    teacher: nn.Module
    in_channels: int
    val: Any
    test: Any
    data_meta: dict[str, Any]
    checkpoint_sha256: str | None
    teacher_val: dict[str, float]
    teacher_test: dict[str, float]
    teacher_latency_ms: float | None = None
    """FP forward time of the teacher measured by the caller (the search driver), else None."""


@dataclass(frozen=True)
class TeacherMetrics:
    """The teacher's figures, measured once (by the search driver) and handed to every trial."""

    val: dict[str, float]
    test: dict[str, float]
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"val": dict(self.val), "test": dict(self.test), "latency_ms": self.latency_ms}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherMetrics:
        lat = d.get("latency_ms")
        return cls(dict(d["val"]), dict(d["test"]), None if lat is None else float(lat))


def build_setup(cfg: ExperimentConfig, device: str | torch.device = "auto", *,
                teacher_state: Mapping[str, torch.Tensor] | None = None,
                teacher_sha256: str | None = None, teacher_metrics: TeacherMetrics | None = None) -> Setup:
    """Build the teacher and the evaluation data and measure the teacher once.

    ``teacher_state`` (from the search driver, through Ray's object store) skips loading or
    training the teacher again in every trial; ``teacher_metrics`` (measured once by the driver
    on the same data) skips evaluating it again.
    """
    from granq_search.data import build_eval_data
    from granq_search.models import build_teacher, create_model

    dev = resolve_device(device)
    cfg = resolve_config(cfg)
    in_channels = input_shape(cfg)[1]
    # data first: a wrong folder fails in a second, before any teacher is loaded or trained
    data = build_eval_data(cfg.data, mean=cfg.model.mean, std=cfg.model.std,
                           image_size=cfg.model.image_size, num_classes=cfg.model.num_classes)
    if teacher_state is not None:
        teacher = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
        teacher.load_state_dict(teacher_state)
        sha = teacher_sha256
    else:
        built = build_teacher(cfg.model, dev)
        teacher, sha = built.model, built.checkpoint_sha256
    teacher = teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if teacher_metrics is None:
        teacher_metrics = TeacherMetrics(evaluate(teacher, data.val, dev), evaluate(teacher, data.test, dev))
    return Setup(cfg=cfg, device=dev, teacher=teacher, in_channels=in_channels, val=data.val, test=data.test,
                 data_meta=dict(data.meta), checkpoint_sha256=sha, teacher_val=dict(teacher_metrics.val),
                 teacher_test=dict(teacher_metrics.test), teacher_latency_ms=teacher_metrics.latency_ms)


def latency_shape(cfg: ExperimentConfig, in_channels: int) -> tuple[int, int, int, int]:
    """The batch shape latencies are measured on (at most 32 images of the model's size)."""
    size = int(cfg.model.image_size)
    return (min(32, cfg.train.batch_size), in_channels, size, size)


def measure_latency(model: nn.Module, shape: tuple[int, ...], device: torch.device, repeats: int = 5) -> float:
    """Median forward time in milliseconds for one batch of ``shape`` (after one warm-up run)."""
    x = torch.zeros(shape, device=device)
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    model.train(was_training)
    return sorted(times)[len(times) // 2]


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    student: nn.Module
    best_student: nn.Module
    generator: nn.Module


def _check_finite(value: torch.Tensor, what: str, epoch: int, iteration: int) -> None:
    if not torch.isfinite(value):
        raise TrainingDiverged(
            f"training diverged: {what} is {value.item()} at epoch {epoch + 1}, iteration {iteration + 1}; "
            "lower optim.student.lr / optim.generator.lr or raise the bit-widths")


def qat_step(teacher: nn.Module, student: nn.Module, generator: nn.Module, opt_g: torch.optim.Optimizer,
             opt_s: torch.optim.Optimizer, z: torch.Tensor, y: torch.Tensor, cfg: ExperimentConfig, *,
             train_student: bool, where: tuple[int, int] = (0, 0)) -> dict[str, float]:
    """One iteration: a generator step on L_G, then (after warm-up) a student step on L_S.

    The student's logits on the generated images feed the generator loss (disagreement,
    agreement, margin); the student then learns on the detached images. Raises
    :class:`TrainingDiverged` on a non-finite loss.
    """
    clip = cfg.train.grad_clip
    images = generator(z, y)
    with bn_stats_recorder(teacher) as stats:
        z_t = teacher(images)
    z_s = student(images)
    loss_g, parts = generator_loss(z_t, z_s, y, bns_loss(stats), cfg.loss)
    _check_finite(loss_g, "the generator loss", *where)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(generator.parameters(), clip)
    opt_g.step()
    out = {k: float(parts[k]) for k in (M.G_TOTAL, M.G_MARGIN, M.G_CE, M.G_BNS)}
    out[M.S_LOSS] = 0.0
    if train_student:
        loss_s = student_loss(z_t.detach(), student(images.detach()), cfg.loss)
        _check_finite(loss_s, "the student loss", *where)
        opt_s.zero_grad(set_to_none=True)
        loss_s.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(student.parameters(), clip)
        opt_s.step()
        out[M.S_LOSS] = float(loss_s.detach())
    return out


def check_checkpoint_dir(checkpoint_dir: str | Path | None, resume: bool) -> None:
    """Raise :class:`GranqError` (one line) when ``resume`` finds no checkpoint in
    ``checkpoint_dir``, or when a fresh run would overwrite one there."""
    if resume and not has_checkpoint(checkpoint_dir):
        where = f"'{Path(checkpoint_dir) / LAST}' does not exist" if checkpoint_dir is not None else \
            "no checkpoint directory was given"
        raise GranqError(f"nothing to resume: {where}; drop --resume")
    if not resume and has_checkpoint(checkpoint_dir):
        raise GranqError(f"'{checkpoint_dir}' already holds a training checkpoint; pass --resume to "
                         "continue it or choose another output directory")


def run_training(
    cfg: ExperimentConfig,
    *,
    device: str | torch.device = "auto",
    reporter: Reporter | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    setup: Setup | None = None,
    eval_epochs: Collection[int] | None = None,
    measure_ptq: bool = True,
) -> TrainResult:
    """Run the generator + QAT pipeline; return the final metrics and the trained networks.

    ``checkpoint_dir``: where ``last.pt`` is written after every epoch (atomically); with
    ``resume=True`` training continues from it (a :class:`GranqError` when there is none, see
    :func:`check_checkpoint_dir`). Returns final metrics: validation and test
    top-1 of the final student and of the best-validation student, the teacher's, drops
    against full precision (points), efficiency figures and timings.

    ``eval_epochs``: the 1-based epochs after which the student is evaluated on the validation
    split (a search passes its scheduler's rung epochs); the last epoch always is. None: every
    epoch. Epochs not evaluated report no validation figures and cannot be the best epoch.
    ``measure_ptq``: evaluate the post-training (pre-QAT) student on validation and test.
    A run stopped early (:class:`StopTraining`) is not evaluated on the test split.
    """
    check_checkpoint_dir(checkpoint_dir, resume)
    reporter = reporter or NullReporter()
    if setup is None:
        setup = build_setup(cfg, device)
    if not is_resolved(cfg):
        cfg = resolve_config(cfg)
    if (cfg.model, cfg.data) != (setup.cfg.model, setup.cfg.data):
        raise ValueError("run_training: setup was built for another model/data config")
    dev, teacher = setup.device, setup.teacher
    tc = cfg.train
    num_classes = cfg.model.num_classes

    torch.manual_seed(tc.seed)
    sampler = torch.Generator().manual_seed(tc.seed)
    student, in_shape = build_student(cfg, dev, float_model=teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    generator = build_generator(cfg, dev, in_shape=in_shape)
    opt_s, opt_g = student_optimizer(cfg, student), generator_optimizer(cfg, generator)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.randn(n, cfg.generator.latent_dim, generator=sampler)
        y = torch.randint(0, num_classes, (n,), generator=sampler)
        return z.to(dev), y.to(dev)

    def generated() -> list[torch.Tensor]:
        generator.eval()
        with torch.no_grad():
            batches = [generator(*sample(tc.batch_size)) for _ in range(cfg.quant.calib_batches)]
        generator.train()
        return batches

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    start_epoch = 0
    history: list[dict[str, float]] = []
    best = {M.VAL_TOP1: -1.0, "epoch": -1}
    best_state: dict[str, torch.Tensor] | None = None
    ptq: dict[str, float] = {}
    resumed = False
    if resume and has_checkpoint(ckpt_dir):
        state = restore_training_state(ckpt_dir / LAST, student=student, generator=generator, opt_student=opt_s,
                                       opt_generator=opt_g, sampler=sampler)
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        best = dict(state["best"])
        best_state = state["best_student"]
        ptq = dict(state["ptq"])
        resumed = True
    else:
        calibrate_student(student, generated)
        if measure_ptq:
            ptq = {M.PTQ_VAL_TOP1: evaluate(student, setup.val, dev)["top1"],
                   M.PTQ_TEST_TOP1: evaluate(student, setup.test, dev)["top1"]}

    eff = efficiency_figures(student, in_shape)
    reporter.on_start({
        "config": flatten(cfg),
        M.TEACHER_VAL_TOP1: setup.teacher_val["top1"],
        M.TEACHER_TEST_TOP1: setup.teacher_test["top1"],
        "checkpoint_sha256": setup.checkpoint_sha256,
        "data": setup.data_meta,
        "efficiency": dict(eff),
        "start_epoch": start_epoch,
        "resumed": resumed,
        **ptq,
    })

    t_start = time.perf_counter()
    t_eval = 0.0
    evaluated = None if eval_epochs is None else {int(e) for e in eval_epochs} | {tc.epochs}
    last_val: dict[str, float] | None = None
    stopped_early = False
    for epoch in range(start_epoch, tc.epochs):
        t_epoch = time.perf_counter()
        warm = epoch < tc.warmup_epochs
        if epoch == tc.warmup_epochs and tc.warmup_epochs > 0 and needs_calibration(student):
            calibrate_student(student, generated)  # ranges and thresholds from the warmed-up generator
            eff = efficiency_figures(student, in_shape)
        student.train(tc.student_bn == "train")
        generator.train()
        sums = dict.fromkeys(M.EPOCH_LOSSES, 0.0)
        lr_s = lr_g = 0.0
        for it in range(tc.iters_per_epoch):
            lr_g = set_lr(opt_g, cfg.optim.generator.lr, lr_factor(cfg.optim, tc, epoch, it, student=False))
            lr_s = set_lr(opt_s, cfg.optim.student.lr, lr_factor(cfg.optim, tc, epoch, it, student=True))
            z, y = sample(tc.batch_size)
            parts = qat_step(teacher, student, generator, opt_g, opt_s, z, y, cfg, train_student=not warm,
                             where=(epoch, it))
            for k in sums:
                sums[k] += parts[k]
            reporter.on_iteration(epoch, it, parts)
        t_train = time.perf_counter() - t_epoch
        metrics: dict[str, Any] = {M.EPOCH: epoch + 1}
        last_val = None
        if evaluated is None or epoch + 1 in evaluated:
            t0 = time.perf_counter()
            val = evaluate(student, setup.val, dev)
            t_eval += time.perf_counter() - t0
            if not math.isfinite(val["loss"]):
                raise TrainingDiverged(f"training diverged: validation loss is {val['loss']} after epoch "
                                       f"{epoch + 1}; lower optim.student.lr or raise the bit-widths")
            if val["top1"] > best[M.VAL_TOP1]:
                best = {M.VAL_TOP1: val["top1"], "epoch": epoch}
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            last_val = val
            metrics.update({M.VAL_TOP1: val["top1"], M.VAL_TOP5: val["top5"], M.VAL_LOSS: val["loss"],
                            M.VAL_DROP: setup.teacher_val["top1"] - val["top1"], M.BEST_VAL_TOP1: best[M.VAL_TOP1]})
        metrics.update({
            M.WARMUP: 1.0 if warm else 0.0,
            M.LR_STUDENT: lr_s if not warm else 0.0,
            M.LR_GENERATOR: lr_g,
            M.EPOCH_TIME_S: time.perf_counter() - t_epoch,
            M.EPOCH_TRAIN_TIME_S: t_train,
            **{k: eff[k] for k in M.EPOCH_COSTS},
            **{k: v / tc.iters_per_epoch for k, v in sums.items()},
        })
        history.append(metrics)
        ckpt_path = None
        if ckpt_dir is not None:
            ckpt_path = save_training_state(ckpt_dir / LAST, epoch=epoch, student=student, generator=generator,
                                            opt_student=opt_s, opt_generator=opt_g, sampler=sampler,
                                            history=history, best=best, best_student=best_state, ptq=ptq,
                                            config=flatten(cfg))
        try:
            reporter.on_epoch_end(epoch, metrics, ckpt_path)
        except StopTraining:
            stopped_early = epoch + 1 < tc.epochs
            break

    t_final = time.perf_counter()
    # the last epoch's validation figures are those of the final student (same weights, same data)
    final_val = last_val if last_val is not None else evaluate(student, setup.val, dev)
    best_student = student
    best_is_final = best_state is None or best["epoch"] == history[-1][M.EPOCH] - 1
    if not best_is_final:
        best_student = copy.deepcopy(student)
        best_student.load_state_dict(best_state)
    t_val, t_test = setup.teacher_val["top1"], setup.teacher_test["top1"]
    tested: dict[str, float] = {}
    if not stopped_early:  # a run the scheduler stopped is not reported on the test split
        best_test = evaluate(best_student, setup.test, dev)
        final_test = best_test if best_is_final else evaluate(student, setup.test, dev)
        tested = {M.TEST_TOP1: final_test["top1"], M.TEST_TOP5: final_test["top5"],
                  M.BEST_TEST_TOP1: best_test["top1"], M.TEST_DROP: t_test - best_test["top1"]}
    eff = efficiency_figures(student, in_shape)
    lat_shape = latency_shape(cfg, setup.in_channels)
    t_eval += time.perf_counter() - t_final
    final: dict[str, Any] = {
        M.VAL_TOP1: final_val["top1"],
        M.VAL_TOP5: final_val["top5"],
        **tested,
        M.BEST_VAL_TOP1: best[M.VAL_TOP1],
        M.BEST_EPOCH: best["epoch"] + 1,
        M.TEACHER_VAL_TOP1: t_val,
        M.TEACHER_TEST_TOP1: t_test,
        M.VAL_DROP: t_val - best[M.VAL_TOP1],
        **ptq,
        M.EPOCHS_RUN: len(history),
        "stopped_early": stopped_early,
        M.TRAIN_TIME_S: time.perf_counter() - t_start,
        M.EVAL_TIME_S: t_eval,
        M.LATENCY_MS: measure_latency(student, lat_shape, dev),
        M.LATENCY_FP_MS: (setup.teacher_latency_ms if setup.teacher_latency_ms is not None
                          else measure_latency(teacher, lat_shape, dev)),
        "granularity_sites": site_report(student),
        **eff,
        "history": history,
    }
    reporter.on_end(final)
    return TrainResult(metrics=final, student=student, best_student=best_student, generator=generator)
