"""Your own evaluation data (``data.dataset: MODULE:FACTORY``): the two forms a factory may
return, the arguments it is offered, the seeded split, and one-line errors."""

from __future__ import annotations

import sys
import textwrap
import uuid

import pytest
import torch

from granq_search.config import DataConfig, load_config
from granq_search.data import build_eval_data, split_indices
from granq_search.errors import ConfigError, DataError

FACTS = {"mean": (0.5,), "std": (0.25,), "image_size": 6, "num_classes": 4}

SOURCE = """
import torch
from torch.utils.data import Dataset, TensorDataset

SEEN = {}


def _images(n, channels=1, size=6, dtype=torch.float32, offset=0):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, channels, size, size) + offset
    return x.to(dtype).contiguous(), torch.arange(n) % 4


def single(root, mean, std):
    SEEN.update(root=root, mean=mean, std=std)
    return TensorDataset(*_images(50))


def everything(**kwargs):
    SEEN.update(kwargs)
    return TensorDataset(*_images(10))


def given():
    return {"val": TensorDataset(*_images(30)), "test": TensorDataset(*_images(10, offset=1000))}


def with_train():
    return {"train": TensorDataset(*_images(3)), "val": TensorDataset(*_images(3)), "test": TensorDataset(*_images(3))}


def only_val():
    return {"val": TensorDataset(*_images(3))}


class Classes(Dataset):
    classes = ["a", "b", "c"]

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return torch.zeros(1, 6, 6), 0


def three_classes():
    return Classes()


def wrong_shape():
    return TensorDataset(*_images(5, channels=3))


def integer_images():
    return TensorDataset(*_images(5, dtype=torch.uint8))


def bad_label():
    x, _ = _images(5)
    return TensorDataset(x, torch.full((5,), 9))


def empty():
    return TensorDataset(*_images(0))


def not_a_dataset():
    return 42


def needs_more(root, split):
    return TensorDataset(*_images(5))


def missing_file(root):
    open(root + "/nope.bin", "rb")
"""


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    name = f"granq_userdata_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _build(spec: str, **cfg):
    return build_eval_data(DataConfig(dataset=spec, **cfg), **FACTS)


def _labels_and_images(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_one_dataset_is_split_like_the_builtins(data_module, tmp_path):
    data = _build(f"{data_module}:single", root=str(tmp_path), val_fraction=0.4, split_seed=3, batch_size=7)
    seen = sys.modules[data_module].SEEN
    assert seen == {"root": str(tmp_path), "mean": (0.5,), "std": (0.25,)}  # only what it declares
    val_idx, test_idx = split_indices(50, 0.4, 3)
    xv, _ = _labels_and_images(data.val)
    xt, _ = _labels_and_images(data.test)
    # image k holds the value k: the split is exactly the seeded permutation of the built-ins
    assert xv[:, 0, 0, 0].long().tolist() == val_idx.tolist()
    assert xt[:, 0, 0, 0].long().tolist() == test_idx.tolist()
    assert data.num_classes == 4
    assert data.meta["dataset"] == f"{data_module}:single" and data.meta["splits"] == "seeded"
    assert (data.meta["n_total"], data.meta["n_val"], data.meta["n_test"]) == (50, 20, 30)
    capped = _build(f"{data_module}:single", max_samples=10, split_seed=3)
    assert capped.meta["n_val"] + capped.meta["n_test"] == capped.meta["n_total"] == 10


def test_factory_with_kwargs_is_offered_everything(data_module):
    _build(f"{data_module}:everything")
    assert sys.modules[data_module].SEEN == {"root": None, "image_size": 6, "in_channels": 1, "mean": (0.5,),
                                             "std": (0.25,), "num_classes": 4}


def test_given_splits_are_used_as_given(data_module):
    data = _build(f"{data_module}:given", split_seed=1)
    xt, _ = _labels_and_images(data.test)
    assert xt[:, 0, 0, 0].min() >= 1000 and len(xt) == 10 and data.meta["splits"] == "given"
    assert (data.meta["n_val"], data.meta["n_test"]) == (30, 10)
    capped = _build(f"{data_module}:given", max_samples=8, split_seed=1)
    assert (capped.meta["n_val"], capped.meta["n_test"], capped.meta["n_total"]) == (6, 2, 8)
    again = _build(f"{data_module}:given", max_samples=8, split_seed=1)
    assert torch.equal(_labels_and_images(capped.val)[0], _labels_and_images(again.val)[0])


@pytest.mark.parametrize("factory, error, words", [
    ("with_train", DataError, ["has 'train'", "zero-shot", "{'val': Dataset, 'test': Dataset}"]),
    ("only_val", DataError, ["lacks 'test'"]),
    ("three_classes", DataError, ["has 3 classes but the model head has 4"]),
    ("wrong_shape", DataError, ["val[0]: the image has shape (3, 6, 6) but the model reads (1, 6, 6)"]),
    ("integer_images", DataError, ["torch.uint8 tensor", "normalised float tensor"]),
    ("bad_label", DataError, ["label 9 is outside [0, 4)"]),
    ("empty", DataError, ["is empty"]),
    ("not_a_dataset", DataError, ["is a int; return a torch Dataset"]),
    ("needs_more", ConfigError, ["requires argument(s) split", "give the others default values"]),
    ("missing_file", DataError, ["cannot read its data (FileNotFoundError", "check data.root"]),
    ("nothing_here", ConfigError, ["has no attribute 'nothing_here'"]),
])
def test_mistakes_are_one_line_and_name_the_factory(data_module, tmp_path, factory, error, words):
    with pytest.raises(error) as e:
        _build(f"{data_module}:{factory}", root=str(tmp_path))
    text = str(e.value)
    assert "\n" not in text and f"{data_module}:{factory}" in text, text
    for w in words:
        assert w in text, text


def test_config_accepts_builtin_names_and_import_paths_only():
    assert load_config("digits", {"data.dataset": "mypkg.data:build"}).data.dataset == "mypkg.data:build"
    with pytest.raises(ConfigError, match=r"data\.dataset: 'cifar' is not allowed; choose one of 'digits'.*FACTORY"):
        load_config("digits", {"data.dataset": "cifar"})
    with pytest.raises(ConfigError, match=r"data\.dataset: 'mydata:' is not an import path"):
        load_config("digits", {"data.dataset": "mydata:"})
    with pytest.raises(ConfigError, match="data.dataset: cannot import 'granq_no_such_data_xyz'"):
        _build("granq_no_such_data_xyz:build")
