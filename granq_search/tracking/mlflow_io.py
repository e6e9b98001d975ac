"""MLflow client helpers of the ``train`` record: store errors as one line, batches, numbers,
and :func:`fluent_store` (MLflow's process-wide URIs set for a block, then put back)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from granq_search.errors import GranqError, TrackingError
from granq_search.tracking.uri import redact_text, redact_uri

__all__ = ["fluent_store", "store_errors", "one_line", "chunks", "number", "write_tags", "MAX_BATCH", "MAX_TAG",
           "MAX_REASON"]

MAX_BATCH = 100  # params / tags per log_batch (MLflow's limit)
MAX_TAG = 8000
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



def write_tags(client: Any, run_id: str, uri: str, tags: Mapping[str, Any]) -> None:
    """Tags of run ``run_id`` (values cut to MLflow's length) in batches; one TrackingError line on failure."""
    from mlflow.entities import RunTag

    items = [RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()]
    with store_errors("write tags", uri):
        for chunk in chunks(items):
            client.log_batch(run_id, tags=chunk)
