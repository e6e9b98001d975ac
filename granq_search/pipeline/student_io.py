"""A trained student back from disk: config + weights -> the ready quantized ``nn.Module``.

``train`` writes ``config.yaml`` (the resolved config) and ``student_best.pt`` /
``student_final.pt`` (state dicts of the prepared student, activation-quantizer buffers
included: static ranges, threshold decisions). :func:`build_student` rebuilds the same
architecture from the config alone (the float model from the registry, then ``prepare``, no
teacher checkpoint needed) and :func:`load_student_dir` loads the weights into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granq_search.config import ExperimentConfig, load_config
from granq_search.errors import CheckpointError, GranqError

__all__ = ["build_student", "load_student_dir", "StudentBundle", "STUDENT_FILES"]

STUDENT_FILES = {"best": "student_best.pt", "final": "student_final.pt"}
"""Which student of a train run: the best-validation epoch's (the reported one) or the last."""


@dataclass
class StudentBundle:
    """A loaded student with the config it was trained with and where it came from."""

    model: nn.Module
    cfg: ExperimentConfig
    source: str
    in_shape: tuple[int, int, int, int]


def build_student(cfg: ExperimentConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, tuple[int, ...]]:
    """The untrained quantized student of ``cfg`` (weights to be loaded) and its input shape
    ``(1, C, H, W)``. The float model comes from the model registry without its checkpoint."""
    from granq_search.models import create_model, model_info
    from granq_search.pipeline.trainer import resolve_config
    from granq_search.quant import prepare

    cfg = resolve_config(cfg)
    info = model_info(cfg.model.name, cfg.model.num_classes)
    size = int(cfg.model.image_size)
    in_shape = (1, info.in_channels, size, size)
    float_model = create_model(cfg.model.name, num_classes=cfg.model.num_classes).eval()
    student = prepare(float_model, cfg.quant, example_input=torch.zeros(in_shape))
    return student.to(device).eval(), in_shape


def load_student_dir(run_dir: str | Path, *, which: str = "best",
                     device: str | torch.device = "cpu") -> StudentBundle:
    """The student of a ``train`` run directory (``config.yaml`` + ``student_<which>.pt``), in
    eval mode. Raises :class:`GranqError` (one line) when the folder is not a finished run."""
    if which not in STUDENT_FILES:
        raise GranqError(f"which={which!r}: choose one of {', '.join(STUDENT_FILES)}")
    root = Path(run_dir)
    cfg_path, weights = root / "config.yaml", root / STUDENT_FILES[which]
    if not cfg_path.is_file() or not weights.is_file():
        missing = cfg_path if not cfg_path.is_file() else weights
        raise GranqError(f"'{root}' is not a finished train run ({missing.name} is missing); give the "
                         "--output-dir of a `train` run that completed")
    cfg = load_config(cfg_path)
    student, in_shape = build_student(cfg, "cpu")
    try:
        state: dict[str, Any] = torch.load(weights, map_location="cpu", weights_only=True)
        student.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{weights}: does not fit the student of {cfg_path.name} ({first})") from None
    return StudentBundle(model=student.to(device).eval(), cfg=cfg, source=str(root), in_shape=in_shape)
