"""``export``: a searched trial -> a complete production config for ``train --config``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from granq_search.cli.cmd_leaderboard import add_store_flags, env_hint, note_store, open_store
from granq_search.cli.common import emit_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trial's config at production budget",
                       description="Pick a trial of a search (default --best) and write its exact resolved "
                       "config, with the search's reduced fidelity (epochs, iterations, samples) set back to "
                       "the production values, --set overrides applied and a provenance block. Train it with "
                       "`granq-search train --config FILE`.")
    add_store_flags(p)
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--trial", default=None, metavar="ID", help="this trial (id, run id, or a unique suffix)")
    rule.add_argument("--best", action="store_true", help="best first objective among finished trials (default)")
    rule.add_argument("--max-drop", type=float, default=None, metavar="X",
                      help="fewest BitOPs among finished trials whose val_drop <= X points")
    rule.add_argument("--knee", action="store_true", help="the knee of the Pareto front")
    p.add_argument("--output", default=None, metavar="FILE.yaml",
                   help="where to write (default: OUTPUT_DIR/SEARCH/best.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted path, e.g. --set train.epochs=300 (repeatable)")
    p.add_argument("--search-budget", action="store_true",
                   help="keep the reduced budget the search ran with instead of the production budget")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="output format; json prints one JSON document on stdout")


def _rule(args: argparse.Namespace) -> str:
    if args.trial is not None:
        return "trial"
    if args.max_drop is not None:
        return "max_drop"
    if args.knee:
        return "knee"
    return "best"


def fmt_num(v, spec: str) -> str:
    """``v`` formatted with ``spec``; ``-`` for None and NaN / inf (also used by ``deploy``)."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def run(args: argparse.Namespace) -> int:
    from granq_search.config import parse_set_args
    from granq_search.errors import GranqError
    from granq_search.export.production import plan_export, write_export
    from granq_search.tracking.leaderboard import load_runs

    if args.max_drop is not None and not (math.isfinite(args.max_drop) and args.max_drop >= 0):
        raise GranqError(f"--max-drop must be a number of points >= 0, got {args.max_drop}")
    overrides = parse_set_args(args.set)
    store = open_store(args)
    with env_hint(store):  # only reading the store: "no finished trial" etc. are not the store's choice
        board = load_runs(store.tracking_uri, args.search, experiment=store.experiment)
    plan = plan_export(store.tracking_uri, args.search, _rule(args), trial=args.trial, max_drop=args.max_drop,
                       overrides=overrides, production=not args.search_budget, experiment=store.experiment,
                       board=board)
    note_store(store)
    output = Path(args.output) if args.output else Path(args.output_dir) / plan.board.search / "best.yaml"
    path = write_export(plan, output)
    prov = plan.provenance
    if args.format == "json":
        emit_json({"output": str(path), **prov, "train_command": f"granq-search train --config {path}"})
        return 0
    m = prov["metrics"]
    print(f"exported trial {prov['trial']} of search '{prov['search']}' ({prov['rule']}) to {path}")
    print(f"  val top-1 {fmt_num(m['val_top1'], '.2f')}%  drop {fmt_num(m['val_drop'], '.2f')}  "
          f"test top-1 {fmt_num(m['test_top1'], '.2f')}%  BitOPs {fmt_num(m['bitops'], '.4g')}  "
          f"size {fmt_num(m['size_bits'] / 8192 if m['size_bits'] is not None else None, '.1f')} KiB")
    if plan.replaced:
        changes = ", ".join(f"{k} {v['search']} -> {v['production']}" for k, v in plan.replaced.items())
        print(f"  budget: production ({changes})")
    else:
        print(f"  budget: {prov['budget']}")
    if prov.get("overrides"):
        print("  overrides: " + ", ".join(f"{k}={v}" for k, v in prov["overrides"].items()))
    print(f"train it: granq-search train --config {path}")
    return 0
