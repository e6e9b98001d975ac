"""Your own evaluation data: ``data.dataset: MODULE:FACTORY``.

The contract of the factory:

- it is called with the keyword arguments it declares among ``root`` (``data.root``, or None),
  ``image_size``, ``in_channels``, ``mean``, ``std`` (the teacher's normalisation) and
  ``num_classes`` (``model.num_classes``); a factory with ``**kwargs`` gets them all;
- it returns labelled data the teacher can read, in one of two forms:

  * one ``torch.utils.data.Dataset`` (``len`` and ``ds[i] -> (image, label)``): granq_search
    splits it into validation and test exactly as the built-in datasets (a permutation seeded
    with ``data.split_seed``, ``data.val_fraction`` of it for validation, ``data.max_samples``
    keeping a random subset first);
  * a mapping ``{"val": Dataset, "test": Dataset}``: your own split, used as given
    (``data.max_samples`` keeps a seeded random subset of each, in proportion);

- an ``image`` is a float tensor ``(in_channels, image_size, image_size)``, already normalised the
  way the teacher expects (the ``mean``/``std`` it is given); a ``label`` is an ``int`` (or a 0-d
  tensor) in ``[0, num_classes)``.

There is no ``train`` entry: the pipeline is zero-shot (the generator replaces training data).
Validation data ranks epochs and trials and calibrates post-training quantization; test data is
only reported. Loaders use ``data.batch_size`` and ``data.num_workers``, without shuffling. Every
mistake is a one-line :class:`DataError` (or :class:`ConfigError` for the import path) naming
the factory.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from granq_search.config import DataConfig
from granq_search.data.datasets import _loader, _meta, split_indices
from granq_search.errors import DataError
from granq_search.user_code import call_with_accepted, first_line, resolve_callable

__all__ = ["build_custom_data", "SPLIT_KEYS"]

SPLIT_KEYS = ("val", "test")
_FIELD = "data.dataset"


def build_custom_data(cfg: DataConfig, *, mean: Sequence[float], std: Sequence[float], image_size: int,
                      num_classes: int) -> tuple[DataLoader, DataLoader, dict[str, Any]]:
    """(val loader, test loader, meta) from the factory named by ``cfg.dataset``."""
    spec = cfg.dataset
    factory = resolve_callable(spec, field=_FIELD)
    offered = {"root": cfg.root, "image_size": int(image_size), "in_channels": len(mean),
               "mean": tuple(mean), "std": tuple(std), "num_classes": int(num_classes)}
    try:
        made = call_with_accepted(factory, offered, spec=spec, field=_FIELD)
    except OSError as e:  # a missing or unreadable file: the user's to fix (other errors keep their traceback)
        raise DataError(f"data factory '{spec}' cannot read its data ({first_line(e)}); "
                        "check data.root") from None
    extra: dict[str, Any] = {"source": f"data factory {spec}"}
    if isinstance(made, Mapping):
        val, test = _given_splits(made, spec)
        _check_classes(made["val"], num_classes, spec)
        val, test = _cap(val, test, cfg)
        n_total = len(val) + len(test)
        extra["splits"] = "given"
    else:
        full = _dataset(made, spec, "the factory's result")
        n_total = len(full)
        val_idx, test_idx = split_indices(n_total, cfg.val_fraction, cfg.split_seed, cfg.max_samples)
        val, test = Subset(full, val_idx.tolist()), Subset(full, test_idx.tolist())
        if cfg.max_samples is not None:
            n_total = len(val) + len(test)
        extra["splits"] = "seeded"
        _check_classes(made, num_classes, spec)
    for name, part in (("val", val), ("test", test)):
        _check_item(part, name, spec, len(mean), int(image_size), int(num_classes))
    meta = _meta(cfg, cfg.root, n_total, len(val), len(test), **extra)
    return _loader(val, cfg, cfg.num_workers), _loader(test, cfg, cfg.num_workers), meta


def _dataset(obj: Any, spec: str, what: str) -> Any:
    if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")) or isinstance(obj, (str, bytes)):
        raise DataError(f"data factory '{spec}': {what} is a {type(obj).__name__}; return a torch Dataset of "
                        "(image, label) pairs or a mapping {'val': Dataset, 'test': Dataset}")
    n = len(obj)
    if n < 1:
        raise DataError(f"data factory '{spec}': {what} is empty; return labelled images")
    return obj


def _given_splits(made: Mapping[Any, Any], spec: str) -> tuple[Any, Any]:
    keys = set(made)
    if keys != set(SPLIT_KEYS):
        extra = sorted(str(k) for k in keys - set(SPLIT_KEYS))
        missing = [k for k in SPLIT_KEYS if k not in keys]
        parts = []
        if missing:
            parts.append(f"lacks {', '.join(repr(k) for k in missing)}")
        if extra:
            parts.append(f"has {', '.join(repr(k) for k in extra)}")
        note = " (no training data is used: the pipeline is zero-shot)" if "train" in extra else ""
        raise DataError(f"data factory '{spec}': the mapping it returned {' and '.join(parts)}{note}; return exactly "
                        "{'val': Dataset, 'test': Dataset}, or one Dataset for granq_search to split")
    return _dataset(made["val"], spec, "'val'"), _dataset(made["test"], spec, "'test'")


def _cap(val: Any, test: Any, cfg: DataConfig) -> tuple[Any, Any]:
    """``data.max_samples`` on given splits: a seeded random subset of each, in proportion."""
    n_val, n_test = len(val), len(test)
    if cfg.max_samples is None or n_val + n_test <= cfg.max_samples:
        return val, test
    k_val = min(max(int(round(cfg.max_samples * n_val / (n_val + n_test))), 1), cfg.max_samples - 1)
    k_test = cfg.max_samples - k_val
    gen = torch.Generator().manual_seed(int(cfg.split_seed))

    def pick(ds: Any, n: int, k: int) -> Subset:
        return Subset(ds, torch.randperm(n, generator=gen)[:k].sort().values.tolist())

    return pick(val, n_val, k_val), pick(test, n_test, k_test)


def _check_classes(ds: Any, num_classes: int, spec: str) -> None:
    classes = getattr(ds, "classes", None)
    if isinstance(classes, Sequence) and not isinstance(classes, str) and len(classes) != num_classes:
        raise DataError(f"data factory '{spec}' has {len(classes)} classes but the model head has {num_classes} "
                        f"(model.num_classes); use data that matches the model")


def _check_item(ds: Any, split: str, spec: str, channels: int, size: int, num_classes: int) -> None:
    """The first item of ``ds`` must be what the teacher reads: (image (C, S, S) float, label)."""
    try:
        item = ds[0]
    except Exception as e:  # noqa: BLE001 - the user's dataset raised
        raise DataError(f"data factory '{spec}': reading {split}[0] failed ({first_line(e)})") from None
    where = f"data factory '{spec}': {split}[0]"
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where} is a {type(item).__name__}; items must be (image, label) pairs")
    image, label = item[0], item[1]
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        what = f"a {image.dtype} tensor" if isinstance(image, torch.Tensor) else f"a {type(image).__name__}"
        raise DataError(f"{where}: the image is {what}; return a normalised float tensor (C, H, W), e.g. with "
                        "transforms.ToTensor() and transforms.Normalize(mean, std)")
    if tuple(image.shape) != (channels, size, size):
        raise DataError(f"{where}: the image has shape {tuple(image.shape)} but the model reads "
                        f"({channels}, {size}, {size}); resize to model.image_size with {channels} channel(s)")
    if isinstance(label, torch.Tensor) and label.numel() == 1 and not label.is_floating_point():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise DataError(f"{where}: the label is a {type(label).__name__}; return an int class index")
    label = int(label)
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} is outside [0, {num_classes}) (model.num_classes={num_classes}); "
                        "use data that matches the model")
