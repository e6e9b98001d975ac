"""MLflow client helpers shared by the ``train`` and ``search`` records: store errors as one line,
batches, numbers, the client and experiment of a store, the params still to write, and
:func:`fluent_store` (MLflow's process-wide URIs set for a block, then put back)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from granq_search.errors import GranqError, TrackingError
from granq_search.tracking.uri import redact_text, redact_uri, sqlite_path

__all__ = ["fluent_store", "store_errors", "one_line", "chunks", "number", "write_tags", "log_tags", "new_params",
           "open_client", "ensure_experiment", "MAX_BATCH", "MAX_TAG", "MAX_PARAM", "MAX_METRICS", "MAX_REASON"]

MAX_BATCH = 100  # params / tags per log_batch (MLflow's limit)
MAX_METRICS = 1000  # metrics per log_batch (MLflow's limit)
MAX_TAG = 8000  # characters of a tag value
MAX_PARAM = 6000  # characters of a param value
MAX_REASON = 500


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return redact_text(text)[:MAX_REASON]


@contextlib.contextmanager
def store_errors(what: str, uri: str) -> Iterator[None]:
    """MLflow and database errors -> one TrackingError line (URIs redacted)."""
    try:
        yield
    except GranqError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy, requests, OSError
        raise TrackingError(f"MLflow store {redact_uri(uri)}: cannot {what} ({type(e).__name__}: "
                            f"{one_line(e)[:300]})") from None


@contextlib.contextmanager
def fluent_store(uri: str | None, registry_uri: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking (and, if given, registry) URI set for the block, then put
    back as they were (``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``, restored
    too). Needed by ``log_model``, ``register_model`` and the ``models:/`` artifact repository,
    which take no client or ignore the URIs passed to them. ``None``: left as they are. Artifact
    progress bars are off unless the user switched them on."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    env = {k: os.environ.get(k) for k in keys}
    previous = getattr(tracking_utils, "_tracking_uri", None)
    previous_registry = getattr(registry_utils, "_registry_uri", None)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if uri is not None:
        mlflow.set_tracking_uri(uri)
    if registry_uri is not None:
        mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        if uri is not None:
            mlflow.set_tracking_uri(previous)
        if registry_uri is not None:
            mlflow.set_registry_uri(previous_registry)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chunks(items: Sequence[Any], n: int = MAX_BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    if hasattr(v, "item") and callable(v.item):
        try:
            return number(v.item())
        except (TypeError, ValueError):
            return None
    return None


def open_client(uri: str) -> Any:
    """``MlflowClient(uri)``; the folder of a SQLite store is created first."""
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(uri)


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``: created when missing (artifacts of a SQLite store in
    ``mlartifacts`` next to the database), restored when deleted. Errors are the caller's to wrap."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created by someone else meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def new_params(params: Mapping[str, str], existing: Mapping[str, str],
               on_changed: Callable[[str, str, str], None]) -> dict[str, str]:
    """The params of ``params`` (values cut to :data:`MAX_PARAM`) not yet in ``existing``; a param
    already logged with another value is not (MLflow params are immutable): ``on_changed(key,
    recorded, new)`` is called for it."""
    new: dict[str, str] = {}
    for k, v in params.items():
        v = v[:MAX_PARAM]
        if k not in existing:
            new[k] = v
        elif existing[k] != v:
            on_changed(k, existing[k], v)
    return new


def log_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    """Tags of run ``run_id`` (values cut to :data:`MAX_TAG`) in batches; errors are the caller's."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()]
    for chunk in chunks(items):
        client.log_batch(run_id, tags=chunk)


def write_tags(client: Any, run_id: str, uri: str, tags: Mapping[str, Any]) -> None:
    """Tags of run ``run_id`` (values cut to MLflow's length) in batches; one TrackingError line on failure."""
    with store_errors("write tags", uri):
        log_tags(client, run_id, tags)
