"""A trained student back from disk: config + weights -> the ready quantized ``nn.Module``.

``train`` writes ``config.yaml`` (the resolved config) and ``student_best.pt`` /
``student_final.pt`` (state dicts of the prepared student, activation-quantizer buffers
included: static ranges, threshold decisions).
:func:`granq_search.pipeline.build.build_student` rebuilds the same architecture from the config
alone (the float model from the registry, then ``prepare``, no teacher checkpoint needed) and
:func:`load_student_dir` loads the weights into it.

The MLflow model ``student`` that ``train`` logs carries the same two files (``extra_files``);
:func:`load_student_uri` downloads them from a model URI (``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``models:/<model id>``, ``runs:/<run id>/student``) and rebuilds the
student the same way: weights read with ``weights_only=True``, no pickle. :func:`load_student`
takes either a run folder or a model URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granq_search.config import ExperimentConfig, load_config
from granq_search.errors import CheckpointError, GranqError
from granq_search.pipeline.build import build_student

__all__ = ["load_student", "load_student_dir", "load_student_uri", "StudentBundle", "STUDENT_FILES"]

STUDENT_FILES = {"best": "student_best.pt", "final": "student_final.pt"}
"""Which student of a train run: the best-validation epoch's (the reported one) or the last."""


@dataclass
class StudentBundle:
    """A loaded student with the config it was trained with and where it came from."""

    model: nn.Module
    cfg: ExperimentConfig
    source: str
    in_shape: tuple[int, int, int, int]


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
    return _load(cfg_path, weights, str(root), device)


def _load(cfg_path: Path, weights: Path, source: str, device: str | torch.device) -> StudentBundle:
    cfg = load_config(cfg_path)
    student, in_shape = build_student(cfg, "cpu")
    try:
        state: dict[str, Any] = torch.load(weights, map_location="cpu", weights_only=True)
        student.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{weights}: does not fit the student of {cfg_path.name} ({first})") from None
    return StudentBundle(model=student.to(device).eval(), cfg=cfg, source=source, in_shape=in_shape)


MODEL_URI_SCHEMES = ("models:", "runs:")


def is_model_uri(source: str | Path) -> bool:
    """``models:/...``, ``runs:/...`` or any other ``scheme://`` artifact URI (not a local folder)."""
    s = str(source)
    return s.startswith(MODEL_URI_SCHEMES) or ("://" in s and not s.startswith("file://") and not Path(s).exists())


def load_student_uri(model_uri: str, *, device: str | torch.device = "cpu", tracking_uri: str | None = None,
                     registry_uri: str | None = None) -> StudentBundle:
    """The student of an MLflow model logged by ``train``, rebuilt from its ``config.yaml`` and
    ``student_best.pt`` (the model's ``extra_files``), in eval mode.

    ``tracking_uri`` / ``registry_uri``: the store (default: MLflow's own resolution,
    ``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri``); the registry defaults to the
    tracking store when only ``tracking_uri`` is given. One-line :class:`GranqError` when the
    model cannot be found or was not logged by ``train``.
    """
    import tempfile

    from granq_search.tracking.train_model import download_student_files

    with tempfile.TemporaryDirectory(prefix="granq_student_") as tmp:
        cfg_path, weights = download_student_files(model_uri, tmp, tracking_uri=tracking_uri,
                                                   registry_uri=registry_uri)
        return _load(cfg_path, weights, model_uri, device)


def load_student(source: str | Path, *, which: str = "best", device: str | torch.device = "cpu",
                 tracking_uri: str | None = None, registry_uri: str | None = None) -> nn.Module:
    """The ready quantized student, in eval mode, from a ``train`` run folder or an MLflow model URI.

    Examples::

        load_student("runs/train/digits-20250101-120000")        # a run folder
        load_student("models:/granq_digits/1")                     # the Model Registry
        load_student(f"runs:/{run_id}/student", tracking_uri="sqlite:///runs/train/mlflow.db")

    ``which``: ``best`` (the best-validation epoch's student, the reported one and the one
    logged to MLflow) or ``final`` (run folders only). The model takes normalised images
    (``cfg.model.mean`` / ``std`` of its config) and returns logits.
    """
    if is_model_uri(source):
        if which != "best":
            raise GranqError(f"which={which!r}: an MLflow model holds the best-validation student only; "
                             "use which='best' or load the run folder")
        return load_student_uri(str(source), device=device, tracking_uri=tracking_uri,
                                registry_uri=registry_uri).model
    return load_student_dir(source, which=which, device=device).model
