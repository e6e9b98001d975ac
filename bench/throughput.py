"""Concurrent trials: the same set of single-thread trials run one at a time vs two at a time.

    .venv/bin/python bench/throughput.py [--quick] [--trials 4] [--iters 60] [--rounds 2]

The product's search (``granq_search.search.runner.run_search``: our Optuna searcher, the real
trainable, 1 CPU per trial, no MLflow) runs a fixed set of configurations of the digits space
(drawn once by a seeded random sampler and enqueued as the space's initial points, so both
variants train exactly the same trials; no early stopping, so every trial runs its full budget)
with ``max_concurrent_trials`` 1 and 2 on one local Ray instance of 2 CPUs. Throughput =
trials / (first trial start -> last trial end).

Control without Ray: the same trials (``build_setup`` + ``run_training``, 1 thread) in a pool of
1 or 2 plain worker processes. It measures what the machine itself gives two processes of this
workload; Ray cannot do better than that. All variants alternate in ABBA order in one process.
Goal: 2 concurrent trials on 2 cores give >= 1.7x the trials per minute.
Writes the table to docs/benchmarks.md ("Concurrent trials throughput").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._doc import write_section  # noqa: E402


def fixed_configs(space, n: int, seed: int) -> list[dict]:
    """``n`` parameter sets drawn by Optuna's seeded random sampler over ``space``."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=space.directions, sampler=optuna.samplers.RandomSampler(seed=seed))
    dists = space.distributions()
    return [dict(study.ask(dists).params) for _ in range(n)]


def build_space(points: list[dict] | None, scheduler: dict, set_overrides: dict):
    from granq_search.config import read_yaml
    from granq_search.search.runner import resolve_space_arg
    from granq_search.search.space import parse_space

    path = resolve_space_arg("digits")
    data = dict(read_yaml(path, what="search space"))
    data["scheduler"] = scheduler
    data["sampler"] = {"type": "random", "seed": 0}
    data["initial_points"] = points or []
    return parse_space(data, str(path), space_file=path.resolve(), set_overrides=set_overrides)


def make_timer():
    from ray import tune

    class Timer(tune.Callback):
        """Driver-side wall times of every trial, and each trial's last result."""

        def __init__(self):
            self.start: dict[str, float] = {}
            self.end: dict[str, float] = {}
            self.last: dict[str, dict] = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start.setdefault(trial.trial_id, time.time())

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.last[trial.trial_id] = dict(result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.time()

        def on_trial_error(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.time()

    return Timer()


def run_variant(space, n: int, concurrent: int, output: Path, name: str) -> dict:
    from granq_search.search.runner import run_search

    timer = make_timer()
    t0 = time.time()
    outcome = run_search(space, name=name, output_dir=output, num_samples=n, max_concurrent=concurrent,
                         cpus_per_trial=1.0, progress=False, tracking=False, callbacks=[timer])
    wall = time.time() - t0
    if outcome.counts["complete"] != n or len(timer.end) != n:
        raise RuntimeError(f"{name}: expected {n} finished trials, got {outcome.counts} ({outcome.status})")
    span = max(timer.end.values()) - min(timer.start.values())
    busy = [timer.end[t] - timer.start[t] for t in timer.start]
    return {"span_s": span, "trials_per_min": 60.0 * n / span, "mean_trial_s": statistics.fmean(busy),
            "search_wall_s": wall, "val": sorted(round(r["best_val_top1"], 4) for r in timer.last.values())}




def direct_trial(cfg_dict: dict) -> tuple[float, float, float]:
    """One trial without Ray, in a pool worker: (start, end, best val top-1)."""
    import torch

    torch.set_num_threads(1)
    from granq_search.config import from_dict
    from granq_search.pipeline.trainer import build_setup, run_training

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="granq-bench-proc-") as d:
        setup = build_setup(from_dict(cfg_dict), "cpu")
        result = run_training(setup.cfg, device="cpu", setup=setup, checkpoint_dir=d)
    return start, time.time(), round(result.metrics["best_val_top1"], 4)


def _warm(_: int) -> int:
    import torch  # noqa: F401 - a pool worker imports what a Ray actor imports before its first trial

    import granq_search.pipeline.trainer  # noqa: F401

    return os.getpid()


def run_processes(cfgs: list[dict], concurrent: int) -> dict:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(concurrent) as pool:
        pool.map(_warm, range(concurrent))
        out = pool.map(direct_trial, cfgs, chunksize=1)
    span = max(e for _, e, _ in out) - min(s for s, _, _ in out)
    return {"span_s": span, "trials_per_min": 60.0 * len(cfgs) / span,
            "mean_trial_s": statistics.fmean(e - s for s, e, _ in out), "search_wall_s": float("nan"),
            "val": sorted(v for _, _, v in out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short trials (6 epochs x 15 iterations), one round")
    ap.add_argument("--trials", type=int, default=4, help="trials per variant (default 4)")
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations per epoch at search fidelity (6 epochs; default 60, --quick 15)")
    ap.add_argument("--rounds", type=int, default=None, help="ABBA rounds (default 2; --quick 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random sampler drawing the configurations")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    iters = args.iters or (15 if args.quick else 60)
    rounds = args.rounds or (1 if args.quick else 2)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"

    import optuna
    import ray
    import torch

    from granq_search.config import to_dict

    overrides = {"train.iters_per_epoch": iters}
    configs = fixed_configs(build_space(None, {"type": "none"}, overrides), args.trials, args.seed)
    space = build_space(configs, {"type": "none"}, overrides)
    cfg_dicts = [to_dict(space.trial_config(c)) for c in configs]
    base = [("ray", 1), ("ray", 2), ("proc", 1), ("proc", 2)]
    order: list[tuple[str, int]] = []
    for r in range(rounds):
        order += base if r % 2 == 0 else base[::-1]
    runs: dict[tuple[str, int], list[dict]] = {v: [] for v in base}
    load_start = os.getloadavg()[0]
    t_init = time.time()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="WARNING", runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
    init_s = time.time() - t_init
    try:
        with tempfile.TemporaryDirectory(prefix="granq-bench-throughput-") as out:
            for i, (kind, k) in enumerate(order):
                if kind == "ray":
                    res = run_variant(space, args.trials, k, Path(out), f"conc{k}-{i}")
                else:
                    res = run_processes(cfg_dicts, k)
                runs[(kind, k)].append(res)
                print(f"[{i + 1}/{len(order)}] {kind} x{k}: " + ", ".join(
                    f"{key} {v:.2f}" if isinstance(v, float) else f"{key} {v}" for key, v in res.items()), flush=True)
    finally:
        ray.shutdown()
    load_end = os.getloadavg()[0]

    def mean(v: tuple[str, int], key: str) -> float:
        return statistics.fmean(r[key] for r in runs[v])

    def speedup(kind: str) -> float:
        return mean((kind, 2), "trials_per_min") / mean((kind, 1), "trials_per_min")

    ratio, ceiling = speedup("ray"), speedup("proc")
    per_round = {kind: [b["trials_per_min"] / a["trials_per_min"] for a, b in zip(runs[(kind, 1)], runs[(kind, 2)])]
                 for kind in ("ray", "proc")}
    all_runs = [r for v in base for r in runs[v]]
    same = all(r["val"] == all_runs[0]["val"] for r in all_runs)
    names = {"ray": "Ray Tune search (`run_search`)", "proc": "control: plain processes, no Ray"}
    rows = [
        "| variant | trials at a time | trials | first start to last end (s) | trials / minute | "
        "mean trial wall (s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("ray", "proc"):
        for k in (1, 2):
            sp = "1.00x" if k == 1 else f"**{speedup(kind):.2f}x**"
            rows.append(f"| {names[kind]} | {k} | {args.trials} | {mean((kind, k), 'span_s'):.1f} | "
                        f"{mean((kind, k), 'trials_per_min'):.2f} | {mean((kind, k), 'mean_trial_s'):.1f} | {sp} |")
    table = "\n".join(rows)
    print()
    print(table)
    cmd = "python bench/throughput.py" + (" --quick" if args.quick else "") + \
        (f" --trials {args.trials}" if args.trials != 4 else "") + (f" --iters {args.iters}" if args.iters else "") + \
        (f" --rounds {args.rounds}" if args.rounds else "") + (f" --seed {args.seed}" if args.seed else "")
    slow = mean(("ray", 2), "mean_trial_s") / mean(("ray", 1), "mean_trial_s")
    if ceiling >= 1.7:
        ceiling_note = (f"The machine itself gives two processes of this workload {ceiling:.2f}x; Ray keeps "
                        f"{100 * ratio / ceiling:.0f}% of that.")
    else:
        ceiling_note = ("Without Ray two processes of this workload (small tensors, one thread each) did not get "
                        "1.7x either: the 2 cores were not free for two trials (see the load average: other jobs "
                        "ran on the machine), so this run cannot show whether Ray reaches the goal on 2 idle cores; "
                        "differences between the Ray and control speed-ups of this size are within the noise of "
                        "the rounds above. Ray's trial workers also run at nice 15 (Ray's default "
                        "`RAY_worker_niceness`), so on a shared machine they yield to other processes.")
    slow_p = mean(("proc", 2), "mean_trial_s") / mean(("proc", 1), "mean_trial_s")
    body = f"""Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{cmd}`: torch {torch.__version__}, \
Ray {ray.__version__}, Optuna {optuna.__version__}, Python {platform.python_version()}, CPU ({platform.machine()}, \
{os.cpu_count()} cores, shared with other jobs: 1-minute load average {load_start:.1f} at the start, {load_end:.1f} at \
the end). The product's search (`run_search`: our Optuna searcher, the real trainable, `--cpus-per-trial 1` so \
each trial runs torch with 1 thread, no MLflow) over the digits space at search fidelity (6 epochs, 1 of them \
warm-up) with `train.iters_per_epoch={iters}`, no early stopping. The same {args.trials} configurations in every \
variant (drawn once by Optuna's `RandomSampler(seed={args.seed})` and enqueued as initial points; every run \
reached the same validation accuracies: {'yes' if same else 'NO'}). One local Ray instance \
(`ray.init(num_cpus=2)`, started once, {init_s:.1f} s, not counted). Control: the same trials \
(`build_setup` + `run_training`, 1 torch thread) in a `multiprocessing` pool of 1 or 2 worker processes, no Ray: \
what this machine gives two processes of this workload. Trials per minute = trials / (first trial start to last \
trial end). {len(order)} runs in ABBA order, means shown; speed-up per round: Ray \
{', '.join(f'{p:.2f}x' for p in per_round['ray'])}, control {', '.join(f'{p:.2f}x' for p in per_round['proc'])}.

{table}

Goal: two concurrent single-thread trials on 2 cores give at least 1.7x the trials per minute: \
**{'met' if ratio >= 1.7 else 'missed'}** ({ratio:.2f}x with Ray; the control without Ray got {ceiling:.2f}x on \
the same machine in the same run). Two trials at a time each took {slow:.2f}x as long as one alone with Ray \
({slow_p:.2f}x without): the speed-up is about 2 / that factor. {ceiling_note}
"""
    if not args.no_write:
        print(f"\nwritten to {write_section('benchmarks.md', 'Concurrent trials throughput', body)}")


if __name__ == "__main__":
    main()
