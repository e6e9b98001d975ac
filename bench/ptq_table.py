#!/usr/bin/env python
"""Post-training quantization table of the shared ResNet-20 on the shared CIFAR-10 JPEG folder.

    .venv/bin/python bench/ptq_table.py                 # print the table
    .venv/bin/python bench/ptq_table.py --write         # ... and replace the section in docs/results.md

No generator and no QAT: the FP teacher is quantized (asymmetric min/max fake quantization),
optionally calibrated on validation batches, and evaluated on the validation and test splits of
the 10,000 images (``all`` = both). Grid: W/A bits x activation granularity (per tensor, per
channel over the batch, GranQ per sample and channel) x weight granularity (per output channel,
per kernel), dynamic ranges, with the package default of quantizing every conv AND the final
linear layer. A second table repeats the per-kernel W4A4/W3A3 cells with the linear layer in
full precision, the setting of the reference points in ../shared/README.md, next to them
(``--no-reference`` skips it).

The JPEG files are decoded once per run; ``torch.set_num_threads`` defaults to 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Post-training quantization"
ACTS = ("per_tensor", "per_channel", "per_sample_channel")
ACT_TITLES = {"per_tensor": "per tensor", "per_channel": "per channel", "per_sample_channel": "GranQ (sample, channel)"}
WEIGHTS = ("per_channel", "per_kernel")


def _shared() -> Path:
    return Path(os.environ.get("GRANQ_SHARED", REPO.parent / "shared")).resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bits", type=int, nargs="+", default=[5, 4, 3])
    p.add_argument("--no-reference", action="store_true",
                   help="skip the linear-in-FP comparison with ../shared/README.md's reference points")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-samples", type=int, default=None, help="quick runs only")
    p.add_argument("--write", action="store_true", help=f"replace '{SECTION}' in docs/results.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from granq_search.config import DataConfig, ModelConfig, QuantConfig, from_dict
    from granq_search.data import build_eval_data
    from granq_search.models import build_teacher
    from granq_search.pipeline.evaluation import combine, evaluate
    from granq_search.quant import calibrate, efficiency, needs_calibration, prepare

    shared = _shared()
    ckpt = shared / "models" / "resnet20_cifar10_optionA.th"
    folder = shared / "data" / "cifar10" / "test"
    if not ckpt.is_file() or not folder.is_dir():
        print(f"../shared not found at {shared}; set GRANQ_SHARED", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    teacher = build_teacher(ModelConfig(name="resnet20", checkpoint=str(ckpt)), "cpu")
    info = teacher.info
    dcfg = DataConfig(dataset="imagefolder", root=str(folder), batch_size=args.batch_size,
                      max_samples=args.max_samples)
    data = build_eval_data(dcfg, mean=info.mean, std=info.std, image_size=info.image_size,
                           num_classes=info.num_classes)
    # Materialise the batches once: every configuration sees exactly the same tensors.
    val = list(data.val)
    test = list(data.test)
    print(f"decoded {data.meta['n_val'] + data.meta['n_test']} images in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)

    def measure(model):
        v, t = evaluate(model, val, "cpu"), evaluate(model, test, "cpu")
        return {"val": v, "test": t, "all": combine(v, t)}

    fp = measure(teacher.model)
    print(f"FP: all {fp['all']['top1']:.2f} val {fp['val']['top1']:.2f} test {fp['test']['top1']:.2f}",
          file=sys.stderr)
    shape = (1, info.in_channels, info.image_size, info.image_size)

    def cell(bits: int, wg: str, ag: str, fp_linear: bool) -> dict:
        overrides = [{"pattern": "linear", "quantize": False}] if fp_linear else []
        qcfg = from_dict({"weight": {"bits": bits, "granularity": wg},
                          "act": {"bits": bits, "granularity": ag, "range_mode": "dynamic"},
                          "overrides": overrides}, QuantConfig)
        t = time.perf_counter()
        student = prepare(copy.deepcopy(teacher.model), qcfg, example_input=torch.zeros(shape)).eval()
        if needs_calibration(student):  # not for dynamic ranges; kept for other grids
            calibrate(student, [x for x, _ in val[: qcfg.calib_batches]])
        res = measure(student)
        eff = efficiency(student, shape)
        print(f"W{bits}A{bits} w={wg:<11} a={ag:<18} linear={'fp' if fp_linear else 'q '} "
              f"all {res['all']['top1']:6.2f} val {res['val']['top1']:6.2f} test {res['test']['top1']:6.2f} "
              f"({time.perf_counter() - t:.0f}s)", file=sys.stderr)
        return {"bits": bits, "weight": wg, "act": ag, **{k: res[k]["top1"] for k in res},
                "compression": float(eff.get("compression", float("nan")))}

    rows = [cell(b, wg, ag, False) for b in args.bits for wg in WEIGHTS for ag in ACTS]
    ref_rows = [] if args.no_reference else [cell(b, "per_kernel", ag, True) for b in (4, 3) for ag in ACTS]
    text = render(rows, ref_rows, fp, data.meta, args, teacher.checkpoint_sha256)
    print(text)
    if args.write:
        write_section(REPO / "docs" / "results.md", text)
        print("wrote docs/results.md", file=sys.stderr)
    return 0


REFERENCE = {  # ../shared/README.md: W/A 4/4 and 3/3, weights per kernel, linear layer in FP
    (4, "per_tensor"): 75.00, (4, "per_channel"): 75.50, (4, "per_sample_channel"): 79.03,
    (3, "per_tensor"): 45.22, (3, "per_channel"): 60.47, (3, "per_sample_channel"): 71.61,
}


def render(rows, ref_rows, fp, meta, args, sha) -> str:
    cmd = "python bench/ptq_table.py --write"
    linear = "quantized like the convolutions (the package default)"
    lines = [
        SECTION,
        "",
        f"The shared CIFAR-10 ResNet-20 (option A, sha256 `{sha[:12]}`) on the shared CIFAR-10 JPEG "
        f"folder: {meta['n_val'] + meta['n_test']} images, split by `data.split_seed={meta['split_seed']}` into "
        f"val {meta['n_val']} / test {meta['n_test']}. Post-training only: no generator, no QAT. Asymmetric "
        "min/max fake quantization, **dynamic** ranges (recomputed on every batch), activation quantizers at "
        f"every ReLU output, every conv quantized, the final linear layer {linear}. "
        f"Evaluation batch size {args.batch_size} (per-tensor and per-channel activation ranges are taken "
        "over the batch, so they depend on it; GranQ's per-(sample, channel) ranges do not).",
        "",
        f"Full precision: **{fp['all']['top1']:.2f}** top-1 on all images (val {fp['val']['top1']:.2f}, "
        f"test {fp['test']['top1']:.2f}).",
        "",
        "Top-1 % on all images (val + test):",
        "",
        "| W/A bits | weights | act. per tensor | act. per channel | act. GranQ (sample, channel) |",
        "|---|---|---|---|---|",
    ]
    by = {(r["bits"], r["weight"], r["act"]): r for r in rows}
    for bits in args.bits:
        for wg in WEIGHTS:
            cells = [f"{by[(bits, wg, a)]['all']:.2f}" if (bits, wg, a) in by else "" for a in ACTS]
            lines.append(f"| {bits}/{bits} | {wg.replace('_', ' ')} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per split (top-1 %, val / test), and the model compression (FP32 bits / quantized bits):",
        "",
        "| W/A | weights | activations | val | test | all | compression |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['bits']}/{r['bits']} | {r['weight'].replace('_', ' ')} | {ACT_TITLES[r['act']]} | "
                     f"{r['val']:.2f} | {r['test']:.2f} | {r['all']:.2f} | {r['compression']:.2f}x |")
    if ref_rows:
        lines += [
            "",
            "Same protocol with the final linear layer left in full precision "
            "(`--set 'quant.overrides=[{pattern: linear, quantize: false}]'`), next to the reference "
            "points of `../shared/README.md` (weights per kernel; top-1 % on all images):",
            "",
            "| W/A bits | act. per tensor (ours / ref.) | act. per channel (ours / ref.) | "
            "act. GranQ (ours / ref.) |",
            "|---|---|---|---|",
        ]
        rb = {(r["bits"], r["act"]): r for r in ref_rows}
        for bits in (4, 3):
            cells = [f"{rb[(bits, a)]['all']:.2f} / {REFERENCE[(bits, a)]:.2f}" for a in ACTS if (bits, a) in rb]
            lines.append(f"| {bits}/{bits} | " + " | ".join(cells) + " |")
        lines += ["", NOTE]
    lines += [
        "",
        f"Produced by `{cmd}` (CPU, {args.threads} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}). The same teacher figure comes from",
        "`python tune_main.py evaluate --model resnet20 --checkpoint ../shared/models/resnet20_cifar10_optionA.th "
        "--data imagefolder --data-root ../shared/data/cifar10/test --split all`; add "
        "`--quant --w-bits 4 --a-bits 4 --weight-granularity per_kernel --act-granularity per_sample_channel` "
        "for one cell of the table.",
        "",
    ]
    return "\n".join(lines)


NOTE = (
    "The ordering of the reference is reproduced (per tensor < per channel < GranQ at W4A4 and W3A3), "
    "but not every figure: ours are 1.5-3 points lower at W4A4 and 1-5 points higher at W3A3. An "
    "independent re-implementation of GRANQ.md section 2 (the public quantizer, no clamp, a few lines "
    "written without this package, weights per kernel, activations at every F.relu) agrees with the "
    "package within 0.6 points: W4A4 linear in FP, batch 256: 72.65 / 74.45 / 77.10 (package 72.08 / "
    "74.03 / 77.31); GranQ with the linear layer quantized per row: W4A4 77.94 (package 78.22), W3A3 "
    "73.54 (package 73.00). So the gap to the reference is a setting of the reference run we do not "
    "know, not a quantizer bug we could find. Both implementations also score slightly higher with "
    "the linear layer quantized than in FP: at these bit-widths a configuration moves by about a point "
    "with any extra perturbation. Compare variants within this table, not against the reference."
)


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the ``## Post-training quantization`` section, keeping the rest."""
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Results\n"
    lines = old.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == SECTION), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new if new.endswith("\n") else new + "\n", encoding="utf-8")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
