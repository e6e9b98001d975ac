"""Loading teacher weights from checkpoint files, with one-line errors a user can act on.

Accepted layouts (what circulates in practice):

- a raw state dict ``{name: tensor}``;
- ``{"state_dict": {...}, ...}`` (e.g. ``{"best_prec1": 91.78, "state_dict": ...}``);
- ``{"model": {...}, ...}`` (also ``model_state_dict`` / ``model_state``);
- keys with a ``module.`` prefix (saved from ``DataParallel``) or ``_orig_mod.``
  (``torch.compile``) prefix.

Files are read with ``torch.load(..., map_location="cpu", weights_only=True)``: no arbitrary
code runs. BatchNorm ``num_batches_tracked`` counters are optional on both sides (older
checkpoints do not have them and evaluation does not use them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from granq_search.errors import CheckpointError
from granq_search.user_code import first_line

__all__ = ["load_checkpoint", "read_state_dict", "load_state_dict_into", "sha256_file"]

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "model_state")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 4  # names listed per category in a mismatch error


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped and with prefixes stripped."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint file '{path}' does not exist; check model.checkpoint")
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a file; pass the path of a .pt/.pth/.th file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ValueError, ...
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint ({first_line(e)}); "
                              "pass a file saved with torch.save(model.state_dict(), ...)") from None
    return _unwrap(obj, str(path))


def _unwrap(obj: object, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"'{where}' holds a {type(obj).__name__}, not a state dict; "
                              "pass a file saved with torch.save(model.state_dict(), ...)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'{where}' is not a mapping of tensors (e.g. '{bad[0]}' is a "
                              f"{type(obj[bad[0]]).__name__}) and has no 'state_dict' or 'model' entry; "
                              "pass a file saved with torch.save(model.state_dict(), ...)")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        name = str(k)
        for prefix in _PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = v
    return out


def _optional(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (", ..." if len(names) > _SHOW else "")


def _count(items: list, noun: str, plural: str = "s") -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else plural}"


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                         source: str, name: str | None = None) -> None:
    """Copy ``state_dict`` into ``model``, or raise ONE error describing every mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not _optional(k)]
    unexpected = [k for k in state_dict if k not in own and not _optional(k)]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{_count(missing, 'missing key')} ({_listing(missing)})")
        if unexpected:
            parts.append(f"{_count(unexpected, 'unexpected key')} ({_listing(unexpected)})")
        if shapes:
            parts.append(f"{_count(shapes, 'shape mismatch', 'es')} ({_listing(shapes)})")
        what = f"model '{name}'" if name else f"the {type(model).__name__} architecture"
        raise CheckpointError(f"{source} does not fit {what}: {'; '.join(parts)}; "
                              "check model.name and model.num_classes match the checkpoint")
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)


def load_checkpoint(model: nn.Module, path: str | Path, *, name: str | None = None) -> str:
    """Load the weights in ``path`` into ``model`` (in place); return the file's sha256 hex."""
    state = read_state_dict(path)
    load_state_dict_into(model, state, source=f"checkpoint '{path}'", name=name)
    return sha256_file(path)
