"""The full-precision teacher: architecture + weights + the input facts it was trained with.

Where the weights come from, in order:

1. ``model.checkpoint`` (a local file; its sha256 is recorded);
2. the digits models (``digits_cnn``, ``tiny_test``) train on the spot on the digits TRAIN split
   (seeded, a few seconds on CPU) and are cached at ``<cache_dir>/<name>-<hash>.pt``, where the
   hash covers the training images and labels and the training recipe; concurrent processes
   (Ray trials) may race to write it, so it is written to a private temporary file and renamed;
3. published weights (torchvision / pytorchcv) when ``model.pretrained`` is true; offline this
   is a one-line :class:`ModelError` asking for ``model.checkpoint=PATH``;
4. ``model.pretrained=false``: random initialisation (useful for tests only).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from granq_search.config import ModelConfig
from granq_search.errors import CheckpointError, ModelError
from granq_search.models.checkpoint import load_checkpoint
from granq_search.models.registry import create_model, model_info, pretrained_loader
from granq_search.models.spec import ModelInfo

__all__ = ["Teacher", "build_teacher", "teacher_info", "default_cache_dir", "trained_digits_teacher"]

_TRAINED_ON_THE_SPOT = ("digits_cnn", "tiny_test")


@dataclass
class Teacher:
    model: nn.Module
    """In eval mode, ``requires_grad`` False everywhere, on the requested device."""
    info: ModelInfo
    """Registry facts with ``model.mean``/``std``/``image_size``/``num_classes`` applied."""
    checkpoint_sha256: str | None
    """sha256 of the weights file (given checkpoint or cached digits teacher); None otherwise."""
    source: str
    """Where the weights came from, in words."""


def default_cache_dir() -> Path:
    env = os.environ.get("GRANQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "granq_search"


def teacher_info(cfg: ModelConfig) -> ModelInfo:
    """The registry facts with the config's overrides applied (no weights are touched)."""
    info = model_info(cfg.name, cfg.num_classes)
    changes: dict = {}
    for key in ("mean", "std"):
        value = getattr(cfg, key)
        if value is not None:
            if len(value) != info.in_channels:
                raise ModelError(f"model.{key} has {len(value)} values but '{cfg.name}' takes "
                                 f"{info.in_channels} input channel(s); give {info.in_channels} values")
            changes[key] = tuple(float(v) for v in value)
    if cfg.image_size is not None:
        changes["image_size"] = int(cfg.image_size)
    return dataclasses.replace(info, **changes) if changes else info


def build_teacher(cfg: ModelConfig, device: torch.device | str = "cpu",
                  cache_dir: str | Path | None = None) -> Teacher:
    """Build the FP teacher described by ``cfg`` (see the module docstring for weight sources)."""
    info = teacher_info(cfg)
    sha: str | None = None
    if cfg.checkpoint:
        model = create_model(cfg.name, cfg.num_classes)
        sha = load_checkpoint(model, cfg.checkpoint, name=cfg.name)
        source = f"checkpoint {cfg.checkpoint}"
    elif not cfg.pretrained:
        model = create_model(cfg.name, cfg.num_classes)
        source = "random initialisation (model.pretrained=false)"
    elif cfg.name in _TRAINED_ON_THE_SPOT:
        model, sha, path = trained_digits_teacher(cfg.name, cfg.num_classes, cache_dir)
        source = f"trained on the digits train split (cached at {path})"
    else:
        loader = pretrained_loader(cfg.name)
        if loader is None:
            raise ModelError(f"model '{cfg.name}' has no published weights to download; pass "
                             "model.checkpoint=PATH (or model.pretrained=false for random weights)")
        model = loader(cfg.num_classes)
        source = f"published weights for {cfg.name}"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model=model, info=info, checkpoint_sha256=sha, source=source)


# --------------------------------------------------------------------------- digits teacher


def _digits_cache_key(model: nn.Module, name: str, num_classes: int, images: torch.Tensor,
                      labels: torch.Tensor, recipe: dict) -> str:
    """Covers the training data bytes, the recipe and the architecture (names and shapes)."""
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    h = hashlib.sha256()
    h.update(json.dumps({"model": name, "num_classes": num_classes, "recipe": recipe, "layout": layout},
                        sort_keys=True).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def trained_digits_teacher(name: str = "digits_cnn", num_classes: int = 10,
                           cache_dir: str | Path | None = None) -> tuple[nn.Module, str, Path]:
    """(model, sha256 of the cached weights file, its path); trains and caches on a miss."""
    from granq_search.data.digits import digits_train_split
    from granq_search.models.digits import DIGITS_MEAN, DIGITS_RECIPE, DIGITS_STD, train_digits_model

    if num_classes != 10:
        raise ModelError(f"the on-the-spot {name} teacher learns the 10 digit classes, not {num_classes}; "
                         "set model.num_classes=10 or pass model.checkpoint=PATH")
    images, labels = digits_train_split()
    recipe = dict(DIGITS_RECIPE)
    model = create_model(name, num_classes)
    key = _digits_cache_key(model, name, num_classes, images, labels, recipe)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{name}-{key}.pt"
    if path.is_file():
        try:
            return model, load_checkpoint(model, path, name=name), path
        except CheckpointError:
            pass  # a damaged cache entry: train again and replace it
    mean = torch.tensor(DIGITS_MEAN).view(1, -1, 1, 1)
    std = torch.tensor(DIGITS_STD).view(1, -1, 1, 1)
    trained = train_digits_model(lambda: create_model(name, num_classes), (images - mean) / std, labels, recipe)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Serialise in memory first: torch.save names the archive after the file, and the bytes
        # (hence the sha256) must not depend on the temporary name.
        buffer = io.BytesIO()
        torch.save(trained.state_dict(), buffer)
        tmp = directory / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(buffer.getvalue())
            os.replace(tmp, path)  # atomic: a racing process sees no file or a complete one
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise ModelError(f"cannot write the digits teacher cache in '{directory}' ({e}); "
                         "set GRANQ_CACHE_DIR to a writable folder") from None
    return model, load_checkpoint(model, path, name=name), path
