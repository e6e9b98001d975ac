"""Zero-shot QAT of the shared CIFAR-10 ResNet-20 (../shared), post-training vs after QAT.

    .venv/bin/python bench/qat_cifar.py --bits 4 3 --act per_tensor per_channel per_sample_channel \
        --weight per_kernel --range dynamic --epochs 8 --iters 50 --batch 32 --lr 5e-4

Each run: the pipeline of ``train`` (generator + QAT) with the given budget; validation half of
the 10,000 JPEGs for selection, test half reported. Results are appended to
``docs/qat_cifar_runs.jsonl`` (one line per run, so an interrupted sweep keeps what finished)
and the table in docs/results.md ("QAT on the shared CIFAR-10 ResNet-20") is rebuilt from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._doc import DOCS, write_section  # noqa: E402
from granq_search.config import load_config, with_overrides  # noqa: E402
from granq_search.pipeline.build import resolve_config  # noqa: E402
from granq_search.pipeline.trainer import build_setup, run_training  # noqa: E402

SHARED = (ROOT.parent / "shared").resolve()
RUNS = DOCS / "qat_cifar_runs.jsonl"


def base_overrides(args) -> dict:
    return {
        "model.name": "resnet20",
        "model.checkpoint": str(SHARED / "models" / "resnet20_cifar10_optionA.th"),
        "data.dataset": "imagefolder",
        "data.root": str(SHARED / "data" / "cifar10" / "test"),
        "data.batch_size": 500,
        "train.epochs": args.epochs,
        "train.warmup_epochs": args.warmup,
        "train.iters_per_epoch": args.iters,
        "train.batch_size": args.batch,
        "optim.student.lr": args.lr,
        "optim.schedule": args.schedule,
        "train.seed": args.seed,
    }


def table() -> str:
    rows = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()] if RUNS.exists() else []
    lines = ["| W/A | activations | weights | ranges | budget (epochs x iters, batch, lr) | FP test | "
             "post-training test | QAT test (best-val epoch) | QAT test (final) | gain | minutes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = r["best_test_top1"] - r["ptq_test_top1"]
        lines.append(
            f"| W{r['w_bits']}A{r['a_bits']} | {r['act']} | {r['weight']} | {r['range']} | "
            f"{r['epochs']}x{r['iters']}, {r['batch']}, {r['lr']:g} {r['schedule']} | {r['teacher_test_top1']:.2f} | "
            f"{r['ptq_test_top1']:.2f} | {r['best_test_top1']:.2f} | {r['test_top1']:.2f} | {gain:+.2f} | "
            f"{r['minutes']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--act", nargs="+", default=["per_sample_channel", "per_channel", "per_tensor"])
    ap.add_argument("--weight", nargs="+", default=["per_kernel"])
    ap.add_argument("--range", nargs="+", default=["dynamic"])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--schedule", default="cosine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.table_only:
        if not (SHARED / "models" / "resnet20_cifar10_optionA.th").is_file():
            sys.exit(f"../shared not found at {SHARED}: this benchmark needs the shared checkpoint and data")
        cfg0 = with_overrides(load_config("cifar10_resnet20"), base_overrides(args))
        setup = build_setup(cfg0, "cpu")
        for bits, act, weight, rng in itertools.product(args.bits, args.act, args.weight, args.range):
            cfg = resolve_config(with_overrides(cfg0, {
                "quant.weight.bits": bits, "quant.act.bits": bits, "quant.act.granularity": act,
                "quant.weight.granularity": weight, "quant.act.range_mode": rng}))
            t0 = time.perf_counter()
            m = run_training(cfg, setup=dataclasses.replace(setup, cfg=cfg)).metrics
            rec = {"w_bits": bits, "a_bits": bits, "act": act, "weight": weight, "range": rng,
                   "epochs": args.epochs, "iters": args.iters, "batch": args.batch, "lr": args.lr,
                   "schedule": args.schedule, "seed": args.seed, "minutes": (time.perf_counter() - t0) / 60,
                   **{k: m[k] for k in ("teacher_val_top1", "teacher_test_top1", "ptq_val_top1", "ptq_test_top1",
                                         "best_val_top1", "best_test_top1", "best_epoch", "val_top1", "test_top1")},
                   "val_curve": [round(h["val_top1"], 2) for h in m["history"]]}
            with RUNS.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(json.dumps(rec), flush=True)
    body = ("Shared ResNet-20 (option A) on the shared CIFAR-10 JPEG folder: validation half (5,000 images, "
            "seed 0) selects the epoch, the test half (5,000) is reported. FP = the teacher on the same test "
            "half. Command: `.venv/bin/python bench/qat_cifar.py` with the flags in the budget column "
            "(2 CPU cores). Raw records: `docs/qat_cifar_runs.jsonl`.\n\n" + table())
    write_section("results.md", "QAT on the shared CIFAR-10 ResNet-20", body, title="# Results")
    print(table())


if __name__ == "__main__":
    main()
