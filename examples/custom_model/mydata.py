"""Your own data for granq_search: scikit-learn's 8x8 digits, divided once into a part that
trains the teacher (:func:`teacher_train_set`) and a held-out part for evaluation
(:func:`digits_eval`, the data factory the config names)::

    data:
      dataset: mydata:digits_eval   # MODULE:FACTORY

granq_search calls the factory with the keyword arguments it declares among ``root``,
``image_size``, ``in_channels``, ``mean``, ``std`` and ``num_classes``. It returns one labelled
``Dataset`` of ``(image, label)`` pairs, images normalised with the ``mean``/``std`` it is given;
granq_search splits it into validation (model selection) and test (reported) with
``data.split_seed`` and ``data.val_fraction``. (It may instead return ``{"val": ..., "test": ...}``,
a split of its own.) No training data is needed: the quantized student learns from generated
images only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

__all__ = ["digits_eval", "teacher_train_set"]

TRAIN_FRACTION = 0.6
SEED = 7
LEVELS = 16.0
"""sklearn's digits pixels are integers 0..16."""


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, eval images, eval labels); images float in [0, 1], (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / LEVELS
    labels = torch.as_tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SEED))
    n_train = int(round(TRAIN_FRACTION * len(labels)))
    train, held_out = perm[:n_train], perm[n_train:]
    return images[train], labels[train], images[held_out], labels[held_out]


def _normalised(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images - m) / s


def teacher_train_set(mean: Sequence[float], std: Sequence[float]) -> TensorDataset:
    """The 60% that trains the teacher (never shown to granq_search)."""
    images, labels, _, _ = _digits()
    return TensorDataset(_normalised(images, mean, std), labels)


def digits_eval(mean: Sequence[float], std: Sequence[float]) -> TensorDataset:
    """The data factory: the held-out 40%, normalised for the teacher."""
    _, _, images, labels = _digits()
    return TensorDataset(_normalised(images, mean, std), labels)
