"""What a run builds from its config: the resolved config, the quantized student, the generator
and their optimizers.

The one chain config -> :func:`resolve_config` -> :func:`build_student` (``prepare``) ->
:func:`calibrate_student` -> :func:`efficiency_figures` shared by the trainer, the ``evaluate``
command, the search's cost estimate (``search/costs.py``) and the loading of a saved student
(``student_io``). Only the calibration batches differ: generated images (trainer), validation
batches (``evaluate``), noise (cost estimate; the costs do not depend on the values).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from granq_search.config import ExperimentConfig

__all__ = ["resolve_config", "is_resolved", "input_shape", "device_of", "build_student", "calibrate_student",
           "efficiency_figures", "build_generator", "student_optimizer", "generator_optimizer"]


def resolve_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill the model's normalisation and image size from the registry (recorded in the run)."""
    from granq_search.models import model_info

    info = model_info(cfg.model.name, cfg.model.num_classes)
    model = replace(
        cfg.model,
        mean=cfg.model.mean if cfg.model.mean is not None else tuple(info.mean),
        std=cfg.model.std if cfg.model.std is not None else tuple(info.std),
        image_size=cfg.model.image_size if cfg.model.image_size is not None else info.image_size,
    )
    return replace(cfg, model=model)


def is_resolved(cfg: ExperimentConfig) -> bool:
    """True when ``cfg`` needs no :func:`resolve_config` (normalisation and image size set)."""
    m = cfg.model
    return m.mean is not None and m.std is not None and m.image_size is not None


def input_shape(cfg: ExperimentConfig) -> tuple[int, int, int, int]:
    """``(1, C, S, S)``: one image of the model of a resolved ``cfg``."""
    from granq_search.models import model_info

    size = int(cfg.model.image_size)
    return (1, model_info(cfg.model.name, cfg.model.num_classes).in_channels, size, size)


def device_of(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (else first buffer); None when it holds no tensor."""
    home = next(itertools.chain(model.parameters(), model.buffers()), None)
    return home.device if home is not None else None


def build_student(cfg: ExperimentConfig, device: str | torch.device = "cpu", *,
                  float_model: nn.Module | None = None) -> tuple[nn.Module, tuple[int, int, int, int]]:
    """The quantized student of ``cfg`` (``prepare``, not calibrated), in eval mode on ``device``,
    and its input shape ``(1, C, H, W)``.

    ``float_model``: the float network to quantize (the teacher; it is copied, not changed).
    None: the architecture from the model registry with random weights (no checkpoint), for
    a student whose weights are loaded afterwards or whose costs alone are wanted.
    """
    from granq_search.models import create_model
    from granq_search.quant import prepare

    if not is_resolved(cfg):
        cfg = resolve_config(cfg)
    in_shape = input_shape(cfg)
    if float_model is None:
        float_model = create_model(cfg.model.name, num_classes=cfg.model.num_classes).eval()
    home = device_of(float_model)
    example = torch.zeros(in_shape, device=home if home is not None else torch.device("cpu"))
    student = prepare(float_model, cfg.quant, example_input=example)
    return student.to(device).eval(), in_shape


def calibrate_student(student: nn.Module, batches: Callable[[], Iterable[Any]], *,
                      device: torch.device | str | None = None) -> list[Any] | None:
    """Calibrate the sites that need it (static ranges, threshold decisions) on ``batches()``,
    drawn only then; returns the batches used, or None when no site needs calibration.
    ``device``: where the inputs are moved (None: used as given)."""
    from granq_search.quant import calibrate, needs_calibration

    if not needs_calibration(student):
        return None
    used = list(batches())
    calibrate(student, used, device=device)
    return used


def efficiency_figures(student: nn.Module, in_shape: tuple[int, ...]) -> dict[str, Any]:
    """The scalar figures of ``quant.efficiency`` (bitops, size_bits, ...; no per-layer lists)."""
    from granq_search.quant import efficiency

    return {k: v for k, v in efficiency(student, in_shape).items() if not isinstance(v, (list, dict))}


def build_generator(cfg: ExperimentConfig, device: str | torch.device = "cpu", *,
                    in_shape: tuple[int, int, int, int] | None = None) -> nn.Module:
    """The conditional generator of a resolved ``cfg``, for the model's classes, size and channels
    (``in_shape``: :func:`input_shape` of ``cfg`` when the caller has it already)."""
    from granq_search.generator import build_generator as generator_network

    _, chans, size, _ = in_shape if in_shape is not None else input_shape(cfg)
    return generator_network(cfg.generator, num_classes=cfg.model.num_classes, image_size=size,
                             channels=chans).to(device)


def student_optimizer(cfg: ExperimentConfig, student: nn.Module) -> torch.optim.Optimizer:
    """SGD over the student's weights (``optim.student``). Learning rates follow
    :func:`granq_search.pipeline.schedule.lr_factor`, set by the trainer at every iteration."""
    o = cfg.optim.student
    return torch.optim.SGD(student.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                           nesterov=o.nesterov)


def generator_optimizer(cfg: ExperimentConfig, generator: nn.Module) -> torch.optim.Optimizer:
    """Adam over the generator's weights (``optim.generator``)."""
    o = cfg.optim.generator
    return torch.optim.Adam(generator.parameters(), lr=o.lr, betas=(o.beta1, o.beta2))
