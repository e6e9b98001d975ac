"""Generators: shapes for several geometries, BN eps, kind selection, sampling, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from granq_search.config import GeneratorConfig
from granq_search.errors import ConfigError
from granq_search.generator import (
    CBNGenerator,
    ConditionalBatchNorm2d,
    EmbeddingGenerator,
    build_generator,
    resolve_generator_kind,
)

SMALL = GeneratorConfig(latent_dim=16, channels=8)


@pytest.mark.parametrize("kind", ["embedding", "cbn"])
@pytest.mark.parametrize("classes,channels,size", [(10, 1, 8), (100, 3, 32), (7, 2, 12)])
def test_output_shape(kind, classes, channels, size):
    torch.manual_seed(0)
    cfg = GeneratorConfig(kind=kind, latent_dim=16, channels=8)
    gen = build_generator(cfg, num_classes=classes, image_size=size, channels=channels)
    z, y = gen.sample_inputs(5)
    assert z.shape == (5, 16) and y.dtype == torch.int64
    out = gen(z, y)
    assert out.shape == (5, channels, size, size)
    assert torch.isfinite(out).all()


def test_default_width_cifar_shapes():
    gen = build_generator(GeneratorConfig(kind="embedding"), num_classes=100, image_size=32, channels=3)
    assert gen.fc.in_features == 100 and gen.fc.out_features == 128 * 8 * 8
    assert gen.label_emb.weight.shape == (100, 100)
    convs = [m for m in gen.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (128, 128, (3, 3)), (128, 64, (3, 3)), (64, 3, (3, 3))]
    assert not gen.out[-1].affine


def test_cbn_at_224_batch_2():
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(), num_classes=1000, image_size=224, channels=3)
    assert isinstance(gen, CBNGenerator)
    z, y = gen.sample_inputs(2)
    with torch.no_grad():
        out = gen(z, y)
    assert out.shape == (2, 3, 224, 224)


@pytest.mark.parametrize("kind", ["embedding", "cbn"])
def test_bn_eps_everywhere(kind):
    cfg = GeneratorConfig(kind=kind, latent_dim=16, channels=8, bn_eps=0.0123)
    gen = build_generator(cfg, num_classes=10, image_size=8, channels=1)
    bns = [m for m in gen.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == 4
    assert all(m.eps == 0.0123 for m in bns)
    assert not bns[-1].affine


def test_default_eps_is_not_the_public_bug():
    gen = build_generator(GeneratorConfig(), num_classes=10, image_size=8, channels=1)
    assert all(m.eps == 1e-5 for m in gen.modules() if isinstance(m, _BatchNorm))


def test_auto_kind():
    assert resolve_generator_kind("auto", 32) == "embedding"
    assert resolve_generator_kind("auto", 63) == "embedding"
    assert resolve_generator_kind("auto", 64) == "cbn"
    assert resolve_generator_kind("embedding", 224) == "embedding"
    assert isinstance(build_generator(SMALL, num_classes=10, image_size=8, channels=1), EmbeddingGenerator)
    assert isinstance(build_generator(SMALL, num_classes=10, image_size=64, channels=3), CBNGenerator)


def test_cbn_conditioning_is_per_class():
    gen = build_generator(GeneratorConfig(kind="cbn", latent_dim=16, channels=8),
                          num_classes=3, image_size=8, channels=1)
    cbns = [m for m in gen.modules() if isinstance(m, ConditionalBatchNorm2d)]
    assert len(cbns) == 3
    assert all(not m.bn.affine for m in cbns)
    assert all(m.gamma.weight.shape == (3, m.num_features) for m in cbns)
    assert torch.equal(cbns[0].gamma.weight, torch.ones_like(cbns[0].gamma.weight))
    assert torch.equal(cbns[0].beta.weight, torch.zeros_like(cbns[0].beta.weight))
    # class conditioning changes the output: same z, different labels
    with torch.no_grad():
        for m in cbns:
            m.gamma.weight.normal_()
            m.beta.weight.normal_()
    gen.eval()
    z = torch.randn(1, 16).repeat(2, 1)
    out = gen(z, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1])


def test_embedding_conditioning_multiplies_noise():
    gen = build_generator(GeneratorConfig(kind="embedding", latent_dim=16, channels=8),
                          num_classes=3, image_size=8, channels=1).eval()
    with torch.no_grad():
        gen.label_emb.weight[1].zero_()
    z = torch.randn(2, 16)
    # label 1 has a zero embedding: the output no longer depends on z
    out = gen(z, torch.tensor([1, 1]))
    assert torch.allclose(out[0], out[1])


@pytest.mark.parametrize("size", [0, 2, 6, 30, 222])
def test_bad_image_size(size):
    with pytest.raises(ConfigError) as err:
        build_generator(SMALL, num_classes=10, image_size=size, channels=3)
    assert err.value.field == "model.image_size"
    assert str(err.value).startswith("model.image_size:")


def test_bad_classes_and_channels():
    with pytest.raises(ConfigError, match="model.num_classes"):
        build_generator(SMALL, num_classes=0, image_size=8, channels=3)
    with pytest.raises(ConfigError, match="channel"):
        build_generator(SMALL, num_classes=10, image_size=8, channels=0)


def test_sample_inputs_reproducible_and_uniform():
    gen = build_generator(SMALL, num_classes=4, image_size=8, channels=1)
    a = gen.sample_inputs(2000, "cpu", torch.Generator().manual_seed(3))
    b = gen.sample_inputs(2000, "cpu", torch.Generator().manual_seed(3))
    c = gen.sample_inputs(2000, "cpu", torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    z, y = a
    assert z.shape == (2000, 16) and y.shape == (2000,)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    counts = torch.bincount(y, minlength=4)
    assert counts.min() > 400 and y.min() >= 0 and y.max() < 4
    with pytest.raises(ValueError):
        gen.sample_inputs(0)


@pytest.mark.parametrize("kind", ["embedding", "cbn"])
def test_gradients_reach_all_generator_parameters(kind):
    torch.manual_seed(0)
    cfg = GeneratorConfig(kind=kind, latent_dim=16, channels=8)
    gen = build_generator(cfg, num_classes=10, image_size=8, channels=3)
    z, y = gen.sample_inputs(6, rng=torch.Generator().manual_seed(0))
    out = gen(z, y)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
        if kind == "embedding" and name == "label_emb.weight":
            assert p.grad[y].abs().sum() > 0
        elif name.endswith(("gamma.weight", "beta.weight")):
            assert p.grad[y].abs().sum() > 0, name
        else:
            assert p.grad.abs().sum() > 0, name
