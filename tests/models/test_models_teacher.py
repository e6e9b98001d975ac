"""build_teacher: weight sources, input facts, and the on-the-spot digits teacher."""

from __future__ import annotations

import pytest
import torch

from granq_search.config import DataConfig, ModelConfig
from granq_search.data import build_eval_data
from granq_search.errors import ModelError
from granq_search.models import build_teacher, default_cache_dir
from granq_search.models.checkpoint import sha256_file
from granq_search.pipeline.evaluation import evaluate


@pytest.fixture(scope="module")
def digits_teacher():
    # The session's temporary cache (tests/conftest.py): trained once per test session.
    return build_teacher(ModelConfig(name="digits_cnn"), "cpu")


def test_digits_teacher_accuracy(digits_teacher):
    info = digits_teacher.info
    data = build_eval_data(DataConfig(), mean=info.mean, std=info.std, image_size=info.image_size,
                           num_classes=info.num_classes)
    assert evaluate(digits_teacher.model, data.test, "cpu")["top1"] >= 97.0


def test_digits_teacher_is_frozen_and_cached(digits_teacher):
    model = digits_teacher.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    cached = list(default_cache_dir().glob("digits_cnn-*.pt"))
    assert len(cached) == 1 and digits_teacher.checkpoint_sha256 == sha256_file(cached[0])
    assert not list(default_cache_dir().glob("*.tmp")) and not list(default_cache_dir().glob(".*.tmp"))
    again = build_teacher(ModelConfig(name="digits_cnn"), "cpu")  # loads, no training
    assert again.checkpoint_sha256 == digits_teacher.checkpoint_sha256
    for k, v in model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)


def test_info_overrides_and_random_init():
    t = build_teacher(ModelConfig(name="resnet20", pretrained=False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                  image_size=40), "cpu")
    assert t.info.mean == (0.5, 0.5, 0.5) and t.info.std == (0.25, 0.25, 0.25) and t.info.image_size == 40
    assert t.checkpoint_sha256 is None and "random" in t.source
    with pytest.raises(ModelError, match="input channel"):
        build_teacher(ModelConfig(name="resnet20", pretrained=False, mean=(0.5,)), "cpu")


def test_no_weights_source_is_clear():
    with pytest.raises(ModelError, match="model.checkpoint=PATH"):
        build_teacher(ModelConfig(name="resnet20"), "cpu")


def test_checkpoint_source(tmp_path):
    src = build_teacher(ModelConfig(name="tiny_test", pretrained=False), "cpu")
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": src.model.state_dict()}, path)
    t = build_teacher(ModelConfig(name="tiny_test", checkpoint=str(path)), "cpu")
    assert t.checkpoint_sha256 == sha256_file(path) and str(path) in t.source
