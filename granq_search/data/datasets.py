"""Labelled evaluation data with an honest, deterministic validation/test split.

:func:`build_eval_data` returns two loaders over disjoint parts of one labelled set:
``val`` (model selection, calibration, threshold choice) and ``test`` (reported, never used
for a choice). The split is a seeded ``torch.Generator`` permutation; ``max_samples`` keeps
the first ``max_samples`` images of that same permutation (a random subset) before splitting.

Datasets:

- ``digits``: scikit-learn's 8x8 digits, evaluation part only (see :mod:`.digits`);
- ``cifar10`` / ``cifar100``: the torchvision test split under ``data.root``;
- ``imagefolder``: one sub-folder per class (alphabetical order = label order);
- ``imagenet``: an ImageFolder of the ImageNet validation set, Resize(256) + CenterCrop(224)
  (scaled to the model's image size);
- ``MODULE:FACTORY``: your own data (contract: :mod:`granq_search.data.custom`), split the same way.

Transforms: ToTensor and Normalize(mean, std) with the teacher's statistics (plus a resize
for image folders whose images are not at the model's size). Small images are decoded once
into a uint8 tensor in memory (CIFAR: already in memory; the 10,000-file CIFAR-10 JPEG folder:
a few seconds), so repeated evaluations do not decode again; large folders stay on disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from granq_search.config import BUILTIN_DATASETS, DataConfig
from granq_search.data.digits import DIGITS_LEVELS, digits_eval_part
from granq_search.errors import DataError
from granq_search.user_code import is_import_path

__all__ = ["EvalData", "ImageTensorDataset", "build_eval_data", "split_indices", "default_data_root"]

IN_MEMORY_LIMIT_BYTES = 1 << 30
"""Image folders whose decoded uint8 pixels fit in this many bytes are decoded once, in memory."""


@dataclass
class EvalData:
    """Validation and test loaders (no shuffling) over disjoint parts of one labelled set."""

    val: DataLoader
    test: DataLoader
    num_classes: int
    meta: dict[str, Any] = field(default_factory=dict)
    """dataset, root, n_total, n_val, n_test, split_seed, val_fraction (and class names)."""


class ImageTensorDataset(Dataset):
    """Images kept as integers in memory, normalised on access.

    ``images``: uint8 (N, C, H, W) with values 0..``levels``; an item is
    ``((x / levels - mean) / std, label)``, the same arithmetic as ToTensor + Normalize.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], levels: float = 255.0) -> None:
        if images.ndim != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError("images must be (N, C, H, W) with one label per image")
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.levels = float(levels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].to(torch.float32).div(self.levels)
        return x.sub_(self.mean).div_(self.std), int(self.labels[i])


# --------------------------------------------------------------------------- split


def split_indices(n: int, val_fraction: float, seed: int,
                  max_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint sorted (val, test) index tensors over ``range(n)``, deterministic in ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    if max_samples is not None:
        perm = perm[:max_samples]
    m = perm.numel()
    if m < 2:
        raise DataError(f"{m} labelled image(s) cannot be split into validation and test; use more data")
    n_val = min(max(int(round(val_fraction * m)), 1), m - 1)
    return perm[:n_val].sort().values, perm[n_val:].sort().values


# --------------------------------------------------------------------------- public entry


def default_data_root() -> Path:
    base = os.environ.get("GRANQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "granq_search")
    return Path(base) / "data"


def build_eval_data(cfg: DataConfig, *, mean: Sequence[float], std: Sequence[float], image_size: int,
                    num_classes: int) -> EvalData:
    """Validation and test loaders for ``cfg.dataset`` normalised with the teacher's mean/std."""
    if is_import_path(cfg.dataset):
        from granq_search.data.custom import build_custom_data  # custom.py imports this module

        if len(mean) != len(std):
            raise DataError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel each")
        val, test, meta = build_custom_data(cfg, mean=tuple(mean), std=tuple(std), image_size=int(image_size),
                                            num_classes=int(num_classes))
        return EvalData(val=val, test=test, num_classes=int(num_classes), meta=meta)
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise DataError(f"mean {tuple(mean)} and std {tuple(std)} must both have 1 or 3 values")
    return _BUILDERS[cfg.dataset](cfg, tuple(mean), tuple(std), int(image_size), int(num_classes))


def _meta(cfg: DataConfig, root: str | None, n_total: int, n_val: int, n_test: int, **extra: Any) -> dict[str, Any]:
    return {"dataset": cfg.dataset, "root": root, "n_total": n_total, "n_val": int(n_val), "n_test": int(n_test),
            "split_seed": cfg.split_seed, "val_fraction": cfg.val_fraction, "max_samples": cfg.max_samples, **extra}


def _check_classes(found: int, num_classes: int, what: str) -> None:
    if found != num_classes:
        raise DataError(f"{what} has {found} classes but the model head has {num_classes} "
                        f"(model.num_classes); use data that matches the model or set model.num_classes={found} "
                        "with a checkpoint trained for it")


def _loader(ds: Dataset, cfg: DataConfig, workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=False)


def _in_memory(images: torch.Tensor, labels: torch.Tensor, cfg: DataConfig, mean, std, levels: float,
               root: str | None, num_classes: int, **extra: Any) -> EvalData:
    """Split images already decoded into memory and wrap both parts in loaders."""
    val, test = split_indices(images.shape[0], cfg.val_fraction, cfg.split_seed, cfg.max_samples)
    n_total = images.shape[0] if cfg.max_samples is None else int(val.numel() + test.numel())

    def make(idx: torch.Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(images[idx], labels[idx], mean, std, levels)

    return EvalData(val=_loader(make(val), cfg, 0), test=_loader(make(test), cfg, 0),
                    num_classes=num_classes, meta=_meta(cfg, root, n_total, val.numel(), test.numel(), **extra))


def _fit_channels_and_size(images: torch.Tensor, channels: int, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> (N, channels, S, S): grey<->RGB and a resize when sizes differ."""
    if images.shape[1] != channels:
        if channels == 3 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and images.shape[1] == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = TF.resize(images, [image_size, image_size], antialias=True)
    return images


# --------------------------------------------------------------------------- digits


def _digits(cfg: DataConfig, mean, std, image_size: int, num_classes: int) -> EvalData:
    _check_classes(10, num_classes, "the digits dataset")
    images, labels = digits_eval_part()
    images = _fit_channels_and_size(images, len(mean), image_size)
    return _in_memory(images, labels, cfg, mean, std, float(DIGITS_LEVELS), None, 10,
                      source="sklearn digits, evaluation part (40%)")


# --------------------------------------------------------------------------- CIFAR


def _cifar(cfg: DataConfig, mean, std, image_size: int, num_classes: int) -> EvalData:
    name = "CIFAR-10" if cfg.dataset == "cifar10" else "CIFAR-100"
    cls = tvd.CIFAR10 if cfg.dataset == "cifar10" else tvd.CIFAR100
    root = Path(cfg.root).expanduser() if cfg.root else default_data_root()
    try:
        ds = cls(str(root), train=False, download=cfg.download)
    except RuntimeError as e:
        if "not found" in str(e).lower() or "corrupted" in str(e).lower():
            raise DataError(f"{name} not found under {root}; pass data.download=true when online or point "
                            f"data.root to the folder holding {cls.base_folder}/") from None
        raise DataError(f"cannot read {name} under {root} ({str(e).splitlines()[0]})") from None
    except Exception as e:  # download failures: URLError, OSError, ...
        raise DataError(f"cannot download {name} into {root} ({type(e).__name__}: {e}); "
                        f"download it elsewhere and point data.root to the folder holding {cls.base_folder}/") from None
    _check_classes(len(ds.classes), num_classes, f"{name} under {root}")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    images = _fit_channels_and_size(images, len(mean), image_size)
    return _in_memory(images, labels, cfg, mean, std, 255.0, str(root), len(ds.classes),
                      classes=list(ds.classes))


# --------------------------------------------------------------------------- image folders


def _scan_folder(cfg: DataConfig) -> tuple[Path, tvd.ImageFolder]:
    what = "ImageNet validation folder" if cfg.dataset == "imagenet" else "image folder"
    if not cfg.root:
        raise DataError(f"data.dataset={cfg.dataset} needs data.root: the {what} with one sub-folder per class")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"{what} '{root}' does not exist; point data.root to a folder with one sub-folder per class")
    if not any(p.is_dir() for p in root.iterdir()):
        raise DataError(f"{what} '{root}' has no class sub-folders; expected one sub-folder of images per class")
    try:
        # The folder listing only: the loader is never called on this instance.
        ds = tvd.ImageFolder(str(root), loader=lambda p: p)
    except FileNotFoundError:
        exts = ", ".join(sorted(e.lstrip(".") for e in tvd.folder.IMG_EXTENSIONS))
        raise DataError(f"{what} '{root}' has class sub-folders but no images ({exts}); "
                        "check data.root") from None
    return root, ds


def _open(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert(mode)


def _decode_small(path: str, mode: str, size: int) -> torch.Tensor:
    img = _open(path, mode)
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, size), [size, size])
    return TF.pil_to_tensor(img)


class _FolderDataset(Dataset):
    """Lazily decoded image-folder samples (for folders too large for memory)."""

    def __init__(self, samples: list[tuple[str, int]], mode: str, transform: Callable) -> None:
        self.samples = samples
        self.mode = mode
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(_open(path, self.mode)), label


def _image_folder(cfg: DataConfig, mean, std, image_size: int, num_classes: int) -> EvalData:
    root, ds = _scan_folder(cfg)
    _check_classes(len(ds.classes), num_classes, f"image folder '{root}'")
    mode = "L" if len(mean) == 1 else "RGB"
    samples = list(ds.samples)
    n_total = len(samples)
    val, test = split_indices(n_total, cfg.val_fraction, cfg.split_seed, cfg.max_samples)
    n_used = int(val.numel() + test.numel())
    meta = _meta(cfg, str(root), n_total if cfg.max_samples is None else n_used, val.numel(), test.numel(),
                 classes=list(ds.classes))
    small = cfg.dataset == "imagefolder" and n_used * len(mean) * image_size ** 2 <= IN_MEMORY_LIMIT_BYTES
    if small:
        wanted = torch.cat([val, test]).sort().values
        images = _decode_all([samples[i][0] for i in wanted.tolist()], mode, image_size, cfg.num_workers)
        labels = torch.tensor([samples[i][1] for i in wanted.tolist()], dtype=torch.int64)
        pos = {int(i): k for k, i in enumerate(wanted.tolist())}
        pick = lambda idx: torch.tensor([pos[int(i)] for i in idx], dtype=torch.int64)  # noqa: E731
        make = lambda idx: ImageTensorDataset(images[pick(idx)], labels[pick(idx)], mean, std)  # noqa: E731
        return EvalData(val=_loader(make(val), cfg, 0), test=_loader(make(test), cfg, 0),
                        num_classes=len(ds.classes), meta=meta)
    if cfg.dataset == "imagenet":
        resize = int(math.floor(image_size * 256 / 224))  # Resize(256) + CenterCrop(224) at 224 px
        spatial = [T.Resize(resize), T.CenterCrop(image_size)]
    else:
        spatial = [T.Resize(image_size), T.CenterCrop(image_size)]
    transform = T.Compose([*spatial, T.ToTensor(), T.Normalize(mean, std)])
    full = _FolderDataset(samples, mode, transform)
    return EvalData(val=_loader(Subset(full, val.tolist()), cfg, cfg.num_workers),
                    test=_loader(Subset(full, test.tolist()), cfg, cfg.num_workers),
                    num_classes=len(ds.classes), meta=meta)


def _decode_all(paths: list[str], mode: str, size: int, workers: int) -> torch.Tensor:
    """Decode every file once into a uint8 (N, C, S, S) tensor (PIL, optionally threaded)."""
    channels = 1 if mode == "L" else 3
    out = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)

    def one(k: int) -> None:
        try:
            out[k] = _decode_small(paths[k], mode, size)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot decode image '{paths[k]}' ({type(e).__name__}: {e}); "
                            "remove or replace the file") from None

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(len(paths))))
    else:
        for k in range(len(paths)):
            one(k)
    return out


# --------------------------------------------------------------------------- the built-in table

_BUILDERS: dict[str, Callable[..., EvalData]] = {
    "digits": _digits,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "imagefolder": _image_folder,
    "imagenet": _image_folder,
}
assert set(_BUILDERS) == set(BUILTIN_DATASETS), "data.dataset's built-in names and the builders differ"
