"""A searched trial -> a complete, versioned production config with provenance.

A search records its space on its MLflow parent run (tag ``granq.space``; a search recorded
before that tag existed: the ``space`` of the search.json in its folder, tag
``granq.search_dir``) and each trial's searched values on its child run (tag
``granq.proposal``). The export is ``space.production_config(values)``: the base config at its
production budget with the trial's values (``--search-budget``: ``space.trial_config(values)``,
the budget the trial ran with); then ``--set`` overrides apply and the whole config is
validated. The file is written atomically and only after everything succeeded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from granq_search.config import (
    ExperimentConfig,
    dump_config,
    from_dict,
    get_path,
    machine_neutral,
    split_document,
    with_overrides,
)
from granq_search.errors import ConfigError, SearchSpaceError, TrackingError
from granq_search.export.select import describe_rule, select_trial
from granq_search.search.space import SearchSpace, space_from_record, space_from_text
from granq_search.tracking.leaderboard import Leaderboard, load_runs
from granq_search.tracking.provenance import git_commit, package_version
from granq_search.tracking.schema import DEFAULT_EXPERIMENT, TAG

__all__ = ["ExportPlan", "plan_export", "write_export", "export_config", "PROVENANCE_METRICS"]

PROVENANCE_METRICS = ("val_top1", "val_drop", "test_top1", "bitops", "size_bits")


@dataclass
class ExportPlan:
    """Everything export decided, before anything is written."""

    cfg: ExperimentConfig
    provenance: dict[str, Any]
    row: pd.Series
    board: Leaderboard
    replaced: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Fidelity paths set to production: ``{path: {"search": v, "production": v}}``."""


# ----------------------------------------------------------------------------- the recorded search


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _recorded_space(board: Leaderboard) -> tuple[SearchSpace, str]:
    """(the search's space, where it was read): its parent run's tag ``granq.space``, else the
    ``space`` of the search.json in its folder (searches recorded before the tag existed)."""
    text = board.tags.get(TAG.SPACE_RECORD)
    if text:
        origin = f"parent run tag {TAG.SPACE_RECORD}"
        try:
            return space_from_text(text, origin=f"search '{board.search}': {origin}"), origin
        except SearchSpaceError as e:
            raise TrackingError(str(e)) from None
    folder = board.tags.get(TAG.SEARCH_DIR)
    path = Path(folder) / "search.json" if folder else None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))["space"] if path is not None else None
    except (OSError, ValueError, KeyError, TypeError):
        record = None
    if not isinstance(record, Mapping):
        where = f"nor a readable search.json at {path}" if path is not None else "nor its search folder"
        raise TrackingError(f"search '{board.search}' recorded no search space (no parent tag {TAG.SPACE_RECORD}, "
                            f"{where}); it cannot be exported")
    try:
        return space_from_record(record, origin=str(path)), str(path)
    except SearchSpaceError as e:
        raise TrackingError(str(e)) from None


def _trial_values(board: Leaderboard, row: pd.Series, space: SearchSpace) -> dict[str, Any]:
    """The searched values the trial of ``row`` ran with: its child run's tag ``granq.proposal``
    (read with the leaderboard: ``board.proposals``)."""
    raw = board.proposals.get(str(row["run_id"]))
    try:
        values = json.loads(raw) if raw else None
    except ValueError:
        values = None
    if not isinstance(values, Mapping):
        raise TrackingError(f"trial {row['trial']} (run {row['run_id']}) recorded no readable proposal (tag "
                            f"{TAG.PROPOSAL}); it cannot be exported")
    unknown = [p for p in values if p not in space.parameters]
    if unknown:
        raise TrackingError(f"trial {row['trial']}: its proposal names {', '.join(map(str, unknown))}, which the "
                            "search's space does not search; the record was edited")
    return dict(values)


def _metric(row: pd.Series, key: str) -> Any:
    v = row.get(key)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ----------------------------------------------------------------------------- plan and write


def plan_export(tracking_uri: str, search: str | None = None, rule: str = "best", *, trial: str | None = None,
                max_drop: float | None = None, overrides: Mapping[str, Any] | None = None,
                production: bool = True, experiment: str = DEFAULT_EXPERIMENT, client=None,
                board: Leaderboard | None = None) -> ExportPlan:
    """Select the trial, build its config from the recorded space, apply overrides, validate.

    ``board``: the search's leaderboard when the caller has read it (``load_runs``), else it is
    read here (``client``: an MlflowClient of ``tracking_uri``; by default one is opened, on an
    existing store only)."""
    if board is None:
        board = load_runs(tracking_uri, search, experiment=experiment, client=client)
    row = select_trial(board.df, rule, trial=trial, max_drop=max_drop, objectives=board.objectives)
    space, source = _recorded_space(board)
    values = _trial_values(board, row, space)

    searched_cfg = space.trial_config(values)
    cfg = searched_cfg
    replaced: dict[str, dict[str, Any]] = {}
    if production:
        try:
            cfg = space.production_config(values)
        except ConfigError as e:
            raise ConfigError(f"the production budget does not validate for trial {row['trial']}: {e}; "
                              "fix it with --set or use --search-budget") from None
        for path in space.fidelity:
            searched, prod = get_path(searched_cfg, path), get_path(cfg, path)
            if searched != prod:
                replaced[path] = {"search": _plain(searched), "production": _plain(prod)}
    overrides = dict(overrides or {})
    if overrides:
        cfg = with_overrides(cfg, overrides)

    searched_version = board.tags.get(TAG.VERSION)
    searched_commit = board.tags.get(TAG.GIT_COMMIT)
    provenance: dict[str, Any] = {
        "search": board.search,
        "trial": str(row["trial"]),
        "run_id": str(row["run_id"]),
        "status": str(row["status"]),
        "rule": describe_rule(rule, trial=trial, max_drop=max_drop, objectives=board.objectives),
        "metrics": {k: _metric(row, k) for k in PROVENANCE_METRICS},
        "objectives": board.objectives,
        "budget": "production" if production else "search",
    }
    threads = str(board.tags.get(TAG.TRIAL_THREADS, ""))
    if threads.isdigit() and int(threads) >= 1:
        # torch CPU threads the trial ran with; `train` uses them for a --search-budget export
        provenance["threads"] = int(threads)
    if replaced:
        provenance["budget_changes"] = replaced
    if production and not space.fidelity:
        provenance["budget"] = "as searched (the search recorded no reduced fidelity)"
    if overrides:
        provenance["overrides"] = {k: _plain(v) for k, v in overrides.items()}
    provenance.update({
        "config_source": f"search space ({source})",
        "package_version": searched_version or package_version(),
        "git_commit": searched_commit or git_commit(),
        "exported_with": {"package_version": package_version(), "git_commit": git_commit()},
        "exported_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "tracking_uri": board.tracking_uri,
        "experiment": board.experiment,
    })
    return ExportPlan(cfg=cfg, provenance=provenance, row=row, board=board, replaced=replaced)


def write_export(plan: ExportPlan, output: str | Path) -> Path:
    """Write the plan atomically (temporary file, then rename); returns the path."""
    out = Path(output)
    if out.exists() and out.is_dir():
        raise TrackingError(f"--output {out} is a folder; give a file name such as {out / 'best.yaml'}")
    if out.suffix not in (".yaml", ".yml"):
        raise TrackingError(f"--output {out} must end in .yaml or .yml")
    text = dump_config(plan.cfg, provenance=plan.provenance, portable=True)
    check, _ = split_document(yaml.safe_load(text), str(out))
    if from_dict(check) != machine_neutral(plan.cfg):  # pragma: no cover - the round trip is tested elsewhere
        raise ConfigError("the exported config does not load back identically; this is a bug")
    dump_config(plan.cfg, out, provenance=plan.provenance, portable=True)
    return out


def export_config(tracking_uri: str, search: str | None = None, rule: str = "best", *, output: str | Path,
                  trial: str | None = None, max_drop: float | None = None,
                  overrides: Mapping[str, Any] | None = None, production: bool = True,
                  experiment: str = DEFAULT_EXPERIMENT) -> Path:
    """Select a trial of ``search`` by ``rule`` and write its production config to ``output``.

    ``granq-search train --config OUTPUT`` then trains it. Nothing is written on error.
    """
    plan = plan_export(tracking_uri, search, rule, trial=trial, max_drop=max_drop, overrides=overrides,
                       production=production, experiment=experiment)
    return write_export(plan, output)

