"""Early stopping: the same fixed set of trials at full budget vs under our ASHA.

    .venv/bin/python bench/asha_efficiency.py [--quick] [--trials 12] [--seed 0] [--max-concurrent 1]

A fixed list of configurations is drawn once from the digits search space by Optuna's seeded
``RandomSampler`` and enqueued as the space's initial points, so both searches train exactly the
same configurations in the same order. Both run through the product's search
(``granq_search.search.runner.run_search``: our Optuna searcher, the real trainable, 1 CPU per
trial, no MLflow) at the space's search fidelity (6 epochs x 40 iterations, 1 warm-up epoch):

* full budget: ``scheduler: {type: none}``, every trial runs its 6 epochs;
* ASHA: the space's own scheduler (``granq_search/search/scheduler.py``: ``PersistentASHA`` on
  ``val_top1`` at ``epoch``, grace = warm-up + 1, reduction factor 2, max_t 6).

Reported: the best validation top-1 each reaches (among trials that ran to the end: a pruned
trial is never selected), the trial-epochs each used, and whether a pruned trial's curve matches
the same configuration's curve at full budget (the trials are deterministic, so the comparison is
exact). With one trial at a time (default) ASHA's decisions are deterministic too.
Goal: ASHA reaches the full-budget best with <= 40% of its trial-epochs.
Writes the table to docs/benchmarks.md ("Early stopping (ASHA)").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._doc import write_section  # noqa: E402
from bench.throughput import build_space, fixed_configs, make_timer  # noqa: E402


def run_variant(space, n: int, concurrent: int, output: Path, name: str) -> dict:
    from granq_search.search.runner import run_search

    timer = make_timer()
    history: dict[str, dict[int, float]] = {}

    from ray import tune

    class Curves(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result.get("epoch") is not None:
                history.setdefault(trial.trial_id, {})[int(result["epoch"])] = float(result["val_top1"])

    t0 = time.time()
    outcome = run_search(space, name=name, output_dir=output, num_samples=n, max_concurrent=concurrent,
                         cpus_per_trial=1.0, progress=False, tracking=False, callbacks=[timer, Curves()])
    wall = time.time() - t0
    trials = []
    for tid, last in timer.last.items():
        params = {k: v for k, v in last["config"].items()}
        trials.append({
            "key": json.dumps(params, sort_keys=True), "params": params,
            "epochs": max(history.get(tid, {0: 0})), "final": last.get("final") == 1.0 and not last.get("failure_reason"),
            "best_val_top1": max(history[tid].values()) if history.get(tid) else float("nan"),
            "curve": history.get(tid, {}),
        })
    if len(trials) != n:
        raise RuntimeError(f"{name}: expected {n} trials, got {len(trials)} ({outcome.counts})")
    return {"trials": trials, "wall_s": wall, "counts": outcome.counts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 configurations, 10 iterations per epoch")
    ap.add_argument("--trials", type=int, default=None, help="configurations (default 12; --quick 6)")
    ap.add_argument("--iters", type=int, default=None,
                    help="iterations per epoch (default: the space's search fidelity, 40; --quick 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random sampler drawing the configurations")
    ap.add_argument("--max-concurrent", type=int, default=1,
                    help="trials at once in both searches (default 1: ASHA's decisions are deterministic)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    n = args.trials or (6 if args.quick else 12)
    iters = args.iters or (10 if args.quick else None)
    overrides = {"train.iters_per_epoch": iters} if iters else {}
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"

    import optuna
    import ray
    import torch

    asha_spec = {"type": "asha", "reduction_factor": 2, "grace_period": 1}
    probe = build_space(None, asha_spec, overrides)
    configs = fixed_configs(probe, n, args.seed)
    full_space = build_space(configs, {"type": "none"}, overrides)
    asha_space = build_space(configs, asha_spec, overrides)
    max_t, grace = asha_space.asha_max_t, asha_space.asha_grace_period
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=True,
             logging_level="WARNING", runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}})
    try:
        with tempfile.TemporaryDirectory(prefix="granq-bench-asha-") as out:
            full = run_variant(full_space, n, args.max_concurrent, Path(out), "full")
            print(f"full budget: {full['wall_s']:.1f} s, {full['counts']}", flush=True)
            asha = run_variant(asha_space, n, args.max_concurrent, Path(out), "asha")
            print(f"ASHA: {asha['wall_s']:.1f} s, {asha['counts']}", flush=True)
    finally:
        ray.shutdown()

    def summary(run: dict) -> dict:
        done = [t for t in run["trials"] if t["final"]]
        best = max(done, key=lambda t: t["best_val_top1"])
        return {"epochs": sum(t["epochs"] for t in run["trials"]), "finished": len(done),
                "stopped": len(run["trials"]) - len(done), "best": best["best_val_top1"], "best_key": best["key"],
                "best_any": max(t["best_val_top1"] for t in run["trials"]), "wall": run["wall_s"]}

    sf, sa = summary(full), summary(asha)
    by_key = {t["key"]: t for t in full["trials"]}
    mismatch = 0.0
    for t in asha["trials"]:
        ref = by_key[t["key"]]["curve"]
        for e, v in t["curve"].items():
            mismatch = max(mismatch, abs(v - ref[e]))
    order = {k: i for i, k in enumerate(json.dumps(c, sort_keys=True) for c in configs)}
    frac = sa["epochs"] / sf["epochs"]
    reached = sa["best"] >= sf["best"] - 1e-9
    kept_best = any(t["key"] == sf["best_key"] and t["final"] for t in asha["trials"])

    rows = [
        "| search | trials run to the end | trials stopped early | trial-epochs | share of full | "
        "best val top-1 (%) | best trial (config #) | wall (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| full budget (no scheduler) | {sf['finished']} | {sf['stopped']} | {sf['epochs']} | 100% | "
        f"{sf['best']:.2f} | {order[sf['best_key']] + 1} | {sf['wall']:.0f} |",
        f"| ASHA | {sa['finished']} | {sa['stopped']} | {sa['epochs']} | **{100 * frac:.0f}%** | "
        f"{sa['best']:.2f} | {order[sa['best_key']] + 1} | {sa['wall']:.0f} |",
    ]
    per = ["| config # | act bits | weight bits | threshold | student lr | full: best val top-1 (%) | "
           "ASHA: epochs run | ASHA: best val top-1 (%) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key_asha = {t["key"]: t for t in asha["trials"]}
    for i, c in enumerate(configs):
        k = json.dumps(c, sort_keys=True)
        f, a = by_key[k], by_key_asha[k]
        per.append(f"| {i + 1} | {c['quant.act.bits']} | {c['quant.weight.bits']} | {c['quant.act.threshold']:.2f} | "
                   f"{c['optim.student.lr']:.2g} | {f['best_val_top1']:.2f} | {a['epochs']}"
                   f"{'' if a['final'] else ' (stopped)'} | {a['best_val_top1']:.2f} |")
    table, per_table = "\n".join(rows), "\n".join(per)
    print()
    print(table)
    print()
    print(per_table)
    cmd = "python bench/asha_efficiency.py" + (" --quick" if args.quick else "") + \
        (f" --trials {args.trials}" if args.trials else "") + (f" --iters {args.iters}" if args.iters else "") + \
        (f" --seed {args.seed}" if args.seed else "") + \
        (f" --max-concurrent {args.max_concurrent}" if args.max_concurrent != 1 else "")
    epochs_fid = full_space.search_base.train.epochs
    iters_fid = full_space.search_base.train.iters_per_epoch
    goal = reached and frac <= 0.40
    if goal:
        verdict = f"**met** (best {sa['best']:.2f}% vs {sf['best']:.2f}% with {100 * frac:.0f}% of the trial-epochs)"
    else:
        why = []
        if not reached:
            why.append(f"ASHA's best finished trial reaches {sa['best']:.2f}%, the full-budget best "
                       f"{sf['best']:.2f}%")
        else:
            why.append(f"ASHA reaches the full-budget best ({sa['best']:.2f}% vs {sf['best']:.2f}%)")
        why.append(f"with {100 * frac:.0f}% of the trial-epochs ({sa['epochs']} of {sf['epochs']})")
        verdict = "**missed**: " + ", ".join(why)
    rungs = []
    m = grace
    while m < max_t:
        rungs.append(m)
        m *= 2
    # about half of the trials go on at each rung (reduction factor 2)
    expected, alive, prev = 0.0, float(n), 0
    for milestone in rungs + [max_t]:
        expected += alive * (milestone - prev)
        alive, prev = alive / 2, milestone
    expected = round(expected)
    body = f"""Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `{cmd}`: torch {torch.__version__}, Ray {ray.__version__}, \
Optuna {optuna.__version__}, Python {platform.python_version()}, CPU ({platform.machine()}, {os.cpu_count()} cores, \
shared with other jobs). {n} configurations of the digits space (`search_spaces/digits.yaml`) drawn once by \
Optuna's `RandomSampler(seed={args.seed})` and enqueued as initial points of both searches, so both train the \
same configurations in the same order. Both run through the product's search (`run_search`: our Optuna \
searcher, the real trainable, 1 CPU and 1 torch thread per trial, {args.max_concurrent} trial(s) at a time, no \
MLflow) at search fidelity ({epochs_fid} epochs x {iters_fid} iterations, 1 warm-up epoch). ASHA is \
`PersistentASHA` as the space configures it: metric `val_top1` (max) at `epoch`, grace period \
{grace} epochs (warm-up + 1), reduction factor 2, max_t {max_t}, one bracket (rungs at epochs \
{', '.join(map(str, rungs))}). The best accuracy counts trials that ran to the end only (a stopped trial is \
never selected or exported); counting stopped trials' curves as well: full {sf['best_any']:.2f}%, ASHA \
{sa['best_any']:.2f}%. The trials are deterministic: every epoch ASHA ran matches the same configuration's \
full-budget curve (largest difference {mismatch:.2f} points). The full-budget best configuration was \
{'kept to the end' if kept_best else 'stopped early'} by ASHA.

{table}

Per configuration:

{per_table}

Goal: ASHA reaches the full-budget best with at most 40% of its trial-epochs: {verdict}. \
With one bracket and reduction factor 2 at this fidelity, every trial pays the grace period of {grace} of \
{max_t} epochs ({100 * grace / max_t:.0f}% of a full trial, warm-up included) before ASHA may stop it, so \
{n} trials cannot cost less than {grace * n} trial-epochs ({100 * grace / max_t:.0f}% of {n * max_t}). A rung keeps \
a trial whose `val_top1` is at or above the median of the values recorded there so far (reduction factor 2), so \
about half go on at each rung: {n} x {grace} + {n // 2} x {rungs[1] - rungs[0] if len(rungs) > 1 else max_t - grace} \
+ ... = about {expected} trial-epochs ({100 * expected / (n * max_t):.0f}%) in expectation; asynchronous ASHA also \
passes the first trials to reach a rung (nothing to compare them with yet) and ties at the median (many digits \
configurations reach the same validation accuracy) go on. Reaching 40% needs a larger max_t relative to the grace \
period, for example more epochs at search fidelity.
"""
    if not args.no_write:
        print(f"\nwritten to {write_section('benchmarks.md', 'Early stopping (ASHA)', body)}")


if __name__ == "__main__":
    main()
