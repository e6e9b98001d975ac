"""``leaderboard``: the trials of a search ranked, with the Pareto front, as text, CSV or JSON."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from granq_search.errors import GranqError, TrackingError
from granq_search.tracking.schema import DEFAULT_EXPERIMENT

if TYPE_CHECKING:  # pragma: no cover
    from granq_search.tracking.uri import TrackingStore

from granq_search.cli.common import DEFAULT_OUTPUT_DIR


def add_store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", default=None, metavar="NAME", help="search name (default: the latest search)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"the searches' folder; its mlflow.db is the default store (default: {DEFAULT_OUTPUT_DIR})")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store: sqlite:///PATH or http(s)://HOST:PORT (default: $MLFLOW_TRACKING_URI, "
                   "else sqlite:///DIR/mlflow.db)")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help=f"MLflow experiment of the searches (default: $MLFLOW_EXPERIMENT_NAME, else "
                   f"{DEFAULT_EXPERIMENT})")


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


def _from_env(store: TrackingStore) -> list[str]:
    from granq_search.tracking.uri import ENV_EXPERIMENT, ENV_TRACKING_URI

    return [v for v in (ENV_TRACKING_URI, ENV_EXPERIMENT) if v in (store.uri_source, store.experiment_source)]


@contextlib.contextmanager
def env_hint(store: TrackingStore) -> Iterator[None]:
    """A TrackingError while reading ``store`` names the environment variables that chose it
    (wrap only the reading of the store: other errors are not the store's choice)."""
    try:
        yield
    except TrackingError as e:
        env = _from_env(store)
        if not env:
            raise
        raise TrackingError(f"{e} (chosen by ${' and $'.join(env)}; unset it or pass "
                            "--tracking-uri/--experiment)") from None


def open_store(args: argparse.Namespace) -> TrackingStore:
    """The store and experiment of ``args`` (flags, else MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME,
    else the defaults); an existing store (reading never creates one)."""
    from granq_search.tracking.uri import require_existing_store, resolve_store

    store = resolve_store(args.tracking_uri, args.experiment, Path(args.output_dir))
    with env_hint(store):
        require_existing_store(store.tracking_uri, args.output_dir)
    return store


def note_store(store: TrackingStore) -> None:
    """Say on stderr which store was read when the environment chose it (no flag says so)."""
    if _from_env(store):
        print(f"read {store.describe()}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from granq_search.tracking.leaderboard import load_runs
    from granq_search.tracking.plot import plot_pareto
    from granq_search.tracking.table import format_leaderboard

    if args.top is not None and args.top < 1:
        raise GranqError(f"--top must be >= 1, got {args.top}")
    for flag, value in (("--plot", args.plot), ("--importance-plot", args.importance_plot)):
        if value is not None and not str(value).lower().endswith(".png"):
            raise GranqError(f"{flag} {value}: give a .png file name")
    store = open_store(args)
    with env_hint(store):
        board = load_runs(store.tracking_uri, args.search, experiment=store.experiment)
    note_store(store)
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
