"""The Python API: quantize your own model, train one config, run a search.

::

    import granq_search

    # your nn.Module, fake-quantized (W4A4 GranQ by default); the model itself is not changed
    student = granq_search.quantize(model, {"weight": {"bits": 4}, "act": {"bits": 4}},
                                    example_input=torch.zeros(1, 3, 32, 32))

    # the `train` command: teacher, data, generator + QAT; returns the trained students and metrics
    result = granq_search.train("config.yaml", overrides={"train.epochs": 2})

    # the `search` command: Ray Tune + Optuna + MLflow; returns the SearchOutcome
    outcome = granq_search.search("space.yaml", num_samples=8, output_dir="runs/search")

A config names your own model and data by import path (``model.name: mymodels:small_cnn``,
``data.dataset: mydata:digits_eval``; see :mod:`granq_search.user_code`). ``train`` and ``search``
call the functions the commands call (:func:`granq_search.pipeline.trainer.build_setup` and
``run_training``; :func:`granq_search.search.runner.run_search`); the ``train`` command adds the run
folder and the MLflow record on top.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from granq_search.config import ExperimentConfig, QuantConfig, config_from_data, from_dict, load_config, with_overrides
from granq_search.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from granq_search.pipeline.reporter import Reporter
    from granq_search.pipeline.trainer import TrainResult
    from granq_search.search.runner import SearchOutcome
    from granq_search.search.space import SearchSpace

__all__ = ["quantize", "train", "search", "experiment_config", "ConfigLike"]

ConfigLike = Union[ExperimentConfig, Mapping[str, Any], str, Path]
"""An experiment config: the object, its plain data (sections; ``config_version`` and
``provenance`` of an exported config allowed), a YAML file, or a preset name."""


def experiment_config(config: ConfigLike, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The validated :class:`ExperimentConfig` of ``config`` with dotted ``overrides`` applied
    (``{"quant.act.bits": 3}``). Raises :class:`ConfigError` (one line) on any mistake."""
    wanted = dict(overrides) if overrides else None
    if isinstance(config, ExperimentConfig):
        return with_overrides(config, wanted) if wanted else config
    if isinstance(config, Mapping):
        return config_from_data(config, "the config mapping", wanted)
    if isinstance(config, (str, Path)):
        return load_config(config, wanted)
    raise TypeError(f"config must be an ExperimentConfig, a mapping, a YAML path or a preset name, "
                    f"not {type(config).__name__}")


def _quant_config(quant_config: QuantConfig | ExperimentConfig | Mapping[str, Any] | None) -> QuantConfig:
    if quant_config is None:
        return QuantConfig()
    if isinstance(quant_config, QuantConfig):
        return quant_config
    if isinstance(quant_config, ExperimentConfig):
        return quant_config.quant
    if isinstance(quant_config, Mapping):
        return from_dict(quant_config, QuantConfig, prefix="quant.")
    raise TypeError(f"quant_config must be a QuantConfig, an ExperimentConfig or a mapping, "
                    f"not {type(quant_config).__name__}")


def quantize(model: nn.Module, quant_config: QuantConfig | ExperimentConfig | Mapping[str, Any] | None = None, *,
             example_input: torch.Tensor | None = None, calibration_data: Iterable[Any] | None = None) -> nn.Module:
    """The fake-quantized student of ``model``: a new module, ``model`` itself is not changed.

    Every ``nn.Conv2d`` / ``nn.Linear`` gets weight fake quantization and every ReLU / ReLU6
    call site an activation quantizer (``quant.act.placement``), as in the GranQ pipeline
    (:func:`granq_search.quant.prepare`). ``model``'s forward must be traceable by
    ``torch.fx`` (no data-dependent control flow).

    ``quant_config``: a :class:`QuantConfig`, its plain data (``{"weight": {"bits": 4}, "act":
    {"bits": 4, "granularity": "per_sample_channel"}}``, checked strictly), an
    :class:`ExperimentConfig` (its ``quant`` section, e.g. a config exported by a search), or None
    (W4A4, GranQ per-(sample, channel) dynamic ranges).

    ``example_input``: a batch run once through the student (quantizers passing through) to
    check that it runs on inputs of that shape.

    ``calibration_data``: batches of inputs (tensors, ``(inputs, labels)`` pairs, or a
    ``DataLoader``) for the sites that take something from calibration: static ranges
    (``act.range_mode: static``) and threshold-selected granularity (``act.granularity:
    threshold``). At most ``calib_batches`` batches are read. Dynamic-range configs need none (it is
    then not read). A config that needs calibration without ``calibration_data`` is a
    :class:`ConfigError`.

    Returns a ``torch.fx.GraphModule`` on ``model``'s device and in its train/eval mode; train it
    further (QAT) or evaluate it like any module. :func:`granq_search.quant.site_report` and
    :func:`granq_search.quant.efficiency` describe it.
    """
    from torch import nn

    from granq_search.pipeline.build import calibrate_student, device_of
    from granq_search.quant import needs_calibration, prepare

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    qcfg = _quant_config(quant_config)
    student = prepare(model, qcfg, example_input=example_input)
    if needs_calibration(student):
        if calibration_data is None:
            raise ConfigError(f"act.range_mode '{qcfg.act.range_mode}' with act.granularity '{qcfg.act.granularity}' "
                              "takes ranges or thresholds from calibration; pass calibration_data (batches of inputs)",
                              field="quant")
        calibrate_student(student, lambda: itertools.islice(calibration_data, qcfg.calib_batches),
                          device=device_of(student))
    return student


def train(config: ConfigLike = "digits", *, overrides: Mapping[str, Any] | None = None,
          device: str | torch.device = "auto", checkpoint_dir: str | Path | None = None, resume: bool = False,
          progress: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Train one configuration, as the ``train`` command does: build the teacher and the
    validation/test data, measure the teacher, then the generator + QAT pipeline.

    ``config``: see :data:`ConfigLike` (default: the ``digits`` preset); ``overrides``: dotted
    paths, like ``--set`` (``{"train.epochs": 2}``). ``device``: ``auto`` (CUDA when present),
    ``cpu``, ``cuda:N``. ``checkpoint_dir``: where ``last.pt`` is written after every epoch; with
    ``resume=True`` training continues from it. ``progress``: a progress bar and a summary on
    stderr. ``reporter``: your own :class:`~granq_search.pipeline.reporter.Reporter` (per-epoch
    metrics, ...).

    Returns the trainer's :class:`~granq_search.pipeline.trainer.TrainResult`: ``metrics`` (final
    figures: validation/test top-1 of the final and best-validation students, the teacher's,
    ``val_drop``, efficiency, timings, ``history`` per epoch), ``student`` (last epoch),
    ``best_student`` (best validation epoch: the one to keep) and ``generator``. Unlike the
    command, nothing is written unless ``checkpoint_dir`` is given and nothing is recorded in
    MLflow (use ``granq-search train`` for the run folder and the MLflow record).
    """
    from granq_search.pipeline.reporter import CompositeReporter
    from granq_search.pipeline.terminal import TerminalReporter
    from granq_search.pipeline.trainer import build_setup, check_checkpoint_dir, run_training

    cfg = experiment_config(config, overrides)
    check_checkpoint_dir(checkpoint_dir, resume)  # before the teacher is built
    setup = build_setup(cfg, device)  # checks model, checkpoint and data before anything trains
    reporters: list[Reporter] = []
    if progress:  # first: it still shows the epoch after which ``reporter`` raises StopTraining
        reporters.append(TerminalReporter(progress=True, epochs=setup.cfg.train.epochs,
                                          iters_per_epoch=setup.cfg.train.iters_per_epoch))
    if reporter is not None:
        reporters.append(reporter)
    composite = CompositeReporter(reporters) if reporters else None
    return run_training(setup.cfg, device=setup.device, reporter=composite, checkpoint_dir=checkpoint_dir,
                        resume=resume, setup=setup)


def search(space: str | Path | SearchSpace | None = None, *, overrides: Mapping[str, Any] | None = None,
           name: str | None = None, output_dir: str | Path = "runs/search", num_samples: int | None = None,
           max_concurrent: int | None = None, cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0,
           address: str | None = None, storage_path: str | None = None, tracking_uri: str | None = None,
           experiment: str | None = None, resume: bool = False, progress: bool = True,
           dashboard: bool = False) -> SearchOutcome:
    """Run (or with ``resume`` continue) a search, as the ``search`` command does: the same
    checks before anything starts, Ray Tune trials proposed by Optuna and stopped early by ASHA,
    one MLflow parent run with a child per trial, the best configuration exported.

    ``space``: a search-space YAML, the name of a shipped one (``digits``, ...), or a loaded
    :class:`~granq_search.search.space.SearchSpace`; None: ``digits``. ``overrides``: like
    ``--set`` (a searched parameter given here is pinned). The other arguments are the
    command's flags: ``num_samples`` (default 8) and ``max_concurrent`` (default 2) trials,
    ``cpus_per_trial`` / ``gpus_per_trial``, ``address`` (None: Ray on this machine;
    ``auto``/``HOST:PORT``/``ray://HOST:PORT``: a cluster), ``storage_path`` (Ray results on
    shared storage), ``tracking_uri`` (default ``sqlite:///<output_dir>/mlflow.db``),
    ``experiment`` (the MLflow experiment; default ``$MLFLOW_EXPERIMENT_NAME``, else
    ``granq_search``), ``dashboard`` (start Ray's dashboard with a local Ray).

    A local search puts the folders of the modules named in the config (``model.name`` /
    ``data.dataset`` import paths) on the trials' ``PYTHONPATH``; on a cluster ship them with the
    job (``ray job submit --working-dir DIR`` or ``runtime_env={"py_modules": [...]}``).

    Returns the :class:`~granq_search.search.runner.SearchOutcome`: name, folder, status,
    trial counts, the Pareto front, the exported ``best_config`` path and the leaderboard text.
    """
    from granq_search.search.runner import run_search

    return run_search(space, name=name, output_dir=output_dir, num_samples=num_samples,
                      max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                      address=address, storage_path=storage_path, tracking_uri=tracking_uri, experiment=experiment,
                      resume=resume, set_overrides=dict(overrides) if overrides else None, progress=progress,
                      dashboard=dashboard)
