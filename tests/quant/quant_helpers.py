"""Independent loop reference, tiny models and data for the quantization tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from granq_search.quant import EPS


# --------------------------------------------------------------------------- reference


def ref_group(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool = False) -> torch.Tensor:
    """The documented formula for ONE group, with 0-dim float32 tensors (no broadcasting)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        scale = torch.clamp(torch.maximum(lo.abs(), hi.abs()), min=EPS) / qmax
        zp = torch.zeros((), dtype=torch.float32)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        scale = torch.clamp(hi - lo, min=EPS) / qmax
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(g * (1.0 / scale)) + zp, qmin, qmax)
    return (q - zp) * scale


def groups(shape: tuple[int, ...], name: str) -> list[tuple]:
    """Index of every group of a tensor of ``shape`` for a granularity name, by explicit loops.

    Activation names: per_tensor, per_channel (dim 1, over the batch), per_sample_channel.
    Weight names: w_per_tensor, w_per_channel (dim 0), w_per_kernel (dims 0, 1).
    """
    if name in ("per_tensor", "w_per_tensor"):
        return [(Ellipsis,)]
    if name == "per_channel":
        return [(slice(None), c) for c in range(shape[1])]
    if name == "per_sample_channel":
        return [(n, c) for n in range(shape[0]) for c in range(shape[1])]
    if name == "w_per_channel":
        return [(o,) for o in range(shape[0])]
    if name == "w_per_kernel":
        return [(o, i) for o in range(shape[0]) for i in range(shape[1])]
    raise ValueError(name)


def loop_reference(x: torch.Tensor, name: str, bits: int, symmetric: bool = False,
                   range_source: torch.Tensor | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` group by group; ranges from ``range_source`` (same groups) or ``x``."""
    src = x if range_source is None else range_source
    out = torch.empty_like(x)
    for idx in groups(tuple(x.shape), name):
        s = src[idx]
        out[idx] = ref_group(x[idx], s.min(), s.max(), bits, symmetric)
    return out


# --------------------------------------------------------------------------- tiny models


class HandCount(nn.Module):
    """conv(3->4, 3x3, pad 1) -> relu -> conv(4->8, 1x1) -> relu -> pool -> linear(8->10)."""

    def __init__(self, pool: str = "avg") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ManySites(nn.Module):
    """Every kind of call site: a ReLU module called twice, F.relu, torch.relu, x.relu(),
    in-place x.relu_(), F.relu6, an nn.ReLU6 module; plus BN, an unused layer and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(6, 8, 1)
        self.act6 = nn.ReLU6()
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 5)
        self.unused = nn.Linear(2, 2)
        self.register_buffer("unused_buf", torch.arange(3.0))

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x) + x)
        y = F.relu(self.conv3(x))
        y = torch.relu(y * 2.0)
        y = y.relu()
        y = self.conv4(y)
        y.relu_()
        y = F.relu6(y * 3.0)
        y = self.act6(y - 1.0)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def calib_batches(n: int = 3, shape=(4, 3, 8, 8), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    return [torch.randn(shape, generator=g) * scale for _ in range(n)]
