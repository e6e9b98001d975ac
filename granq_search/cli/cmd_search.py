"""``search`` (the default command): a Ray Tune + Optuna search recorded in MLflow.

``granq-search`` runs the embedded default: ``search_spaces/digits.yaml``, 8 trials, 2 at a
time, on this machine. Everything a user can get wrong is checked before Ray starts.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from granq_search.cli.common import DEFAULT_OUTPUT_DIR, add_format_flag, emit_json
from granq_search.config import parse_set_args
from granq_search.tracking.uri import redact_uri


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="search GranQ hyperparameters with Ray Tune + Optuna (default command)",
        description="Search a space of GranQ configurations: Optuna proposes (multi-objective TPE), Ray Tune "
        "runs the trials (ASHA stops weak ones early), MLflow records every trial. At the end the "
        "leaderboard is printed and the best configuration exported to DIR/NAME/best.yaml. "
        "Interrupted? Rerun with --resume.")
    p.add_argument("--space", default=None, metavar="FILE_OR_NAME",
                   help="search-space YAML, or the name of one in search_spaces/ (default: digits)")
    p.add_argument("--num-samples", type=int, default=None, metavar="N", help="trials to run (default: 8)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                   help="trials running at once (default: 2)")
    p.add_argument("--name", default=None, help="search name (default: SPACE-TIMESTAMP; with --resume: the "
                   "latest search in --output-dir)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"where searches live: DIR/NAME/..., MLflow store DIR/mlflow.db (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of the space's base, e.g. --set data.root=/data/cifar10; on a "
                   "fidelity key (train.epochs, ...) it changes only the search budget; a searched parameter given "
                   "with --set is pinned for this search (its value must lie in the parameter's range or choices; "
                   "e.g. --set quant.act.bits=3 --set quant.weight.bits=3 for a W3A3 search) (repeatable)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs per trial (default: 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, metavar="G",
                   help="GPUs per trial; fractions pack trials onto one GPU (no memory isolation) (default: 0)")
    p.add_argument("--address", default=None, metavar="A",
                   help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start Ray locally)")
    p.add_argument("--storage-path", default=None, metavar="P",
                   help="Ray results on shared storage for clusters (NFS path, s3://, gs://); default DIR/NAME/ray")
    p.add_argument("--tracking-uri", default=None, metavar="U",
                   help="MLflow store: sqlite:///PATH or http://HOST:PORT (default: $MLFLOW_TRACKING_URI, else "
                   "sqlite:///DIR/mlflow.db; a resumed search keeps its store)")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else granq_search; a resumed search "
                   "keeps its experiment)")
    p.add_argument("--resume", action="store_true",
                   help="continue search NAME: finished trials are kept, interrupted ones restart from their last "
                   "epoch checkpoint")
    p.add_argument("--dashboard", action="store_true",
                   help="start Ray's dashboard with the local Ray (needs pip install 'ray[default]'; costs memory); "
                   "a line on stderr names its address")
    p.add_argument("--no-progress", action="store_true",
                   help="no live status table of the trials (on stderr, every 15 s; also off with --format json)")
    add_format_flag(p)


def _summary(outcome) -> str:
    c = outcome.counts
    parts = [f"{c['complete']} complete", f"{c['pruned']} pruned", f"{c['fail']} failed"]
    if c.get("duplicates"):
        parts.append(f"{c['duplicates']} duplicate proposal(s) not retrained")
    return (f"search {outcome.name} {outcome.status}: {outcome.num_trials} trial(s) in "
            f"{outcome.wall_time_s:.0f} s; Optuna: {', '.join(parts)}")


def _store_flags(outcome, args: argparse.Namespace) -> str:
    """``--tracking-uri``/``--experiment`` for the leaderboard hint: those of the outcome (the
    search's own, also a resumed search's kept ones) wherever the leaderboard's defaults would
    not find them. (``outcome.tracking_uri`` is already redacted; redacting again is harmless.)"""
    from granq_search.tracking.schema import DEFAULT_EXPERIMENT
    from granq_search.tracking.uri import resolve_store

    flags = ""
    if outcome.tracking_uri:
        default = resolve_store(None, None, args.output_dir, check=False, environ={}).tracking_uri
        if args.resume or args.tracking_uri or outcome.tracking_uri != default:
            flags += f" --tracking-uri {redact_uri(outcome.tracking_uri)}"
    if outcome.experiment and outcome.experiment != DEFAULT_EXPERIMENT:
        flags += f" --experiment {outcome.experiment}"
    return flags


def run(args: argparse.Namespace) -> int:
    from granq_search.search.runner import run_search

    overrides = parse_set_args(args.set)
    json_out = args.format == "json"
    # --format json: stdout carries exactly one JSON document; anything else printed meanwhile
    # (Ray, MLflow, progress) goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if json_out else contextlib.nullcontext():
        outcome = run_search(
            args.space, name=args.name, output_dir=args.output_dir, num_samples=args.num_samples,
            max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial, address=args.address, storage_path=args.storage_path,
            tracking_uri=args.tracking_uri, experiment=args.experiment, resume=args.resume, set_overrides=overrides,
            progress=not (args.no_progress or json_out), dashboard=args.dashboard,
        )
    for note in outcome.notes:
        print(f"warning: {' '.join(note.split())}", file=sys.stderr)
    if json_out:
        emit_json(outcome.to_dict())
    else:
        print(_summary(outcome))
        if outcome.leaderboard:
            print()
            print(outcome.leaderboard.rstrip())
        elif outcome.pareto:
            print("Pareto front (Optuna):")
            for p in outcome.pareto:
                vals = ", ".join(f"{k}={v:.4g}" for k, v in p["values"].items())
                print(f"  trial {p['ray_trial_id']} ({vals}): {p['params']}")
        print()
        if outcome.best_config:
            print(f"best config: {outcome.best_config}")
            print(f"train it at full budget: granq-search train --config {outcome.best_config}")
        if outcome.tracking_uri:
            print(f"MLflow: {redact_uri(outcome.tracking_uri)}, experiment '{outcome.experiment}'")
        print(f"search folder: {outcome.path}  (leaderboard: granq-search leaderboard "
              f"--output-dir {args.output_dir} --search {outcome.name}{_store_flags(outcome, args)})")
    if outcome.status == "interrupted":
        print(f"error: search {outcome.name} was interrupted; continue it with: granq-search search "
              f"--resume --name {outcome.name} --output-dir {args.output_dir}", file=sys.stderr)
        return 130
    return 0
