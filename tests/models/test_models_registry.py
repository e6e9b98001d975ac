"""Registry entries build, run, trace with torch.fx, and match the layouts their weights use."""

from __future__ import annotations

import dataclasses
import urllib.error

import pytest
import torch
import torch.fx
from torch import nn

from granq_search.errors import ModelError
from granq_search.models import create_model, list_models, model_info
from granq_search.models.registry import pretrained_loader

CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet20_cifar10", "resnet20_cifar100"]
IMAGENET = ["resnet18", "resnet50", "mobilenet_v2"]


def test_list_models_has_every_entry():
    assert set(CIFAR + IMAGENET + ["digits_cnn", "tiny_test"]) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", sorted(set(CIFAR + ["digits_cnn", "tiny_test"])))
def test_small_models_forward(name):
    info = model_info(name)
    model = create_model(name).eval()
    x = torch.randn(2, info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():
        assert model(x).shape == (2, info.num_classes)


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_forward_small_input(name):
    # Adaptive pooling lets the ImageNet architectures run on 64 px (fast on 2 cores).
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model_info(name).image_size == 224


def test_num_classes_override_and_info():
    info = model_info("resnet20", num_classes=100)
    assert info.num_classes == 100 and info.image_size == 32 and info.in_channels == 3
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    assert model_info("resnet20_cifar100").num_classes == 100
    assert model_info("resnet20_cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert create_model("resnet20", num_classes=100).linear.out_features == 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]


def test_unknown_model_suggests_closest():
    with pytest.raises(ModelError) as e:
        create_model("ResNet-20")
    msg = str(e.value)
    assert "unknown model 'ResNet-20'" in msg and "did you mean 'resnet20'?" in msg
    assert "--list-models" in msg and "\n" not in msg
    with pytest.raises(ModelError, match="did you mean 'mobilenet_v2'"):
        model_info("mobilenetv2")


@pytest.mark.parametrize("name", ["resnet20", "resnet20_cifar10", "digits_cnn", "tiny_test"])
def test_fx_traceable(name):
    info = model_info(name)
    model = create_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(3, info.in_channels, info.image_size, info.image_size)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_resnet20_option_a_layout():
    model = create_model("resnet20")
    names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(names) == 97  # the shared checkpoint's tensor count
    assert names[0] == "conv1.weight" and names[-2:] == ["linear.weight", "linear.bias"]
    for stage in (1, 2, 3):
        for i in range(3):
            for part in ("conv1.weight", "bn1.running_var", "conv2.weight", "bn2.bias"):
                assert f"layer{stage}.{i}.{part}" in names
    # Down-sampling shortcuts have no parameters: subsample, then zero-pad channels.
    block = model.layer2[0]
    assert sum(p.numel() for p in block.shortcut.parameters()) == 0
    x = torch.randn(1, 16, 8, 8)
    y = block.shortcut(x)
    assert y.shape == (1, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0


def test_resnet20_names_match_shared_checkpoint(shared):
    sd = torch.load(shared / "models" / "resnet20_cifar10_optionA.th", map_location="cpu", weights_only=True)
    ckpt = {k.removeprefix("module."): v.shape for k, v in sd["state_dict"].items()}
    own = {k: v.shape for k, v in create_model("resnet20").state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert own == ckpt


def test_pytorchcv_layout_names():
    keys = set(create_model("resnet20_cifar100").state_dict())
    for k in ("features.init_block.conv.weight", "features.init_block.bn.running_mean",
              "features.stage1.unit1.body.conv1.conv.weight", "features.stage1.unit3.body.conv2.bn.weight",
              "features.stage2.unit1.identity_conv.conv.weight", "features.stage3.unit1.identity_conv.bn.bias",
              "output.weight", "output.bias"):
        assert k in keys
    assert not any("stage1.unit1.identity_conv" in k for k in keys)
    relus = [n for n, m in create_model("resnet20_cifar10").named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 9 * 2  # init block, then conv1 and the unit output of each of 9 units


def test_torchvision_offline_is_one_line_model_error(monkeypatch):
    from torchvision.models import _api

    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(_api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ModelError) as e:
        pretrained_loader("resnet18")(1000)
    assert "cannot download resnet18" in str(e.value) and "model.checkpoint=PATH" in str(e.value)
    with pytest.raises(ModelError, match="1000 classes"):
        pretrained_loader("mobilenet_v2")(10)


def test_pytorchcv_missing_package_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pytorchcv(name, *a, **k):
        if name.startswith("pytorchcv"):
            raise ImportError("No module named 'pytorchcv'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pytorchcv)
    with pytest.raises(ModelError, match="pytorchcv"):
        pretrained_loader("resnet20_cifar10")(10)
