"""Report the real-teacher searches (search_spaces/cifar10_resnet20_cpu.yaml) and their retrains.

    .venv/bin/python bench/cifar_search_report.py --output-dir runs/cifar \
        --search front=cifar-front --search w3a3=cifar-w3a3 \
        --retrain front=runs/retrain/front-prod --retrain w3a3=runs/retrain/w3a3-prod \
        --repro front=runs/retrain/front-repro --repro w3a3=runs/retrain/w3a3-repro --write

Reads everything from what the runs left behind: each search's ``search.json``, Ray's per-trial
``result.json`` (every epoch's report), the MLflow record (leaderboard, Pareto front), the Optuna
journal (importances); each ``train`` folder's ``final.json`` / ``metrics.jsonl``; the hand-tuned
runs of ``docs/qat_cifar_runs.jsonl``. With ``--write``: ``docs/cifar_search.md``,
``docs/cifar_search.json`` and the plots next to them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._doc import DOCS, write_section  # noqa: E402
from granq_search.search.importance import format_importance, plot_importance, search_importance  # noqa: E402
from granq_search.tracking import format_leaderboard, load_runs  # noqa: E402
from granq_search.jsonutil import json_safe  # noqa: E402
from granq_search.tracking.plot import plot_pareto  # noqa: E402

HAND_TUNED = DOCS / "qat_cifar_runs.jsonl"


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def ray_trials(search_dir: Path) -> dict[str, dict[str, Any]]:
    """Ray trial id -> {config, reports, last} from each trial's result.json."""
    out = {}
    for d in sorted((search_dir / "ray").glob("train_trial_*")):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        if rows:
            out[rows[-1]["trial_id"]] = {"config": rows[-1].get("config", {}), "reports": rows, "last": rows[-1]}
    return out


def compute_spent(trials: dict[str, dict[str, Any]], record: dict[str, Any]) -> dict[str, Any]:
    cpus = float(record.get("cpus_per_trial") or 1.0)
    epochs = sum(int(max(r.get("epoch", 0) or 0 for r in t["reports"])) for t in trials.values())
    trial_s = [float(t["last"].get("time_total_s", 0.0)) for t in trials.values()]
    outside = []
    for t in trials.values():
        wall = float(t["last"].get("time_total_s", 0.0))
        train = sum(float(r.get("epoch_train_time_s", 0.0) or 0.0) for r in t["reports"] if "epoch" in r)
        if wall > 0 and train > 0:
            outside.append({"trial": t["last"]["trial_id"], "wall_s": wall, "train_s": train,
                            "outside_fraction": 1.0 - train / wall, "full": bool(t["last"].get("final"))
                            and int(t["last"].get("epochs_run", 0) or 0) == int(t["last"].get("epoch", -1) or -1)})
    full = [o["outside_fraction"] for o in outside if o["full"]]
    return {
        "trials": len(trials),
        "trial_epochs": epochs,
        "trial_cpu_hours": sum(trial_s) * cpus / 3600.0,
        "wall_hours": (float(record.get("updated", 0)) - float(record.get("created", 0))) / 3600.0,
        "outside_training_fraction_mean": sum(o["outside_fraction"] for o in outside) / len(outside) if outside else None,
        "outside_training_fraction_full_budget_mean": sum(full) / len(full) if full else None,
        "per_trial": outside,
    }


def rung_agreement(trials: dict[str, dict[str, Any]], finished: set[str]) -> dict[str, Any]:
    """How well the first rung predicted the end, on the trials that ran to the full budget:
    Spearman correlation of epoch-2 validation top-1 with the final best, and whether the best
    finished trial was also the best finished trial at the first rung."""
    import pandas as pd

    rows = []
    for tid in finished:
        vals = {int(r["epoch"]): r["val_top1"] for r in trials[tid]["reports"] if r.get("val_top1") is not None
                and "epoch" in r}
        if vals:
            rows.append({"trial": tid, "first": vals[min(vals)], "best": max(vals.values())})
    if len(rows) < 3:
        return {"rung_spearman": None}
    df = pd.DataFrame(rows)
    return {"rung_spearman": float(df["first"].rank().corr(df["best"].rank())),
            "best_was_best_at_first_rung": bool(df.loc[df["best"].idxmax(), "trial"] ==
                                                df.loc[df["first"].idxmax(), "trial"])}


def matches(config: dict[str, Any], point: dict[str, Any]) -> bool:
    return all(k in config and (config[k] == v or (isinstance(v, float) and math.isclose(config[k], v, rel_tol=1e-9)))
               for k, v in point.items())


def initial_point_rows(trials: dict[str, dict[str, Any]], record: dict[str, Any], df) -> list[dict[str, Any]]:
    """The initial points (paper's values, hand-tuned values) as the search ran them."""
    labels = ["paper's hyperparameters", "hand-tuned (docs/results.md)"]
    space = record["space"]
    pinned = space.get("pinned") or {}
    rows = []
    for i, point in enumerate(space["raw"].get("initial_points") or []):
        want = {k: v for k, v in point.items() if k not in pinned}
        for tid, t in trials.items():
            if matches(t["config"], want):
                row = df[df["trial"] == tid]
                rows.append({"label": labels[i] if i < len(labels) else f"initial point {i + 1}", "trial": tid,
                             **_row_dict(row.iloc[0] if len(row) else None, t)})
                break
    return rows


def _row_dict(row, trial: dict[str, Any]) -> dict[str, Any]:
    last = trial["last"]
    c = trial["config"]
    return {
        "status": None if row is None else row["status"],
        "bits": f"W{c.get('quant.weight.bits')}A{c.get('quant.act.bits')}",
        "val_top1": last.get("best_val_top1"), "test_top1": last.get("best_test_top1"),
        "best_epoch": last.get("best_epoch"), "epochs_run": last.get("epochs_run", last.get("epoch")),
        "bitops": last.get("bitops"),
    }


def hand_tuned() -> list[dict[str, Any]]:
    if not HAND_TUNED.exists():
        return []
    rows = [json.loads(line) for line in HAND_TUNED.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["act"] == "per_sample_channel" and r["weight"] == "per_kernel"
            and r["epochs"] == 6 and r["iters"] == 50]


def train_run(path: Path) -> dict[str, Any]:
    final = json.loads((path / "final.json").read_text())
    epochs = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg = (path / "config.yaml").read_text()
    return {"dir": str(path), "final": final, "epochs": epochs, "config_yaml": cfg}


def repro_check(trial: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The trial's validation curve against the retrain's at the trial's evaluated epochs."""
    trial_curve = {int(r["epoch"]): float(r["val_top1"]) for r in trial["reports"] if r.get("val_top1") is not None
                   and "epoch" in r}
    run_curve = {int(e["epoch"]): float(e["val_top1"]) for e in run["epochs"] if e.get("val_top1") is not None}
    common = sorted(set(trial_curve) & set(run_curve))
    diffs = [abs(trial_curve[e] - run_curve[e]) for e in common]
    return {"epochs": common, "trial": [trial_curve[e] for e in common], "retrain": [run_curve[e] for e in common],
            "max_abs_diff": max(diffs) if diffs else None}


def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True, help="the searches' folder (its mlflow.db is the store)")
    ap.add_argument("--search", action="append", default=[], metavar="KEY=NAME")
    ap.add_argument("--retrain", action="append", default=[], metavar="KEY=DIR", help="production-budget train run")
    ap.add_argument("--repro", action="append", default=[], metavar="KEY=DIR", help="search-budget train run")
    ap.add_argument("--retrain-extra", action="append", default=[], metavar="LABEL=DIR",
                    help="another production-budget train run to record (e.g. an earlier export, a front point)")
    ap.add_argument("--rerun", action="append", default=[], metavar="TRIAL=DIR",
                    help="a stopped trial run to full search budget with train (ASHA check)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    out = Path(args.output_dir).resolve()
    uri = f"sqlite:///{out / 'mlflow.db'}"
    searches, retrains, repros = _pairs(args.search, "--search"), _pairs(args.retrain, "--retrain"), \
        _pairs(args.repro, "--repro")
    reruns = _pairs(args.rerun, "--rerun")
    doc: dict[str, Any] = {"searches": {}, "hand_tuned": hand_tuned()}
    sections: dict[str, list[str]] = {}
    for key, name in searches.items():
        sdir = out / name
        record = json.loads((sdir / "search.json").read_text())
        trials = ray_trials(sdir)
        pinned = record["space"].get("pinned") or {}
        for t in trials.values():  # pinned parameters are not in a trial's config: they are fixed
            t["config"] = {**pinned, **t["config"]}
        board = load_runs(uri, name)
        df = board.df
        finished = df[df["status"] == "finished"]
        entry: dict[str, Any] = {
            "name": name, "set_overrides": record["space"].get("set_overrides"),
            "pinned": record["space"].get("pinned"), "teacher": board.teacher,
            "counts": board.counts(), "compute": compute_spent(trials, record),
            "leaderboard": json.loads(format_leaderboard(board, "json", all_trials=True))["trials"],
            "initial_points": initial_point_rows(trials, record, df),
        }
        # ASHA's own count (scheduler_state.json) includes the trials it ended at max_t; MLflow's
        # "pruned" also holds trials an interrupted driver closed, which ASHA never judged
        state = json.loads((sdir / "scheduler_state.json").read_text())
        max_t = int(state["max_t"])
        reached = sum(1 for t in trials.values() if any(int(r.get("epoch", 0) or 0) >= max_t for r in t["reports"]))
        stopped = int(state["num_stopped"]) - reached
        interrupted = entry["counts"].get("pruned", 0) - stopped
        entry["asha"] = {"stopped_early": stopped, "finished": len(finished), "interrupted": interrupted,
                         "stopped_fraction": stopped / max(1, stopped + len(finished)),
                         **rung_agreement(trials, set(finished["trial"]))}
        if len(finished):
            best = finished.iloc[0]
            entry["best"] = {"trial": best["trial"], **_row_dict(best, trials[best["trial"]]),
                             "config": trials[best["trial"]]["config"]}
        by_bits = {}
        for _, r in finished.iterrows():
            tag = f"W{int(r['quant.weight.bits'])}A{int(r['quant.act.bits'])}"
            if tag not in by_bits:  # finished rows are ranked: the first is the best
                by_bits[tag] = {"trial": r["trial"], **_row_dict(r, trials[r["trial"]])}
        entry["best_by_bits"] = by_bits
        entry["pareto_points"] = int(finished["pareto"].sum())
        entry["pareto_bitops_levels"] = int(finished[finished["pareto"]]["bitops"].nunique())
        if args.write:
            plot = plot_pareto(df, board.objectives, DOCS / f"cifar_search_{key}_pareto.png", search=name,
                               teacher=board.teacher)
            entry["pareto_plot"] = plot.name
        try:
            imp = search_importance(out, name)
            entry["importance"] = imp.to_dict()
            imp_md = format_importance(imp, "markdown")
            if args.write:
                entry["importance_plot"] = plot_importance(imp, DOCS / f"cifar_search_{key}_importance.png").name
        except Exception as e:  # noqa: BLE001 - reported in the doc
            imp_md = f"(importances not available: {e})"
        if key in retrains:
            run = train_run(Path(retrains[key]))
            entry["retrain_production"] = {k: run["final"].get(k) for k in (
                "best_val_top1", "best_test_top1", "best_epoch", "test_top1", "epochs_run", "train_time_s",
                "teacher_test_top1", "bitops", "size_bits", "act_memory_bits", "threads")}
            entry["retrain_production"]["dir"] = run["dir"]
        if key in repros and "best" in entry:
            run = train_run(Path(repros[key]))
            entry["repro"] = repro_check(trials[entry["best"]["trial"]], run)
            entry["repro"]["best_test_top1"] = run["final"].get("best_test_top1")
        doc["searches"][key] = entry

        # ----------------------------------------------------------------- markdown
        c = entry["compute"]
        md: list[str] = []
        sections[f"Search `{name}`"] = md
        if entry["pinned"]:
            md += [f"Pinned with `--set`: {', '.join(f'`{k}={v}`' for k, v in entry['pinned'].items())}.", ""]
        md += [f"Trials: {c['trials']} ({', '.join(f'{n} {s}' for s, n in entry['counts'].items())}); "
               f"ASHA stopped {stopped} of the {stopped + len(finished)} trials it judged "
               f"({100 * entry['asha']['stopped_fraction']:.0f}%) early; {interrupted} trial(s) shown as pruned were "
               "closed by the interrupted driver, not by ASHA (they continue with --resume) (rank correlation of first-rung and final validation top-1 among finished trials: "
               f"{fmt(entry['asha'].get('rung_spearman'))}). Compute: {c['trial_epochs']} trial-epochs, {c['trial_cpu_hours']:.2f} CPU-hours in trials, "
               f"{c['wall_hours']:.2f} h wall. Time outside training iterations: "
               f"{100 * (c['outside_training_fraction_mean'] or 0):.1f}% of a trial's wall time on average, "
               f"{100 * (c['outside_training_fraction_full_budget_mean'] or 0):.1f}% for trials run to the full "
               "search budget.", ""]
        md += ["### Leaderboard (validation selects; test only reported)", "", format_leaderboard(board, "markdown", all_trials=True), ""]
        if entry.get("pareto_plot"):
            md += [f"Pareto front: {entry['pareto_points']} finished points over {entry['pareto_bitops_levels']} "
                   "BitOPs levels.", "", f"![Pareto front of {name}]({entry['pareto_plot']})", ""]
        md += ["### Best finished trial per bit-width (search budget: 6 x 50 iterations)", "",
               "| bits | trial | val top-1 | test top-1 (best-val epoch) | best epoch | BitOPs |", "|---|---|---|---|---|---|"]
        for tag, r in by_bits.items():
            md.append(f"| {tag} | {r['trial']} | {fmt(r['val_top1'])} | {fmt(r['test_top1'])} | {fmt(r['best_epoch'], '.0f')} "
                      f"| {fmt((r['bitops'] or 0) / 1e6, '.0f')}M |")
        md += ["", "### What the search learned (fANOVA importances, finished trials)", "", imp_md.strip(), ""]
        if entry.get("importance_plot"):
            md += [f"![importances of {name}]({entry['importance_plot']})", ""]
    doc["extra_retrains"] = {}
    for label, d in _pairs(args.retrain_extra, "--retrain-extra").items():
        run = train_run(Path(d))
        doc["extra_retrains"][label] = {k: run["final"].get(k) for k in (
            "best_val_top1", "best_test_top1", "best_epoch", "test_top1", "epochs_run", "train_time_s", "bitops",
            "size_bits", "act_memory_bits", "threads")}
        doc["extra_retrains"][label]["dir"] = run["dir"]
    doc["reruns"] = {}
    for tid, d in reruns.items():
        doc["reruns"][tid] = train_run(Path(d))["final"]
    if args.write:
        (DOCS / "cifar_search.json").write_text(json.dumps(json_safe(doc), indent=2, default=str) + "\n")
        for heading, md in sections.items():
            write_section("cifar_search.md", heading, "\n".join(md),
                          title="# Searching the real teacher: CIFAR-10 ResNet-20 on 2 CPU cores")
        print(f"wrote {DOCS / 'cifar_search.json'} and {DOCS / 'cifar_search.md'}")
    else:
        for heading, md in sections.items():
            print(f"## {heading}\n\n" + "\n".join(md))


if __name__ == "__main__":
    main()
