"""Checkpoint layouts that circulate in practice load; everything else is one clear error."""

from __future__ import annotations

import hashlib

import pytest
import torch

from granq_search.errors import CheckpointError
from granq_search.models import create_model, load_checkpoint


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("tiny_test")


def _same(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


@pytest.mark.parametrize("layout", ["raw", "state_dict", "model", "module_prefix", "no_bn_counters"])
def test_layouts_load(tmp_path, layout):
    src = _model(1)
    sd = src.state_dict()
    obj = {
        "raw": sd,
        "state_dict": {"best_prec1": 91.78, "state_dict": sd},
        "model": {"epoch": 3, "model": sd},
        "module_prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "no_bn_counters": {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
    }[layout]
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    dst = _model(2)
    assert not _same(src, dst)
    sha = load_checkpoint(dst, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _same(src, dst) or layout == "no_bn_counters"
    for k, v in src.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(dst.state_dict()[k], v)


def _error(model, path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, path, name="tiny_test")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    assert "does not exist" in _error(_model(), tmp_path / "nope.pt")


def test_garbage_bytes(tmp_path):
    p = tmp_path / "garbage.pt"
    p.write_bytes(b"this is not a checkpoint\x00\x01" * 10)
    assert "not a readable PyTorch checkpoint" in _error(_model(), p)


def test_not_a_mapping_of_tensors(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    assert "not a state dict" in _error(_model(), p)
    q = tmp_path / "mixed.pt"
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, q)
    assert "not a mapping of tensors" in _error(_model(), q)


def test_architecture_mismatch_is_one_error(tmp_path):
    p = tmp_path / "resnet20.pt"
    torch.save(create_model("resnet20").state_dict(), p)
    msg = _error(_model(), p)
    assert "does not fit model 'tiny_test'" in msg
    assert "missing keys (conv2.weight," in msg and "unexpected keys (layer1.0.conv1.weight," in msg
    assert "shape mismatches (conv1.weight: checkpoint (16, 3, 3, 3) vs model (8, 1, 3, 3)" in msg
    assert msg.endswith("check model.name and model.num_classes match the checkpoint")


def test_head_size_mismatch(tmp_path):
    p = tmp_path / "c100.pt"
    torch.save(create_model("tiny_test", num_classes=100).state_dict(), p)
    msg = _error(_model(), p)
    assert "2 shape mismatches" in msg and "linear.weight: checkpoint (100, 16) vs model (10, 16)" in msg
