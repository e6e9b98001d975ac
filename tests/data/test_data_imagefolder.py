"""Image folders: decoding, normalisation, resizing and every user error."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from granq_search.config import DataConfig
from granq_search.data import build_eval_data
from granq_search.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _folder(root, classes=("cat", "ant", "bee"), per_class=4, size=8):
    g = torch.Generator().manual_seed(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            px = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(root / c / f"{i}.png")
    return root


def _build(root, num_classes=3, image_size=8, **kw):
    cfg = DataConfig(dataset="imagefolder", root=str(root), batch_size=5, **kw)
    return build_eval_data(cfg, mean=MEAN, std=STD, image_size=image_size, num_classes=num_classes)


def test_imagefolder_matches_torchvision_transforms(tmp_path):
    root = _folder(tmp_path / "imgs")
    d = _build(root)
    assert (d.meta["n_total"], d.meta["n_val"], d.meta["n_test"]) == (12, 6, 6)
    assert d.meta["classes"] == ["ant", "bee", "cat"]  # alphabetical order = label order
    ds = d.val.dataset
    ref = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    labels = []
    for x, y in d.val:
        labels += y.tolist()
    # Every loaded image equals ToTensor + Normalize of some file of its class, bit for bit.
    refs = {(c, i): ref(Image.open(root / c / f"{i}.png").convert("RGB")) for c in ("ant", "bee", "cat")
            for i in range(4)}
    for k in range(len(ds)):
        x, y = ds[k]
        cls = d.meta["classes"][y]
        assert any(torch.equal(x, refs[(cls, i)]) for i in range(4))
    assert sorted(set(labels)) <= [0, 1, 2]


def test_imagefolder_resizes_and_greyscales(tmp_path):
    root = _folder(tmp_path / "imgs", size=12)
    cfg = DataConfig(dataset="imagefolder", root=str(root))
    d = build_eval_data(cfg, mean=(0.3,), std=(0.4,), image_size=8, num_classes=3)
    x, _ = next(iter(d.test))
    assert x.shape[1:] == (1, 8, 8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _build(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        _build(tmp_path / "empty")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        _build(tmp_path / "noimg")
    root = _folder(tmp_path / "three")
    with pytest.raises(DataError, match="3 classes but the model head has 10"):
        _build(root, num_classes=10)
    with pytest.raises(DataError, match="needs data.root"):
        build_eval_data(DataConfig(dataset="imagefolder"), mean=MEAN, std=STD, image_size=8, num_classes=3)
