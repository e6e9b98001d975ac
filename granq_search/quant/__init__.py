"""Quantization core: granularity types, the one fake-quant primitive, quantizer modules,
``prepare`` (swap quantizers into a float model), calibration and efficiency accounting.

Typical use::

    student = prepare(teacher, cfg.quant, example_input=torch.zeros(1, 3, 32, 32))
    if needs_calibration(student):
        calibrate(student, batches)           # static ranges, threshold decisions
    print(site_report(student), efficiency(student, (1, 3, 32, 32)))
"""

from granq_search.quant.calibrate import calibrate, needs_calibration, site_report
from granq_search.quant.efficiency import GRID_PRESERVING, efficiency
from granq_search.quant.fake_quant import EPS, fake_quantize, int_range, quant_params
from granq_search.quant.granularity import (
    ACT_GRANULARITIES,
    WEIGHT_GRANULARITIES,
    Granularity,
    PerChannel,
    PerKernel,
    PerOutputChannel,
    PerSampleChannel,
    PerTensor,
    ThresholdSelected,
    act_granularity,
    compute_range,
    reduce_dims,
    resolve,
    weight_granularity,
)
from granq_search.quant.modules import FLOAT, ActQuantizer, ActSpec, QuantConv2d, QuantLinear, WeightSpec
from granq_search.quant.prepare import ACT_CONTAINER, act_quantizers, load_float_state_dict, passthrough, prepare

__all__ = [
    # fake quantization
    "fake_quantize",
    "quant_params",
    "int_range",
    "EPS",
    # granularities
    "Granularity",
    "PerTensor",
    "PerChannel",
    "PerSampleChannel",
    "PerOutputChannel",
    "PerKernel",
    "ThresholdSelected",
    "ACT_GRANULARITIES",
    "WEIGHT_GRANULARITIES",
    "act_granularity",
    "weight_granularity",
    "reduce_dims",
    "compute_range",
    "resolve",
    # modules
    "ActSpec",
    "WeightSpec",
    "ActQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "FLOAT",
    # prepare / calibrate / report
    "prepare",
    "load_float_state_dict",
    "act_quantizers",
    "passthrough",
    "ACT_CONTAINER",
    "calibrate",
    "needs_calibration",
    "site_report",
    # efficiency
    "efficiency",
    "GRID_PRESERVING",
]
