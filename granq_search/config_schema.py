"""The experiment config's sections: nested frozen dataclasses with their range checks.

:mod:`granq_search.config` is the public face (strict load and dump, dotted paths, presets) and
re-exports every class defined here; import from there.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from granq_search.errors import ConfigError
from granq_search.user_code import IMPORT_PATH, is_import_path

CONFIG_VERSION = 1

ActGranularityName = Literal["per_tensor", "per_channel", "per_sample_channel", "threshold"]
WeightGranularityName = Literal["per_tensor", "per_channel", "per_kernel"]
RangeMode = Literal["dynamic", "static"]


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(message, field=field_name)


def _bits(value: int, name: str) -> None:
    _require(2 <= value <= 8, name, f"{value} bits is out of range; allowed 2..8")


def _positive(value: float, name: str) -> None:
    _require(math.isfinite(value) and value > 0, name, f"{value} must be a finite number > 0")


def _non_negative(value: float, name: str) -> None:
    _require(math.isfinite(value) and value >= 0, name, f"{value} must be a finite number >= 0")


class _Section:
    """Base of every config section: checks Literal fields, then the section's own rules."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            hint = hints[f.name]
            for lit in _literals(hint):
                if value not in typing.get_args(lit) and not (value is None and _is_optional(hint)):
                    allowed = ", ".join(repr(a) for a in typing.get_args(lit))
                    raise ConfigError(f"{value!r} is not allowed; choose one of {allowed}", field=f.name)
        self._validate()

    def _validate(self) -> None:  # pragma: no cover - overridden where there are rules
        pass


def _literals(hint: Any) -> list[Any]:
    if typing.get_origin(hint) is Literal:
        return [hint]
    return [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal]


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True)
class ActQuantConfig(_Section):
    """Activation quantizers: where they sit (``placement``), their bits, granularity and ranges."""

    bits: int = 4
    """Bit-width, 2..8 (asymmetric, integer zero point)."""
    granularity: ActGranularityName = "per_sample_channel"
    """per_tensor: one range per layer; per_channel: one per channel over the batch;
    per_sample_channel: GranQ, one per (sample, channel); threshold: chosen per site by tau."""
    threshold: float = 0.5
    """tau in [0, 1] for granularity 'threshold': a site is fine-grained when the relative MSE
    reduction of per-(sample, channel) over per-tensor is at least tau."""
    range_mode: RangeMode = "dynamic"
    """dynamic: min/max recomputed on every forward; static: calibrated then frozen."""
    placement: Literal["relu_output", "layer_input"] = "relu_output"
    """relu_output: a quantizer at every ReLU/ReLU6 output (the public GranQ code; in a ResNet the
    residual stream is quantized too). layer_input: a quantizer at the input of every Conv2d and
    Linear (not the first layer's, which reads the image); the residual stream stays in float,
    or at ``residual_bits``."""
    residual_bits: int | None = None
    """Only with placement layer_input: quantize the ReLU outputs (the residual stream in a
    ResNet) at this bit-width, 2..8, with the same granularity and range mode; None: float."""

    def _validate(self) -> None:
        _bits(self.bits, "bits")
        _require(0.0 <= self.threshold <= 1.0, "threshold", f"{self.threshold} is outside [0, 1]")
        if self.residual_bits is not None:
            _require(self.placement == "layer_input", "residual_bits",
                     f"{self.residual_bits} is set, but the residual stream only has its own precision with "
                     "placement 'layer_input' (at 'relu_output' it is quantized at act.bits); set it to null")
            _bits(self.residual_bits, "residual_bits")


@dataclass(frozen=True)
class WeightQuantConfig(_Section):
    """Weight quantizers for every Conv2d and Linear."""

    bits: int = 4
    granularity: WeightGranularityName = "per_channel"
    """per_channel: one range per output channel; per_kernel: one per (out, in) kernel, 1x1
    kernels fall back to per output channel (reported); per_tensor: one per layer."""
    symmetric: bool = False

    def _validate(self) -> None:
        _bits(self.bits, "bits")


@dataclass(frozen=True)
class LayerOverride(_Section):
    """Per-layer exception matched on module names with fnmatch (``conv1``, ``layer3.*``)."""

    pattern: str = ""
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_granularity: WeightGranularityName | None = None
    act_granularity: ActGranularityName | None = None
    quantize: bool = True
    """False leaves matching layers (and the activations after them) in full precision."""

    def _validate(self) -> None:
        _require(bool(self.pattern), "pattern", "an override needs a non-empty module-name pattern")
        if self.weight_bits is not None:
            _bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            _bits(self.act_bits, "act_bits")


@dataclass(frozen=True)
class QuantConfig(_Section):
    weight: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    overrides: tuple[LayerOverride, ...] = ()
    calib_batches: int = 4
    """Generated (or, for post-training evaluation, validation) batches used for static-range
    calibration and threshold selection."""

    def _validate(self) -> None:
        _require(self.calib_batches >= 1, "calib_batches", f"{self.calib_batches} must be >= 1")


# --------------------------------------------------------------------------- model and data

BUILTIN_DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "imagenet")
"""``data.dataset`` values built into granq_search (any other value is an import path)."""


def _import_path_syntax(value: str, name: str) -> None:
    """A value with a colon must be a well-formed import path ``MODULE:CALLABLE``."""
    if is_import_path(value):
        _require(IMPORT_PATH.match(value) is not None, name,
                 f"{value!r} is not an import path; write MODULE:CALLABLE, for example mymodels:small_cnn")


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = "digits_cnn"
    """A built-in model (``granq-search evaluate --list-models``), or your own factory by import
    path ``MODULE:FACTORY`` (decorated with ``granq_search.models.model_factory``)."""
    num_classes: int = 10
    checkpoint: str | None = None
    """Local checkpoint file; None: the registry's source (pretrained download when online,
    or the on-the-spot trained digits teacher)."""
    pretrained: bool = True
    """Fetch published weights when no checkpoint is given (needs network for most models)."""
    mean: tuple[float, ...] | None = None
    """Input normalisation the teacher was trained with; None: the registry entry's."""
    std: tuple[float, ...] | None = None
    image_size: int | None = None

    def _validate(self) -> None:
        _require(bool(self.name), "name", "a model name is required")
        _import_path_syntax(self.name, "name")
        _require(self.num_classes >= 2, "num_classes", f"{self.num_classes} must be >= 2")
        if self.std is not None:
            _require(all(s > 0 for s in self.std), "std", "every std must be > 0")
        if self.image_size is not None:
            _require(self.image_size >= 4, "image_size", f"{self.image_size} must be >= 4")


@dataclass(frozen=True)
class DataConfig(_Section):
    dataset: str = "digits"
    """A built-in dataset (:data:`BUILTIN_DATASETS`), or your own data factory by import path
    ``MODULE:FACTORY`` (contract: :mod:`granq_search.data.custom`)."""
    root: str | None = None
    """Data directory (CIFAR root, image folder, ImageNet val folder; passed to your own data
    factory as ``root``); unused for digits."""
    download: bool = False
    """Download CIFAR when missing (needs network)."""
    val_fraction: float = 0.5
    """Share of the labelled evaluation data used for validation (model selection); the rest
    is the test split, reported and never used for any choice."""
    split_seed: int = 0
    max_samples: int | None = None
    """Cap on evaluation images before splitting (quick runs); None: all."""
    batch_size: int = 256
    num_workers: int = 0

    def _validate(self) -> None:
        if not is_import_path(self.dataset):
            allowed = ", ".join(repr(d) for d in BUILTIN_DATASETS)
            _require(self.dataset in BUILTIN_DATASETS, "dataset",
                     f"{self.dataset!r} is not allowed; choose one of {allowed}, or MODULE:FACTORY for your own data")
        _import_path_syntax(self.dataset, "dataset")
        _require(0.0 < self.val_fraction < 1.0, "val_fraction", f"{self.val_fraction} must be in (0, 1)")
        _require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        _require(self.num_workers >= 0, "num_workers", f"{self.num_workers} must be >= 0")
        if self.max_samples is not None:
            _require(self.max_samples >= 2, "max_samples", f"{self.max_samples} must be >= 2")


# --------------------------------------------------------------------------- generator and losses


@dataclass(frozen=True)
class GeneratorConfig(_Section):
    kind: Literal["auto", "embedding", "cbn"] = "auto"
    """embedding: label embedding times noise (CIFAR); cbn: class-conditional BN (ImageNet);
    auto: cbn for images of 64 px and more."""
    latent_dim: int = 100
    channels: int = 128
    bn_eps: float = 1e-5
    """BatchNorm epsilon (the public code passes 0.8 here by mistake)."""

    def _validate(self) -> None:
        _require(self.latent_dim >= 1, "latent_dim", f"{self.latent_dim} must be >= 1")
        _require(self.channels >= 4, "channels", f"{self.channels} must be >= 4")
        _positive(self.bn_eps, "bn_eps")


@dataclass(frozen=True)
class LossConfig(_Section):
    alpha_ds: float = 0.2
    """Weight of the disagreement cross-entropy CE(z_T - z_S, y) in the generator loss."""
    alpha_as: float = 0.1
    """Weight of the agreement cross-entropy CE(z_T + z_S, y) in the generator loss."""
    beta: float = 1.0
    """Weight of the (alpha_ds, alpha_as) cross-entropy block."""
    gamma: float = 1.0
    """Weight of the BN-statistics loss."""
    lambda_l: float = 0.1
    """Lower margin on the normalised entropy of softmax(z_T - z_S)."""
    lambda_u: float = 0.8
    """Upper margin on the normalised entropy."""
    student_loss: Literal["entropy", "kl"] = "entropy"
    """entropy: the public recipe, -T^2 * entropy(softmax((z_T - z_S)/T)); kl: distillation."""
    temperature: float = 20.0

    def _validate(self) -> None:
        for name in ("alpha_ds", "alpha_as", "beta", "gamma"):
            _non_negative(getattr(self, name), name)
        _require(0.0 <= self.lambda_l <= 1.0, "lambda_l", f"{self.lambda_l} is outside [0, 1]")
        _require(0.0 <= self.lambda_u <= 1.0, "lambda_u", f"{self.lambda_u} is outside [0, 1]")
        _require(self.lambda_l <= self.lambda_u, "lambda_l", "must not exceed lambda_u")
        _positive(self.temperature, "temperature")


# --------------------------------------------------------------------------- optimisation


@dataclass(frozen=True)
class StudentOptimConfig(_Section):
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = True

    def _validate(self) -> None:
        _positive(self.lr, "lr")
        _require(0.0 <= self.momentum < 1.0, "momentum", f"{self.momentum} must be in [0, 1)")
        _non_negative(self.weight_decay, "weight_decay")
        _require(not self.nesterov or self.momentum > 0, "nesterov", "Nesterov needs momentum > 0")


@dataclass(frozen=True)
class GeneratorOptimConfig(_Section):
    lr: float = 1e-3
    beta1: float = 0.5
    beta2: float = 0.999

    def _validate(self) -> None:
        _positive(self.lr, "lr")
        _require(0.0 <= self.beta1 < 1.0, "beta1", f"{self.beta1} must be in [0, 1)")
        _require(0.0 <= self.beta2 < 1.0, "beta2", f"{self.beta2} must be in [0, 1)")


@dataclass(frozen=True)
class OptimConfig(_Section):
    student: StudentOptimConfig = field(default_factory=StudentOptimConfig)
    generator: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    schedule: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: tuple[int, ...] = (100,)
    """Epochs (counted from the start of training, warm-up included) at which multistep
    multiplies both learning rates by lr_decay."""
    lr_decay: float = 0.1

    def _validate(self) -> None:
        _require(all(m >= 1 for m in self.milestones), "milestones", "epochs must be >= 1")
        _require(list(self.milestones) == sorted(self.milestones), "milestones", "must be increasing")
        _require(0.0 < self.lr_decay <= 1.0, "lr_decay", f"{self.lr_decay} must be in (0, 1]")


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 200
    """Total epochs, warm-up included."""
    warmup_epochs: int = 4
    """Leading epochs in which only the generator learns."""
    iters_per_epoch: int = 200
    batch_size: int = 32
    """Generated images per iteration."""
    student_bn: Literal["eval", "train"] = "eval"
    """eval: the published recipe (student BN keeps the teacher's running statistics)."""
    seed: int = 0
    grad_clip: float | None = None
    """Clip the global gradient norm of each network (None: no clipping)."""

    def _validate(self) -> None:
        _require(self.epochs >= 1, "epochs", f"{self.epochs} must be >= 1")
        _require(0 <= self.warmup_epochs < self.epochs, "warmup_epochs",
                 f"{self.warmup_epochs} must be in [0, epochs) = [0, {self.epochs})")
        _require(self.iters_per_epoch >= 1, "iters_per_epoch", f"{self.iters_per_epoch} must be >= 1")
        _require(self.batch_size >= 2, "batch_size", f"{self.batch_size} must be >= 2")
        if self.grad_clip is not None:
            _positive(self.grad_clip, "grad_clip")


@dataclass(frozen=True)
class ExperimentConfig(_Section):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
