"""``searches``: the searches of a store (``DIR/*/search.json``) with their status and trial counts."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from granq_search.cli.common import DEFAULT_OUTPUT_DIR, add_format_flag, emit_json

if TYPE_CHECKING:  # pragma: no cover
    from granq_search.search.catalog import SearchSummary

COLUMNS = ("name", "status", "trials", "complete", "pruned", "failed", "running", "created", "updated",
           "space", "objectives")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("searches", help="list the searches of a store with their status and trial counts",
                       description="List every search in DIR (its DIR/NAME/search.json), oldest first: status, "
                       "trials run of those asked for, Optuna trial states, when it started and last changed, "
                       "space and objectives. Reads only; a running search's counts come from its Optuna "
                       "journal.")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR, metavar="DIR",
                   help=f"the searches' folder (default: {DEFAULT_OUTPUT_DIR})")
    add_format_flag(p)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t is not None else "-"


def _row(s: SearchSummary) -> list[str]:
    c = s.counts
    trials = "-" if s.trials is None else str(s.trials)
    if s.num_samples is not None:
        trials += f"/{s.num_samples}"

    def count(key: str) -> str:
        return str(c[key]) if key in c else "-"

    objectives = ",".join(f"{o.get('metric')}({o.get('mode')})" for o in s.objectives) or "-"
    space = Path(s.space_file).stem if s.space_file else "-"
    return [s.name, s.status, trials, count("complete"), count("pruned"), count("fail"), count("running"),
            _when(s.created), _when(s.updated), space, objectives]


def format_table(searches: Sequence[SearchSummary], output_dir: str) -> str:
    rows = [list(COLUMNS)] + [_row(s) for s in searches]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [f"{len(searches)} search(es) in {output_dir}, oldest first:"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"latest: {searches[-1].name} (what search --resume without --name continues)")
    if any(s.status == "running" for s in searches):
        lines.append("running: a driver is working on it now, or was killed; continue a killed one with "
                     f"granq-search search --resume --name NAME --output-dir {output_dir}")
    if any(s.counts_from == "journal" for s in searches):
        lines.append("counts of searches that are not finished come from their Optuna journal")
    lines += [f"note: {s.name}: {s.error}" for s in searches if s.error]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from granq_search.search.catalog import list_searches

    searches = list_searches(args.output_dir)
    if args.format == "json":
        emit_json({"output_dir": str(Path(args.output_dir).expanduser().resolve()),
                   "latest": searches[-1].name if searches else None,
                   "searches": [s.to_dict() for s in searches]})
    elif not searches:
        print(f"no searches in {args.output_dir} yet; start one with: granq-search search --output-dir "
              f"{args.output_dir}")
    else:
        print(format_table(searches, args.output_dir), end="")
    return 0
