"""A searched trial -> a complete, versioned production config with provenance.

The trial's exact resolved config is its MLflow artifact ``config.yaml`` (params are the
fallback). The search ran at a reduced fidelity recorded on the parent run: tag
``granq.fidelity`` (JSON, dotted path -> value used while searching) and ``granq.production``
(JSON, the base config's production value for the same paths). Unless the search budget is
asked for, every fidelity path whose trial value is the searched one is set back to its
production value; then ``--set`` overrides apply and the whole config is validated. The file
is written atomically and only after everything succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from granq_search.config import (
    ExperimentConfig,
    check_path,
    dump_config,
    from_dict,
    get_path,
    split_document,
    to_dict,
    with_overrides,
)
from granq_search.errors import ConfigError, TrackingError
from granq_search.export.select import describe_rule, select_trial
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


# ----------------------------------------------------------------------------- the trial's config


def _plain(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _same(a: Any, b: Any) -> bool:
    a, b = _plain(a), _plain(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    if typing.get_origin(hint) is typing.Literal:
        return any(isinstance(a, str) for a in typing.get_args(hint))
    return any(_accepts_str(a) for a in typing.get_args(hint) if a is not type(None))


def _config_from_params(params: Mapping[str, str]) -> ExperimentConfig:
    data: dict[str, Any] = {}
    for key, raw in params.items():
        try:
            hint = check_path(key)
        except ConfigError:
            continue  # not a config field (a param someone else added)
        if dataclasses.is_dataclass(hint):
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if _accepts_str(hint) and not isinstance(value, str) and value is not None:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(data)


@contextlib.contextmanager
def _no_progress_bar():
    """MLflow draws a progress bar on stderr for every download; a CLI error must stay one line."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _trial_config(client, run_id: str) -> tuple[ExperimentConfig, str]:
    """(config, source): the ``config.yaml`` artifact, else the run's params."""
    text = None
    with tempfile.TemporaryDirectory(prefix="granq_export_") as tmp, _no_progress_bar():
        try:
            local = client.download_artifacts(run_id, "config.yaml", tmp)
            text = Path(local).read_text(encoding="utf-8")
        except Exception:  # noqa: BLE001 - missing artifact (its upload failed): use params
            text = None
    if text is not None:
        data, _ = split_document(yaml.safe_load(text), f"config.yaml of run {run_id}")
        return from_dict(data), "artifact config.yaml"
    run = client.get_run(run_id)
    if not any(k.startswith("quant.") for k in run.data.params):
        raise TrackingError(f"run {run_id} has neither a config.yaml artifact nor config params; "
                            "it cannot be exported")
    return _config_from_params(run.data.params), "params (config.yaml artifact missing)"


def _json_tag(tags: Mapping[str, str], key: str) -> dict[str, Any]:
    raw = tags.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise TrackingError(f"parent tag {key} is not JSON ({raw[:60]!r}); the search recorded it wrongly") from None
    if not isinstance(value, Mapping):
        raise TrackingError(f"parent tag {key} must be a JSON object of dotted path -> value")
    return dict(value)


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
                production: bool = True, experiment: str = DEFAULT_EXPERIMENT, client=None) -> ExportPlan:
    """Select the trial, rebuild its config at production budget, apply overrides, validate."""
    if client is None:
        from granq_search.tracking.uri import require_existing_store
        from mlflow.tracking import MlflowClient

        require_existing_store(tracking_uri)
        client = MlflowClient(tracking_uri)
    board = load_runs(tracking_uri, search, experiment=experiment, client=client)
    row = select_trial(board.df, rule, trial=trial, max_drop=max_drop, objectives=board.objectives)
    cfg, source = _trial_config(client, str(row["run_id"]))

    replaced: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] = {}
    fidelity = _json_tag(board.tags, TAG.FIDELITY)
    prod_values = _json_tag(board.tags, TAG.PRODUCTION)
    if production and fidelity:
        missing = [p for p in fidelity if p not in prod_values]
        if missing:
            raise TrackingError(f"search '{board.search}' recorded search-fidelity values for {', '.join(missing)} "
                                "but not their production values; pass them with --set or use --search-budget")
        changes = {}
        for path, searched in fidelity.items():
            current = get_path(cfg, path)
            if _same(current, searched):
                if not _same(current, prod_values[path]):
                    changes[path] = prod_values[path]
                    replaced[path] = {"search": _plain(current), "production": prod_values[path]}
            else:  # the trial itself chose this value: keep it
                kept[path] = _plain(current)
        if changes:
            try:
                cfg = with_overrides(cfg, changes)
            except ConfigError as e:
                raise ConfigError(f"the production budget does not validate for trial {row['trial']}: {e}; "
                                  "fix it with --set or use --search-budget") from None
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
    if kept:
        provenance["budget_kept"] = kept
    if production and not fidelity:
        provenance["budget"] = "as searched (the search recorded no reduced fidelity)"
    if overrides:
        provenance["overrides"] = {k: _plain(v) for k, v in overrides.items()}
    provenance.update({
        "config_source": source,
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
    text = dump_config(plan.cfg, provenance=plan.provenance)
    check, _ = split_document(yaml.safe_load(text), str(out))
    if from_dict(check) != plan.cfg:  # pragma: no cover - the config round trip is tested elsewhere
        raise ConfigError("the exported config does not load back identically; this is a bug")
    dump_config(plan.cfg, out, provenance=plan.provenance)
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


def config_summary(cfg: ExperimentConfig) -> dict[str, Any]:  # used by the CLI's table output
    flat = to_dict(cfg)
    return {"model": flat["model"]["name"], "epochs": flat["train"]["epochs"],
            "weight_bits": flat["quant"]["weight"]["bits"], "act_bits": flat["quant"]["act"]["bits"],
            "act_granularity": flat["quant"]["act"]["granularity"]}
