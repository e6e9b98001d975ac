"""Build the configured generator for a teacher's geometry (classes, image size, channels)."""

from __future__ import annotations

from granq_search.config import GeneratorConfig
from granq_search.errors import ConfigError
from granq_search.generator.networks import (
    SIZE_DIVISOR,
    CBNGenerator,
    ConditionalGenerator,
    EmbeddingGenerator,
)

__all__ = ["AUTO_CBN_MIN_SIZE", "resolve_generator_kind", "build_generator"]

AUTO_CBN_MIN_SIZE = 64
"""``kind="auto"`` picks the class-conditional-BN (ImageNet) generator from this size up."""

_KINDS = {"embedding": EmbeddingGenerator, "cbn": CBNGenerator}


def resolve_generator_kind(kind: str, image_size: int) -> str:
    """``"embedding"`` or ``"cbn"``; ``"auto"`` is cbn for images of 64 px and more."""
    if kind == "auto":
        return "cbn" if image_size >= AUTO_CBN_MIN_SIZE else "embedding"
    if kind not in _KINDS:
        allowed = ", ".join(repr(k) for k in ("auto", *_KINDS))
        raise ConfigError(f"{kind!r} is not allowed; choose one of {allowed}", field="generator.kind")
    return kind


def build_generator(cfg: GeneratorConfig, *, num_classes: int, image_size: int,
                    channels: int) -> ConditionalGenerator:
    """A fresh generator whose ``forward(z, y)`` returns (N, channels, image_size, image_size).

    Raises :class:`ConfigError` when ``image_size`` is not a positive multiple of 4 (field
    ``model.image_size``), when ``num_classes < 1`` (``model.num_classes``) or ``channels < 1``.
    """
    if image_size < SIZE_DIVISOR or image_size % SIZE_DIVISOR:
        raise ConfigError(
            f"{image_size} px is not a positive multiple of {SIZE_DIVISOR}; the generator "
            f"upsamples twice by 2 from image_size/{SIZE_DIVISOR}", field="model.image_size")
    if num_classes < 1:
        raise ConfigError(f"{num_classes} must be >= 1", field="model.num_classes")
    if channels < 1:
        raise ConfigError(f"the generator needs at least one image channel, got {channels}")
    cls = _KINDS[resolve_generator_kind(cfg.kind, image_size)]
    return cls(latent_dim=cfg.latent_dim, num_classes=num_classes, image_size=image_size,
               channels=channels, width=cfg.channels, bn_eps=cfg.bn_eps)
