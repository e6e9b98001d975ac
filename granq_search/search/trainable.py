"""The Ray Tune function trainable: one trial = one GranQ run at search fidelity.

``make_trainable(...)`` wraps :func:`train_trial` with ``tune.with_parameters`` (the teacher's
weights go through the object store once, not inside every trial's config) and
``tune.with_resources`` (CPUs and fractional GPUs per trial).

Inside a trial:

1. the full :class:`ExperimentConfig` is built by the driver's
   :class:`~granq_search.search.space_model.TrialConfig` (the search base: base + fidelity, paths
   already absolute; it reaches the trial as plain data, ``base_cfg``) from the proposed values,
   and validated before any tensor is allocated: the config the MLflow record logs;
2. the device is the one Ray assigned: ``resolve_device('auto')`` sees only the GPUs in
   ``CUDA_VISIBLE_DEVICES`` (Ray sets it) and falls back to the CPU where torch has no CUDA;
3. torch uses as many threads as the trial was given CPUs;
4. a restarted trial (worker died, ``--resume``) copies ``last.pt`` from ``tune.get_checkpoint()``
   into a private folder and continues with ``run_training(..., resume=True)``; one that had
   already ended before a killed driver's last snapshot is replayed instead
   (:func:`~granq_search.search.resume.replay_finished`, step 6 of :mod:`granq_search.search.resume`);
5. every epoch goes to Ray through :class:`~granq_search.search.report.RayReporter`.

Failures that would only repeat themselves (``TrainingDiverged`` and other
:class:`~granq_search.errors.GranqError`, out of memory) end the trial with a ``failure_reason`` report
rather than an exception: Ray retries exceptions up to ``FailureConfig.max_failures`` times
(it cannot tell a NaN from a lost node), so only worker deaths and unexpected errors are retried.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from granq_search.search.resume import replay_finished
from granq_search.search.space_model import TrialConfig

__all__ = ["train_trial", "make_trainable", "is_out_of_memory", "failure_message", "threads_for_cpus"]

def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError))


def failure_message(err: BaseException) -> str:
    first = " ".join(str(err).split()) or type(err).__name__
    if is_out_of_memory(err):
        return f"out of memory ({type(err).__name__}): {first}; lower data.batch_size / train.batch_size or " \
               "give each trial more GPU memory (--gpus-per-trial)"
    return first


def threads_for_cpus(cpus: float | None) -> int:
    """torch CPU threads of a trial given ``cpus`` CPUs (at least 1). The driver records it on
    the search's MLflow run (``granq.trial_threads``) so that ``export`` + ``train`` can rerun a
    trial with the same thread count: on CPU, a different count changes the float summation
    order and so the trained network."""
    return max(1, int(math.floor(cpus))) if cpus else 1


def _trial_threads() -> int | None:
    try:
        from ray import tune

        cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 0)
    except Exception:  # outside a trial (tests): leave torch's default
        return None
    return threads_for_cpus(cpus)


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


def train_trial(config: Mapping[str, Any], *, base_cfg: Mapping[str, Any],
                teacher_state: Mapping[str, Any] | None = None, teacher_sha256: str | None = None,
                replay: Mapping[str, Mapping[str, Any]] | None = None,
                teacher_metrics: Mapping[str, Any] | None = None,
                eval_epochs: Sequence[int] | None = None) -> None:
    """Ray Tune function trainable (see the module docstring). ``config``: dotted path -> value;
    ``replay``: final results of trials that already ended
    (:func:`~granq_search.search.resume.replay_finished`);
    ``teacher_metrics``: the teacher's accuracies (and FP latency) measured once by the driver;
    ``eval_epochs``: the epochs to validate after (the scheduler's rungs and the last one)."""
    import torch
    from ray import tune

    from granq_search.config import from_dict
    from granq_search.errors import GranqError
    from granq_search.pipeline.checkpoint import LAST
    from granq_search.pipeline.trainer import TeacherMetrics, build_setup, resolve_device, run_training
    from granq_search.search.report import RayReporter

    if replay_finished(replay):
        return
    threads = _trial_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    device = resolve_device("auto")
    workdir = Path(tempfile.mkdtemp(prefix="granq-trial-"))
    reporter: RayReporter | None = None
    try:
        try:
            cfg = TrialConfig(from_dict(dict(base_cfg)))(config)
        except GranqError as e:
            RayReporter(1).report_failure(f"invalid config: {e}")
            return
        reporter = RayReporter(cfg.train.epochs, extra={"node_id": _node_id(), "device": str(device)})
        resume = False
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                src = Path(d) / LAST
                if src.is_file():
                    shutil.copy2(src, workdir / LAST)
                    resume = True
        try:
            metrics = TeacherMetrics.from_dict(teacher_metrics) if teacher_metrics else None
            if metrics is not None and device.type != "cpu":  # the driver measured FP latency on a CPU
                metrics = TeacherMetrics(metrics.val, metrics.test, None)
            setup = build_setup(cfg, device, teacher_state=teacher_state, teacher_sha256=teacher_sha256,
                                teacher_metrics=metrics)
            run_training(setup.cfg, device=device, reporter=reporter, checkpoint_dir=workdir, resume=resume,
                         setup=setup, eval_epochs=eval_epochs, measure_ptq=False)
        except GranqError as e:
            reporter.report_failure(failure_message(e))
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            reporter.report_failure(failure_message(e))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def make_trainable(trials: TrialConfig, *, teacher_state: Mapping[str, Any] | None,
                   teacher_sha256: str | None, cpus_per_trial: float, gpus_per_trial: float,
                   function=None, replay: Mapping[str, Mapping[str, Any]] | None = None,
                   teacher_metrics: Mapping[str, Any] | None = None, eval_epochs: Sequence[int] | None = None):
    """``tune.with_resources(tune.with_parameters(train_trial, ...), {"cpu": c, "gpu": g})``.

    ``trials`` builds every trial's config (the one the MLflow recorder is given); its search base
    reaches the trials as plain data (``base_cfg``). ``function`` replaces :func:`train_trial`
    (same keyword parameters); for embedding and tests.
    """
    from ray import tune

    from granq_search.config import to_dict

    fn = function or train_trial
    extra: dict[str, Any] = {}
    if teacher_metrics is not None:
        extra["teacher_metrics"] = dict(teacher_metrics)
    if eval_epochs is not None:
        extra["eval_epochs"] = list(eval_epochs)
    wrapped = tune.with_parameters(fn, base_cfg=to_dict(trials.search_base), teacher_state=teacher_state,
                                   teacher_sha256=teacher_sha256, replay=dict(replay or {}), **extra)
    return tune.with_resources(wrapped, {"cpu": float(cpus_per_trial), "gpu": float(gpus_per_trial)})
