"""Training checkpoints: written atomically at the end of each epoch, read back for resume.

A checkpoint holds everything the next epoch depends on: student, generator, both optimizers,
every RNG state, the epoch counter, the best-validation student and the history. Learning
rates are a pure function of (epoch, iteration) and the config (see ``schedule.py``), so the
schedule needs no state of its own. The resolved config is stored too (nanoGPT-style).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from granq_search.errors import CheckpointError

__all__ = ["save_checkpoint", "load_training_checkpoint", "save_training_state", "restore_training_state",
           "rng_state", "set_rng_state", "has_checkpoint", "LAST"]

LAST = "last.pt"


def has_checkpoint(checkpoint_dir: str | Path | None) -> bool:
    """True when ``checkpoint_dir`` holds a training checkpoint (``last.pt``)."""
    return checkpoint_dir is not None and (Path(checkpoint_dir) / LAST).is_file()


def rng_state(sampler: torch.Generator) -> dict[str, Any]:
    state: dict[str, Any] = {
        "sampler": sampler.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], sampler: torch.Generator) -> None:
    sampler.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(st: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = st
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _to_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_training_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Every entry (RNG states included) is stored as tensors and plain Python values, so the
    file loads with ``weights_only=True`` like every other checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training checkpoint at '{path}'; start without --resume")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise CheckpointError(f"training checkpoint '{path}' is unreadable ({type(exc).__name__}); "
                              "delete it to start over") from None
    if not isinstance(payload, dict) or "epoch" not in payload or "student" not in payload:
        raise CheckpointError(f"'{path}' is not a granq_search training checkpoint; delete it to start over")
    return payload


def save_training_state(path: Path, *, epoch: int, student: nn.Module, generator: nn.Module,
                        opt_student: torch.optim.Optimizer, opt_generator: torch.optim.Optimizer,
                        sampler: torch.Generator, history: list[dict[str, Any]], best: dict[str, Any],
                        best_student: dict[str, torch.Tensor] | None, ptq: dict[str, float],
                        config: dict[str, Any]) -> Path:
    """The checkpoint of the trainer after ``epoch`` (0-based), written with :func:`save_checkpoint`."""
    return save_checkpoint(path, {
        "epoch": epoch,
        "student": student.state_dict(),
        "generator": generator.state_dict(),
        "opt_student": opt_student.state_dict(),
        "opt_generator": opt_generator.state_dict(),
        "rng": rng_state(sampler),
        "history": history,
        "best": best,
        "best_student": best_student,
        "ptq": ptq,
        "config": config,
    })


def restore_training_state(path: Path, *, student: nn.Module, generator: nn.Module,
                           opt_student: torch.optim.Optimizer, opt_generator: torch.optim.Optimizer,
                           sampler: torch.Generator) -> dict[str, Any]:
    """Load the networks, optimizers and RNG states of a :func:`save_training_state` checkpoint;
    returns the whole checkpoint (epoch, history, best, best_student, ptq)."""
    state = load_training_checkpoint(path)
    student.load_state_dict(state["student"])
    generator.load_state_dict(state["generator"])
    opt_student.load_state_dict(state["opt_student"])
    opt_generator.load_state_dict(state["opt_generator"])
    set_rng_state(state["rng"], sampler)
    return state
