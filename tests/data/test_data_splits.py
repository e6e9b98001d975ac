"""Deterministic, disjoint validation/test splits; the digits train part is never evaluated."""

from __future__ import annotations

import pytest
import torch

from granq_search.config import DataConfig
from granq_search.data import build_eval_data, digits_train_split, split_indices
from granq_search.data.digits import _division, load_digits_uint8
from granq_search.errors import DataError
from granq_search.models.digits import DIGITS_MEAN, DIGITS_STD

DIGITS = dict(mean=DIGITS_MEAN, std=DIGITS_STD, image_size=8, num_classes=10)


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_split_indices_deterministic_disjoint_covering():
    val, test = split_indices(101, 0.3, seed=7)
    val2, test2 = split_indices(101, 0.3, seed=7)
    assert torch.equal(val, val2) and torch.equal(test, test2)
    assert len(val) == 30 and len(test) == 71
    assert not set(val.tolist()) & set(test.tolist())
    assert sorted(val.tolist() + test.tolist()) == list(range(101))
    other, _ = split_indices(101, 0.3, seed=8)
    assert not torch.equal(val, other)


def test_max_samples_is_a_random_subset_of_the_same_permutation():
    val, test = split_indices(100, 0.5, seed=3, max_samples=20)
    used = set(val.tolist()) | set(test.tolist())
    assert len(used) == 20 and used != set(range(20))
    full_perm = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    assert used == set(full_perm[:20].tolist())
    with pytest.raises(DataError):
        split_indices(1, 0.5, seed=0)


def test_digits_train_and_eval_parts_are_disjoint():
    train, evaluation = _division()
    assert len(train) == 1078 and len(evaluation) == 719
    assert not set(train.tolist()) & set(evaluation.tolist())
    x, y = digits_train_split()
    assert x.shape == (1078, 1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    images, labels = load_digits_uint8()
    assert torch.equal(y, labels[train])


def test_digits_eval_data_deterministic_and_disjoint():
    a = build_eval_data(DataConfig(split_seed=1), **DIGITS)
    b = build_eval_data(DataConfig(split_seed=1), **DIGITS)
    c = build_eval_data(DataConfig(split_seed=2), **DIGITS)
    xa, ya = _all(a.val)
    xb, yb = _all(b.val)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(_all(c.val)[0], xa)
    m = a.meta
    assert (m["n_total"], m["n_val"], m["n_test"]) == (719, 360, 359)
    assert m["dataset"] == "digits" and m["split_seed"] == 1 and m["val_fraction"] == 0.5
    assert a.num_classes == 10 and xa.shape[1:] == (1, 8, 8)
    # Disjoint: the val and test images come from disjoint index sets of the evaluation part.
    assert len(a.val.dataset) + len(a.test.dataset) == 719
    # Normalised with the given statistics (sklearn digits are 0..16).
    assert abs(float(xa.min()) - (0 - DIGITS_MEAN[0]) / DIGITS_STD[0]) < 1e-5


def test_digits_cap_and_class_check():
    d = build_eval_data(DataConfig(max_samples=50, val_fraction=0.2), **DIGITS)
    assert (d.meta["n_total"], d.meta["n_val"], d.meta["n_test"]) == (50, 10, 40)
    with pytest.raises(DataError, match="10 classes but the model head has 100"):
        build_eval_data(DataConfig(), mean=DIGITS_MEAN, std=DIGITS_STD, image_size=8, num_classes=100)


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        build_eval_data(DataConfig(dataset="cifar10", root=str(tmp_path)), mean=(0.5,) * 3, std=(0.5,) * 3,
                        image_size=32, num_classes=10)
    msg = str(e.value)
    assert msg.startswith(f"CIFAR-10 not found under {tmp_path}") and "data.download=true" in msg


def test_every_builtin_dataset_has_a_builder():
    from granq_search.config import BUILTIN_DATASETS
    from granq_search.data import datasets

    assert set(datasets._BUILDERS) == set(BUILTIN_DATASETS)
