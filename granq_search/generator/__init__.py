"""Conditional generators: (noise z, label y) -> images (GRANQ.md section 3, step 1).

``build_generator(cfg, num_classes=..., image_size=..., channels=...)`` returns a module with
``forward(z, y)`` and ``sample_inputs(n, device=None, rng=None) -> (z, y)``.
"""

from granq_search.generator.build import AUTO_CBN_MIN_SIZE, build_generator, resolve_generator_kind
from granq_search.generator.networks import (
    SIZE_DIVISOR,
    CBNGenerator,
    ConditionalBatchNorm2d,
    ConditionalGenerator,
    EmbeddingGenerator,
)

__all__ = [
    "build_generator",
    "resolve_generator_kind",
    "AUTO_CBN_MIN_SIZE",
    "SIZE_DIVISOR",
    "ConditionalGenerator",
    "EmbeddingGenerator",
    "CBNGenerator",
    "ConditionalBatchNorm2d",
]
