"""scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), split once for good.

A fixed seeded permutation (independent of ``data.split_seed``) divides the images into a
teacher-TRAIN part (60%, used only to train the on-the-spot digits teacher) and an
EVALUATION part (40%). The evaluation part is what :func:`build_eval_data` splits into
validation and test; the quantization pipeline never sees the train part.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

__all__ = ["DIGITS_TRAIN_FRACTION", "DIGITS_SPLIT_SEED", "digits_train_split", "digits_eval_part",
           "load_digits_uint8"]

DIGITS_TRAIN_FRACTION = 0.6
DIGITS_SPLIT_SEED = 20240531
"""Seed of the fixed train/evaluation division; never changes with the experiment config."""
DIGITS_LEVELS = 16
"""Pixel values in sklearn's digits are integers 0..16."""


@lru_cache(maxsize=1)
def load_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All images as uint8 (N, 1, 8, 8) with values 0..16, and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.ascontiguousarray(d.images).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    images.requires_grad_(False)
    return images, labels


def _division() -> tuple[torch.Tensor, torch.Tensor]:
    images, _ = load_digits_uint8()
    n = images.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_train = int(round(DIGITS_TRAIN_FRACTION * n))
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def digits_train_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-TRAIN part: float images in [0, 1] of shape (N, 1, 8, 8) and labels (N,)."""
    images, labels = load_digits_uint8()
    idx, _ = _division()
    return images[idx].float() / DIGITS_LEVELS, labels[idx].clone()


def digits_eval_part() -> tuple[torch.Tensor, torch.Tensor]:
    """The EVALUATION part: uint8 images (values 0..16) and labels, before the val/test split."""
    images, labels = load_digits_uint8()
    _, idx = _division()
    return images[idx].clone(), labels[idx].clone()
