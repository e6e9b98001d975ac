"""``evaluate``: accuracy of a teacher and, optionally, of its post-training quantized student.

    granq-search evaluate --model resnet20 \\
        --checkpoint ../shared/models/resnet20_cifar10_optionA.th \\
        --data imagefolder --data-root ../shared/data/cifar10/test --split all
    granq-search evaluate --quant --w-bits 4 --a-bits 4 --act-granularity per_sample_channel

Honest protocol: the labelled data is split once (``data.split_seed``) into validation and
test; calibration of static ranges or of the granularity threshold uses the first
``quant.calib_batches`` VALIDATION batches, never test. ``all`` is val and test together.
The flags are shorthands for dotted config overrides (``--w-bits 3`` is
``--set quant.weight.bits=3``) applied after ``--config`` and ``--set``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from granq_search import metrics as M
from granq_search.cli.common import add_config_flags, add_format_flag, add_runtime_flags, emit_json, set_threads
from granq_search.config import (
    BUILTIN_DATASETS,
    ExperimentConfig,
    list_presets,
    load_config,
    parse_set_args,
    to_dict,
    with_overrides,
)

__all__ = ["add_parser", "run", "FLAG_PATHS"]

FLAG_PATHS = {
    "model": "model.name",
    "checkpoint": "model.checkpoint",
    "num_classes": "model.num_classes",
    "data": "data.dataset",
    "data_root": "data.root",
    "max_samples": "data.max_samples",
    "batch_size": "data.batch_size",
    "w_bits": "quant.weight.bits",
    "a_bits": "quant.act.bits",
    "weight_granularity": "quant.weight.granularity",
    "act_granularity": "quant.act.granularity",
    "range_mode": "quant.act.range_mode",
    "threshold": "quant.act.threshold",
    "calib_batches": "quant.calib_batches",
}
"""Command-line flag (argparse dest) -> the dotted config field it overrides."""

_QUANT_FLAGS = ("w_bits", "a_bits", "weight_granularity", "act_granularity", "range_mode", "threshold",
                "calib_batches")
_SPLITS = ("val", "test", "all")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy of the FP teacher and its post-training quantized student",
        description="Evaluate the full-precision teacher on the validation and test splits (and both "
        "together), and with --quant (or any quantization flag) its post-training quantized student: "
        "top-1/top-5, the drop against full precision, and efficiency figures. Calibration uses "
        "validation batches only.")
    add_config_flags(p)
    g = p.add_argument_group("model and data (shorthands for --set)")
    g.add_argument("--model", metavar="NAME", help="registry name (see --list-models)")
    g.add_argument("--checkpoint", metavar="PATH", help="local weights file for the model")
    g.add_argument("--num-classes", type=int, metavar="N", help="classifier size (default: the model's)")
    g.add_argument("--data", metavar="DATASET",
                   help=f"evaluation dataset: {', '.join(BUILTIN_DATASETS)}, or MODULE:FACTORY for your own data")
    g.add_argument("--data-root", metavar="DIR", help="dataset folder (CIFAR root, image folder, ImageNet val)")
    g.add_argument("--max-samples", type=int, metavar="N", help="random subset of N images before splitting")
    g.add_argument("--batch-size", type=int, metavar="N", help="evaluation batch size")
    p.add_argument("--split", choices=_SPLITS, default=None,
                   help="report only this split (default: val, test and all)")
    q = p.add_argument_group("post-training quantization")
    q.add_argument("--quant", action="store_true", help="also evaluate the quantized student")
    q.add_argument("--w-bits", type=int, metavar="N", help="weight bits (2..8)")
    q.add_argument("--a-bits", type=int, metavar="N", help="activation bits (2..8)")
    q.add_argument("--weight-granularity", choices=["per_tensor", "per_channel", "per_kernel"])
    q.add_argument("--act-granularity", choices=["per_tensor", "per_channel", "per_sample_channel", "threshold"])
    q.add_argument("--range-mode", choices=["dynamic", "static"], help="activation ranges")
    q.add_argument("--threshold", type=float, metavar="TAU", help="tau for --act-granularity threshold")
    q.add_argument("--calib-batches", type=int, metavar="N", help="validation batches for calibration")
    add_runtime_flags(p)
    add_format_flag(p)
    p.add_argument("--list-models", action="store_true", help="list the registered models and exit")


# --------------------------------------------------------------------------- config


def _base_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.config is None or (args.config == "digits" and "digits" not in list_presets()):
        return ExperimentConfig()
    return load_config(args.config)


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The config file, then ``--set`` overrides, then the shorthand flags."""
    from granq_search.models import model_info

    cfg = _base_config(args)
    overrides: dict[str, Any] = parse_set_args(args.set)
    for dest, path in FLAG_PATHS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[path] = value
    new_name = overrides.get("model.name")
    if new_name is not None and new_name != cfg.model.name:
        # Another architecture: its own head size and input facts unless given explicitly.
        if "model.num_classes" not in overrides:
            overrides["model.num_classes"] = model_info(str(new_name)).num_classes
        for key in ("mean", "std", "image_size"):
            overrides.setdefault(f"model.{key}", None)
    return with_overrides(cfg, overrides) if overrides else cfg


def _quant_requested(args: argparse.Namespace) -> bool:
    return bool(args.quant) or any(getattr(args, d, None) is not None for d in _QUANT_FLAGS)


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        return _list_models(args.format)
    from granq_search.data import build_eval_data
    from granq_search.models import build_teacher, teacher_info
    from granq_search.pipeline.evaluation import combine, evaluate, resolve_device

    cfg = build_config(args)
    set_threads(args.threads)
    device = resolve_device(args.device)
    info = teacher_info(cfg.model)
    # Data first: a wrong folder fails in a second, before any download or training.
    data = build_eval_data(cfg.data, mean=info.mean, std=info.std, image_size=info.image_size,
                           num_classes=info.num_classes)
    teacher = build_teacher(cfg.model, device)
    splits = [args.split] if args.split else list(_SPLITS)
    needed = ("val", "test") if ("all" in splits or len(splits) > 1) else tuple(splits)
    loaders = {"val": data.val, "test": data.test}

    def measure(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        res = {name: evaluate(model, loaders[name], device) for name in needed}
        if "all" in splits:
            res["all"] = combine(res["val"], res["test"])
        return {s: res[s] for s in splits}

    fp = measure(teacher.model)
    quant_doc: dict[str, Any] | None = None
    q: dict[str, dict[str, float]] | None = None
    if _quant_requested(args):
        student, calibrated, eff = _quantize(teacher.model, cfg, data.val, device)
        q = measure(student)
        quant_doc = {"config": to_dict(cfg.quant), "calibrated_on": calibrated, "efficiency": eff}

    doc = {
        "command": "evaluate",
        "model": {"name": info.name, "num_classes": info.num_classes, "image_size": info.image_size,
                  "mean": list(info.mean), "std": list(info.std), "source": teacher.source,
                  "checkpoint_sha256": teacher.checkpoint_sha256},
        "data": {k: v for k, v in data.meta.items() if k != "classes"},
        "device": str(device),
        "splits": {s: _split_doc(fp[s], q[s] if q else None) for s in splits},
        "quant": quant_doc,
    }
    if args.format == "json":
        emit_json(doc)
    else:
        _print_table(doc)
    return 0


def _quantize(model: torch.nn.Module, cfg: ExperimentConfig, val_loader, device: torch.device):
    """The post-training student of the teacher ``model``, calibrated (where it needs it) on the
    first ``quant.calib_batches`` validation batches; what it was calibrated on; its efficiency."""
    from granq_search.pipeline.build import build_student, calibrate_student, efficiency_figures

    student, shape = build_student(cfg, device, float_model=model)

    def val_batches() -> list[torch.Tensor]:
        batches = []
        for x, _ in val_loader:
            batches.append(x.to(device))
            if len(batches) >= cfg.quant.calib_batches:
                break
        return batches

    batches = calibrate_student(student, val_batches)
    calibrated = None
    if batches is not None:
        calibrated = {"split": "val", "batches": len(batches), "images": int(sum(b.shape[0] for b in batches))}
    return student, calibrated, efficiency_figures(student, shape)


def _split_doc(fp: dict[str, float], q: dict[str, float] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"n": fp["n"], "fp": {k: fp[k] for k in ("top1", "top5", "loss")}}
    if q is not None:
        out["quant"] = {k: q[k] for k in ("top1", "top5", "loss")}
        out["drop_top1"] = fp["top1"] - q["top1"]
        out["drop_top5"] = fp["top5"] - q["top5"]
    return out


# --------------------------------------------------------------------------- output


def _list_models(fmt: str) -> int:
    from granq_search.models import list_models, model_info

    infos = [model_info(n) for n in list_models()]
    if fmt == "json":
        emit_json([{"name": i.name, "dataset": i.dataset, "num_classes": i.num_classes,
                    "image_size": i.image_size, "in_channels": i.in_channels, "mean": list(i.mean),
                    "std": list(i.std), "description": i.description} for i in infos])
        return 0
    print(f"{'name':<18} {'dataset':<9} {'classes':>7} {'input':>9}  description")
    for i in infos:
        shape = f"{i.in_channels}x{i.image_size}x{i.image_size}"
        print(f"{i.name:<18} {i.dataset:<9} {i.num_classes:>7} {shape:>9}  {i.description}")
    return 0


def _fmt_big(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _print_table(doc: dict[str, Any]) -> None:
    m, d = doc["model"], doc["data"]
    sha = f", sha256 {m['checkpoint_sha256'][:12]}" if m["checkpoint_sha256"] else ""
    print(f"teacher  {m['name']} ({m['source']}{sha})")
    where = f" {d['root']}" if d.get("root") else ""
    print(f"data     {d['dataset']}{where}: {d['n_total']} images -> val {d['n_val']} / test {d['n_test']} "
          f"(split_seed {d['split_seed']}, val_fraction {d['val_fraction']})")
    qd = doc["quant"]
    if qd is not None:
        c = qd["config"]
        cal = qd["calibrated_on"]
        calib = (f", calibrated on {cal['images']} val images ({cal['batches']} batch"
                 f"{'' if cal['batches'] == 1 else 'es'})" if cal else "")
        print(f"student  W{c['weight']['bits']}A{c['act']['bits']}, weights {c['weight']['granularity']}, "
              f"activations {c['act']['granularity']} ({c['act']['range_mode']} ranges){calib}")
    print()
    head = f"{'split':<6} {'n':>6} {'FP top-1':>9} {'FP top-5':>9}"
    if qd is not None:
        head += f" {'Q top-1':>8} {'Q top-5':>8} {'drop':>6}"
    print(head)
    for name, s in doc["splits"].items():
        row = f"{name:<6} {s['n']:>6} {s['fp']['top1']:>9.2f} {s['fp']['top5']:>9.2f}"
        if qd is not None:
            row += f" {s['quant']['top1']:>8.2f} {s['quant']['top5']:>8.2f} {s['drop_top1']:>6.2f}"
        print(row)
    if qd is not None and qd["efficiency"]:
        e = qd["efficiency"]
        parts = []
        if M.BITOPS in e:
            fp = f" of {_fmt_big(float(e[M.BITOPS_FP]))} FP" if M.BITOPS_FP in e else ""
            parts.append(f"bitops {_fmt_big(float(e[M.BITOPS]))}{fp}")
        if M.SIZE_BITS in e:
            fp = f" of {float(e[M.SIZE_BITS_FP]) / 8e3:.1f} kB FP" if M.SIZE_BITS_FP in e else ""
            parts.append(f"size {float(e[M.SIZE_BITS]) / 8e3:.1f} kB{fp}")
        if M.COMPRESSION in e:
            parts.append(f"compression {float(e[M.COMPRESSION]):.2f}x")
        if M.ACT_SCALE_FACTORS in e:
            parts.append(f"activation scale factors {_fmt_big(float(e[M.ACT_SCALE_FACTORS]))}")
        if M.FINE_FRACTION in e:
            parts.append(f"fine-grained sites {100 * float(e[M.FINE_FRACTION]):.0f}%")
        print()
        print("efficiency: " + ", ".join(parts))
