"""Conditional generators that turn (noise, label) into images for zero-shot quantization.

Both variants share one shape (GRANQ.md section 3, step 1)::

    (z, y) -> Linear(latent -> C0 * (S/4)^2) -> BN(C0) -> up x2 -> Conv3x3(C0 -> C0) -> BN
           -> LeakyReLU(0.2) -> up x2 -> Conv3x3(C0 -> C0/2) -> BN -> LeakyReLU(0.2)
           -> Conv3x3(C0/2 -> channels) -> Tanh -> BN(channels, affine=False)

* :class:`EmbeddingGenerator` (CIFAR variant): the label enters through a learned embedding
  (classes x latent) multiplied elementwise with ``z`` before the linear layer.
* :class:`CBNGenerator` (ImageNet variant): ``z`` enters the linear layer directly and the
  label enters through class-conditional BatchNorm (:class:`ConditionalBatchNorm2d`) in place
  of the three hidden BN layers.

Every BatchNorm uses ``eps = GeneratorConfig.bn_eps`` (the public code passes 0.8 as eps by
mistake; we use the intended value). Upsampling is nearest-neighbour.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "UPSAMPLE_STEPS",
    "SIZE_DIVISOR",
    "LEAKY_SLOPE",
    "ConditionalBatchNorm2d",
    "ConditionalGenerator",
    "EmbeddingGenerator",
    "CBNGenerator",
]

UPSAMPLE_STEPS = 2
"""Number of x2 upsampling stages between the linear layer and the output."""
SIZE_DIVISOR = 2**UPSAMPLE_STEPS
"""Image sizes must be divisible by this (the linear layer produces S/4 x S/4 maps)."""
LEAKY_SLOPE = 0.2
"""Negative slope of the LeakyReLU activations."""


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1)


class ConditionalBatchNorm2d(nn.Module):
    """Class-conditional BatchNorm: a non-affine BN, then per-class scale and shift.

    ``out = gamma[y] * BN(x) + beta[y]`` with ``gamma`` initialised to ones and ``beta`` to zeros,
    so at initialisation it equals a plain BatchNorm2d with default affine parameters.
    """

    def __init__(self, num_features: int, num_classes: int, eps: float) -> None:
        super().__init__()
        self.num_features = num_features
        self.num_classes = num_classes
        self.bn = nn.BatchNorm2d(num_features, eps=eps, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.bn(x)
        gamma = self.gamma(y).view(-1, self.num_features, 1, 1)
        beta = self.beta(y).view(-1, self.num_features, 1, 1)
        return gamma * out + beta


class ConditionalGenerator(nn.Module):
    """Base of the generators: geometry attributes and input sampling.

    Subclasses implement ``forward(z, y) -> images`` with ``z`` of shape (N, latent_dim) and
    ``y`` int64 labels of shape (N,); images have shape (N, channels, image_size, image_size).
    """

    kind: str = ""

    def __init__(self, *, latent_dim: int, num_classes: int, image_size: int, channels: int,
                 width: int, bn_eps: float) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.width = width
        self.bn_eps = bn_eps
        self.init_size = image_size // SIZE_DIVISOR

    def sample_inputs(self, n: int, device: torch.device | str | None = None,
                      rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``z ~ N(0, I)`` of shape (n, latent_dim) and labels uniform over the classes.

        ``rng`` makes the draw reproducible; it is used on its own device and the results are
        moved to ``device`` (default: the device of this module's parameters), so a CPU
        generator gives the same numbers whatever the target device.
        """
        if n < 1:
            raise ValueError(f"sample_inputs needs n >= 1, got {n}")
        if device is None:
            device = next(self.parameters()).device
        draw_device = rng.device if rng is not None else torch.device(device)
        z = torch.randn(n, self.latent_dim, generator=rng, device=draw_device)
        y = torch.randint(0, self.num_classes, (n,), generator=rng, device=draw_device, dtype=torch.int64)
        return z.to(device), y.to(device)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, latent_dim={self.latent_dim}, num_classes={self.num_classes}, "
                f"image_size={self.image_size}, channels={self.channels}, width={self.width}, "
                f"bn_eps={self.bn_eps}")


class EmbeddingGenerator(ConditionalGenerator):
    """CIFAR-style generator: label embedding multiplied elementwise with the noise."""

    kind = "embedding"

    def __init__(self, *, latent_dim: int, num_classes: int, image_size: int, channels: int,
                 width: int, bn_eps: float) -> None:
        super().__init__(latent_dim=latent_dim, num_classes=num_classes, image_size=image_size,
                         channels=channels, width=width, bn_eps=bn_eps)
        half = width // 2
        self.label_emb = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width, eps=bn_eps)
        self.block1 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv3x3(width, width),
            nn.BatchNorm2d(width, eps=bn_eps),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.block2 = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            _conv3x3(width, half),
            nn.BatchNorm2d(half, eps=bn_eps),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.out = nn.Sequential(
            _conv3x3(half, channels),
            nn.Tanh(),
            nn.BatchNorm2d(channels, eps=bn_eps, affine=False),
        )

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.label_emb(y) * z
        h = self.fc(h).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self.bn0(h)
        h = self.block1(h)
        h = self.block2(h)
        return self.out(h)


class CBNGenerator(ConditionalGenerator):
    """ImageNet-style generator: class conditioning through class-conditional BatchNorm."""

    kind = "cbn"

    def __init__(self, *, latent_dim: int, num_classes: int, image_size: int, channels: int,
                 width: int, bn_eps: float) -> None:
        super().__init__(latent_dim=latent_dim, num_classes=num_classes, image_size=image_size,
                         channels=channels, width=width, bn_eps=bn_eps)
        half = width // 2
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.cbn0 = ConditionalBatchNorm2d(width, num_classes, bn_eps)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv1 = _conv3x3(width, width)
        self.cbn1 = ConditionalBatchNorm2d(width, num_classes, bn_eps)
        self.conv2 = _conv3x3(width, half)
        self.cbn2 = ConditionalBatchNorm2d(half, num_classes, bn_eps)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)
        self.out = nn.Sequential(
            _conv3x3(half, channels),
            nn.Tanh(),
            nn.BatchNorm2d(channels, eps=bn_eps, affine=False),
        )

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(z).view(z.shape[0], self.width, self.init_size, self.init_size)
        h = self.cbn0(h, y)
        h = self.act(self.cbn1(self.conv1(self.up(h)), y))
        h = self.act(self.cbn2(self.conv2(self.up(h)), y))
        return self.out(h)
