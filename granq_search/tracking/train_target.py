"""Where a ``train`` run is recorded in MLflow: the store, the experiment and the lineage of its config.

Where (:func:`resolve_target`, called before anything is trained or created)
    Store: ``--tracking-uri``; else, for ``--resume``, the store of the run being continued
    (``OUTPUT_DIR/mlflow_run.json``); else ``MLFLOW_TRACKING_URI``; else the store named in
    the exported config's ``provenance.tracking_uri`` (the search's store, when that SQLite
    file still exists); else ``sqlite:///<parent of the run folder>/mlflow.db`` (for the
    default run folder ``runs/train/NAME-TIMESTAMP``: ``runs/train/mlflow.db``). Same rules
    as :func:`granq_search.tracking.uri.resolve_tracking_uri`: file stores refused, an http
    server probed (3 s); a store that cannot be used is one :class:`TrackingError` line.
    Experiment: ``--experiment``; else the continued run's; else ``MLFLOW_EXPERIMENT_NAME``;
    else :data:`DEFAULT_TRAIN_EXPERIMENT` (``granq_train``: production runs are kept apart from
    the search trials of ``granq_search``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search.config import read_yaml, split_document
from granq_search.errors import GranqError, TrackingError
from granq_search.tracking.schema import TAG, TRAIN_TAG as T
from granq_search.tracking.uri import redact_uri, resolve_store, sqlite_path

__all__ = ["DEFAULT_TRAIN_EXPERIMENT", "RUN_FILE", "TrainTarget", "resolve_target", "read_run_file"]

DEFAULT_TRAIN_EXPERIMENT = "granq_train"
RUN_FILE = "mlflow_run.json"


@dataclass(frozen=True)
class TrainTarget:
    """The store and experiment of a train run, where they came from, and its lineage."""

    tracking_uri: str
    experiment: str
    uri_source: str
    lineage: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    """The run to continue (``--resume`` of a tracked run), else None."""


def read_run_file(output_dir: str | Path) -> dict[str, Any] | None:
    """``OUTPUT_DIR/mlflow_run.json`` (store, experiment, run id), or None."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise TrackingError(f"{path} is not readable JSON; delete it to record the resumed run as a new "
                            "MLflow run, or pass --no-tracking") from None
    if not isinstance(doc, dict) or not doc.get("run_id") or not doc.get("tracking_uri"):
        raise TrackingError(f"{path} lacks run_id/tracking_uri; delete it or pass --no-tracking")
    return doc


def _provenance(config: str) -> dict[str, Any]:
    if not config.endswith((".yaml", ".yml")) or not Path(config).is_file():
        return {}
    try:
        _, prov = split_document(read_yaml(config), config)
    except GranqError:
        return {}  # load_config reports the problem
    return dict(prov) if isinstance(prov, Mapping) else {}


def _lineage(prov: Mapping[str, Any]) -> dict[str, str]:
    pairs = ((TAG.SEARCH, "search"), (TAG.TRIAL_ID, "trial"), (T.SOURCE_RUN, "run_id"), (T.RULE, "rule"),
             (T.BUDGET, "budget"))
    out = {tag: str(prov[key]) for tag, key in pairs if prov.get(key) not in (None, "")}
    if prov.get("tracking_uri"):
        out[T.SOURCE_URI] = redact_uri(str(prov["tracking_uri"]))
    return out


def _same_uri(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def resolve_target(tracking_uri: str | None, experiment: str | None, config: str, output_dir: str | Path, *,
                   resume: bool = False) -> TrainTarget:
    """Where ``train`` records (module docstring). Probes an http server; creates nothing."""
    out = Path(output_dir)
    recorded = read_run_file(out) if resume else None
    prov = _provenance(config)
    prov_uri = str(prov.get("tracking_uri") or "").strip() or None
    if prov_uri is not None:
        db = sqlite_path(prov_uri)
        if db is not None and not db.is_file():
            prov_uri = None  # the search's store is not on this machine: the default store
    # the one resolution order of every command (tracking.uri.resolve_store)
    store = resolve_store(tracking_uri, experiment, out.expanduser().resolve().parent,
                          default_experiment=DEFAULT_TRAIN_EXPERIMENT, resumed=recorded,
                          resumed_source=f"{RUN_FILE} of the resumed run", fallback_uri=prov_uri,
                          fallback_source="provenance.tracking_uri of the config", check=True)
    resolved, source, name = store.tracking_uri, store.uri_source, store.experiment
    if recorded and not _same_uri(resolved, str(recorded["tracking_uri"])):
        raise TrackingError(f"the run in {out} is recorded at {redact_uri(recorded['tracking_uri'])}; a resumed "
                            f"run keeps its store (drop --tracking-uri {redact_uri(resolved)}, or --no-tracking)")
    if recorded and recorded.get("experiment") and name != recorded["experiment"]:
        raise TrackingError(f"the run in {out} is recorded in experiment '{recorded['experiment']}'; a resumed "
                            f"run keeps its experiment (drop --experiment {name}, or --no-tracking)")
    return TrainTarget(tracking_uri=resolved, experiment=name, uri_source=source, lineage=_lineage(prov),
                       run_id=(recorded or {}).get("run_id"))
