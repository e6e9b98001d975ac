"""Time one QAT iteration with the quantized student vs the same iteration with an FP student.

    .venv/bin/python bench/qat_iteration.py [--model resnet20] [--batch 32] [--iters 20]

Both iterations run the identical pipeline step (generator step on L_G, student step on L_S,
``granq_search.pipeline.trainer.qat_step``); only the student differs. Goal: at most 1.5x.
Writes the table to docs/benchmarks.md ("QAT iteration time").
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._doc import write_section  # noqa: E402
from granq_search.config import ExperimentConfig, with_overrides  # noqa: E402
from granq_search.generator import build_generator  # noqa: E402
from granq_search.models import create_model, model_info  # noqa: E402
from granq_search.pipeline.trainer import qat_step  # noqa: E402
from granq_search.quant import prepare  # noqa: E402


def time_student(student, teacher, cfg, info, batch, iters, warmup=3):
    gen = build_generator(cfg.generator, num_classes=info.num_classes, image_size=info.image_size,
                          channels=info.in_channels)
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=1e-4, momentum=0.9, nesterov=True)
    student.eval()
    rng = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + iters):
        z = torch.randn(batch, cfg.generator.latent_dim, generator=rng)
        y = torch.randint(0, info.num_classes, (batch,), generator=rng)
        t0 = time.perf_counter()
        qat_step(teacher, student, gen, opt_g, opt_s, z, y, cfg, train_student=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits_cnn", "resnet20"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rows = []
    for name in args.models:
        info = model_info(name)
        teacher = create_model(name).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        fp = copy.deepcopy(teacher)
        for p in fp.parameters():
            p.requires_grad_(True)
        for gran in ("per_tensor", "per_sample_channel"):
            cfg = with_overrides(ExperimentConfig(), {"quant.act.granularity": gran, "quant.weight.granularity": "per_kernel"})
            q = prepare(teacher, cfg.quant, example_input=torch.zeros(1, info.in_channels, info.image_size, info.image_size))
            for p in q.parameters():
                p.requires_grad_(True)
            t_fp = time_student(fp, teacher, cfg, info, args.batch, args.iters)
            t_q = time_student(q, teacher, cfg, info, args.batch, args.iters)
            rows.append((name, gran, args.batch, t_fp * 1e3, t_q * 1e3, t_q / t_fp))
            print(rows[-1], flush=True)
    lines = ["| model | activations | batch | FP student (ms/iter) | W4A4 student (ms/iter) | ratio (goal <= 1.5) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {g} | {b} | {f:.1f} | {q:.1f} | {r:.2f}x |" for m, g, b, f, q, r in rows]
    body = (f"Command: `.venv/bin/python bench/qat_iteration.py --batch {args.batch} --iters {args.iters}` "
            f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; medians, both students "
            "measured in the same process run). One iteration = generator step + student step "
            "(`qat_step`).\n\n" + "\n".join(lines))
    print(body)
    if not args.no_write:
        write_section("benchmarks.md", "QAT iteration time", body)


if __name__ == "__main__":
    main()
