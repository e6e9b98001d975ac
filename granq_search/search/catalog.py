"""The searches of a store (``granq-search searches``): every ``DIR/*/search.json`` summarised.

A search's record (:mod:`granq_search.search.layout`) says its status; its ``outcome`` (Ray
trials run, Optuna trial states) is written when the driver returns. A record whose outcome is
missing or older than its status (a running search, a driver that was killed or raised, a
resumed search) gets its trial states from the Optuna journal instead, read without writing.
Nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from granq_search.errors import GranqError
from granq_search.search.layout import search_order
from granq_search.search.study import TRIAL_STATES

__all__ = ["SearchSummary", "StoreError", "list_searches", "summarise"]

TERMINAL = ("finished", "exhausted")
"""Statuses only a returning driver writes, together with the outcome."""

STATES = TRIAL_STATES


class StoreError(GranqError):
    """A folder that cannot be listed as a store of searches."""


@dataclass(frozen=True)
class SearchSummary:
    name: str
    path: str
    status: str
    """running | finished | exhausted | interrupted (the record's), or unreadable."""
    created: float | None = None
    updated: float | None = None
    num_samples: int | None = None
    trials: int | None = None
    """Ray trials run (the outcome's), else Optuna trials that are not duplicate proposals."""
    counts: dict[str, int] = field(default_factory=dict)
    """Optuna trial states: complete, pruned, fail, running, waiting (+ duplicates)."""
    counts_from: str = "none"
    """outcome | journal | none."""
    objectives: list[dict[str, str]] = field(default_factory=list)
    space_file: str | None = None
    best_config: str | None = None
    resumes: int = 0
    error: str | None = None
    """Why the record or journal could not be read (status 'unreadable' for the record)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(x: Any) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def _journal_counts(journal: Path, study_name: str) -> dict[str, int]:
    """Trial states of the study in ``journal``, read only (the file must exist)."""
    import optuna

    from granq_search.search.study import journal_storage, trial_counts

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=journal_storage(str(journal)))
    except KeyError:
        raise GranqError(f"no Optuna study '{study_name}' in {journal}") from None
    return trial_counts(study)


def summarise(record_path: Path) -> SearchSummary:
    """One search from its ``search.json``; an unreadable record is a summary with ``error``."""
    folder = record_path.parent
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        try:
            mtime: float | None = record_path.stat().st_mtime  # as latest_search dates it
        except OSError:
            mtime = None
        return SearchSummary(name=folder.name, path=str(folder), status="unreadable", created=mtime,
                             error=f"cannot read {record_path.name}: {' '.join(str(e).split())}")
    status = str(record.get("status") or "unknown")
    outcome = record.get("outcome") if isinstance(record.get("outcome"), dict) else {}
    base: dict[str, Any] = dict(
        name=folder.name, path=str(folder), status=status,
        created=_number(record.get("created")), updated=_number(record.get("updated")),
        num_samples=int(record["num_samples"]) if _number(record.get("num_samples")) is not None else None,
        objectives=[dict(o) for o in record.get("objectives") or [] if isinstance(o, dict)],
        space_file=record.get("space_file"), resumes=int(_number(record.get("resumes")) or 0))
    if status in TERMINAL and outcome.get("status") == status:
        return SearchSummary(**base, trials=outcome.get("num_trials"), counts=dict(outcome.get("counts") or {}),
                             counts_from="outcome", best_config=outcome.get("best_config"))
    journal = folder / "optuna.journal"  # where the layout puts it, also in a moved store
    if not journal.is_file():  # a search stopped before its study was written
        return SearchSummary(**base, trials=0 if status != "running" else None)
    try:
        counts = _journal_counts(journal, str(record.get("study_name") or folder.name))
    except (GranqError, OSError, ValueError) as e:
        return SearchSummary(**base, error=f"cannot read the Optuna journal: {' '.join(str(e).split())}")
    trials = sum(counts[s] for s in STATES) - counts["duplicates"]
    return SearchSummary(**base, trials=trials, counts=counts, counts_from="journal")


def list_searches(output_dir: str | Path) -> list[SearchSummary]:
    """Every search in ``output_dir`` (its ``*/search.json``), oldest first: the last one is
    :func:`~granq_search.search.layout.latest_search`'s (both sort by
    :func:`~granq_search.search.layout.search_order`).

    Raises :class:`StoreError` when ``output_dir`` is not a folder; an empty folder gives [].
    """
    root = Path(output_dir).expanduser()
    if not root.exists():
        raise StoreError(f"no searches folder at '{output_dir}'; pass --output-dir DIR of a `granq-search "
                         "search` (default runs/search)")
    if not root.is_dir():
        raise StoreError(f"'{output_dir}' is a file, not a searches folder; pass --output-dir DIR")
    found = [summarise(p) for p in sorted(root.glob("*/search.json"))]
    return sorted(found, key=lambda s: search_order(s.created, s.name))
