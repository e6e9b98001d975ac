"""``leaderboard``: the trials of a search ranked, with the Pareto front, as text, CSV or JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from granq_search.errors import GranqError

DEFAULT_OUTPUT_DIR = "runs/search"


def add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", default=None, metavar="NAME", help="search name (default: the latest search)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"the searches' folder; its mlflow.db is the default store (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store: sqlite:///PATH or http(s)://HOST:PORT (default: sqlite:///DIR/mlflow.db)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("leaderboard", help="rank a search's trials and show the Pareto front",
                       description="Read a search back from MLflow: finished trials ranked by the first "
                       "objective, the Pareto front marked (finished trials only; pruned trials are "
                       "under-trained and never on it). Reading never creates a store.")
    add_store_flags(p)
    p.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table",
                   help="output format; json prints one JSON document on stdout")
    p.add_argument("--top", type=int, default=None, metavar="K", help="show the first K rows only")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the Pareto plot to this PNG")
    p.add_argument("--all", action="store_true", help="also list pruned, failed and running trials")
    p.add_argument("--importance", action="store_true",
                   help="also show what the search learned: each parameter's importance for each objective "
                   "(from the Optuna study in DIR/NAME; finished trials only); with --format json under the "
                   "key 'importance'")
    p.add_argument("--importance-plot", default=None, metavar="FILE.png",
                   help="also draw the parameter importances to this PNG (one bar panel per objective)")
    p.add_argument("--importance-evaluator", choices=("fanova", "ped-anova"), default="fanova",
                   help="Optuna's importance evaluator: fanova (seeded fANOVA, variance explained; default) "
                   "or ped-anova (what the best 10%% of trials share)")


def open_store(args: argparse.Namespace) -> str:
    """The tracking URI of ``args``; an existing store (reading never creates one)."""
    from granq_search.tracking.uri import require_existing_store, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, Path(args.output_dir))
    require_existing_store(uri, args.output_dir)
    return uri


def run(args: argparse.Namespace) -> int:
    from granq_search.tracking.leaderboard import format_leaderboard, load_runs, plot_pareto

    if args.top is not None and args.top < 1:
        raise GranqError(f"--top must be >= 1, got {args.top}")
    for flag, value in (("--plot", args.plot), ("--importance-plot", args.importance_plot)):
        if value is not None and not str(value).lower().endswith(".png"):
            raise GranqError(f"{flag} {value}: give a .png file name")
    uri = open_store(args)
    board = load_runs(uri, args.search)
    text = format_leaderboard(board, args.format, top=args.top, all_trials=args.all)
    notes = sys.stderr if args.format != "table" else sys.stdout
    if args.importance or args.importance_plot:
        text = _with_importance(args, board.search, text, notes)
    if args.plot:
        path = plot_pareto(board.df, board.objectives, args.plot, search=board.search, teacher=board.teacher)
        print(f"Pareto plot written to {path}", file=notes)
    sys.stdout.write(text)
    sys.stdout.flush()
    return 0


def _with_importance(args: argparse.Namespace, search: str, text: str, notes: TextIO) -> str:
    """``text`` (the leaderboard in ``args.format``) with the search's parameter importances: a
    section after a table or markdown, the key ``importance`` of the JSON document, on stderr with
    CSV (stdout stays one document). Writes ``--importance-plot``."""
    import json

    from granq_search.search.importance import format_importance, plot_importance, search_importance

    result = search_importance(Path(args.output_dir), args.search or search, evaluator=args.importance_evaluator)
    if args.importance_plot:
        path = plot_importance(result, args.importance_plot)
        print(f"importance plot written to {path}", file=notes)
    if not args.importance:
        return text
    if args.format == "json":
        doc = json.loads(text)
        doc["importance"] = json.loads(format_importance(result, "json"))
        return json.dumps(doc, indent=2) + "\n"
    if args.format == "csv":
        print(format_importance(result, "table"), file=sys.stderr, end="")
        return text
    return text + "\n" + format_importance(result, args.format)
