"""The student of a ``train`` run as an MLflow model, its Model Registry version, and the way back.

Model ``student``: the best-validation student, logged with ``mlflow.pytorch.log_model`` in
MLflow's safe ``pt2`` format (``torch.export``; loading runs no pickle and needs only torch), with
a signature (normalised images ``(-1, C, H, W)`` float32 -> logits ``(-1, classes)``), an input
example, and ``extra_files`` ``config.yaml`` + ``student_best.pt`` from which
:func:`granq_search.pipeline.student_io.load_student` rebuilds the quantized ``nn.Module``
(:func:`download_student_files` fetches them). A student ``torch.export`` cannot trace is logged
in MLflow's pickle format instead (tag ``granq.model_format``). :func:`register_student`
registers it in the Model Registry, the version tagged with its validation and test figures.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.errors import GranqError, TrackingError
from granq_search.tracking.mlflow_io import fluent_store, number, one_line, store_errors, write_tags
from granq_search.tracking.schema import TAG, TRAIN_TAG as T
from granq_search.tracking.uri import redact_uri

__all__ = ["MODEL_NAME", "MODEL_FILES", "download_student_files", "existing_model", "log_student",
           "register_student"]

MODEL_NAME = "student"
MODEL_FILES = ("config.yaml", "student_best.pt")
"""Logged with the model (``extra_files``): what :func:`load_student` rebuilds the student from."""

EXAMPLE_IMAGES = 2
MODEL_VERSION_TAGS = (M.BEST_VAL_TOP1, M.BEST_TEST_TOP1, M.VAL_DROP, M.TEST_DROP, M.TEACHER_VAL_TOP1,
                      M.TEACHER_TEST_TOP1, M.BEST_EPOCH, M.BITOPS, M.SIZE_BITS, M.COMPRESSION)


def download_student_files(model_uri: str, dst: str | Path, *, tracking_uri: str | None = None,
                           registry_uri: str | None = None) -> tuple[Path, Path]:
    """``config.yaml`` and ``student_best.pt`` of a student model logged by ``train``
    (``models:/NAME/VERSION``, ``models:/<model id>``, ``runs:/<run id>/student``, ...),
    downloaded under ``dst``. One-line :class:`GranqError` otherwise."""
    import mlflow.artifacts

    if registry_uri is None and tracking_uri is not None:
        registry_uri = tracking_uri  # the registry of the given store
    try:
        with fluent_store(tracking_uri, registry_uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst),
                                                             tracking_uri=tracking_uri, registry_uri=registry_uri))
    except Exception as e:  # noqa: BLE001 - MlflowException, requests, OSError: one line
        raise GranqError(f"cannot download the MLflow model {model_uri} ({one_line(e)[:300]}); check the URI "
                         "and the tracking store (MLFLOW_TRACKING_URI, or tracking_uri=)") from None
    root = local / "extra_files" if (local / "extra_files").is_dir() else local
    cfg_path, weights = root / MODEL_FILES[0], root / MODEL_FILES[1]
    if not cfg_path.is_file() or not weights.is_file():
        raise GranqError(f"{model_uri} is not a student logged by `train` (no extra_files/{MODEL_FILES[0]} and "
                         f"{MODEL_FILES[1]}); load it with mlflow.pytorch.load_model instead")
    return cfg_path, weights


def existing_model(client: Any, experiment_id: str, run_id: str) -> Any | None:
    """The READY student model already logged by run ``run_id``, or None."""
    try:
        found = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    except Exception:  # noqa: BLE001 - an older server without logged-model search
        return None
    ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
    return ready[0] if ready else None


def log_student(client: Any, *, experiment_id: str, run_id: str, tracking_uri: str, student: Any, example: Any,
                out: Path, step: int) -> dict[str, Any]:
    """Log ``student`` as the MLflow model ``student`` of run ``run_id`` (module docstring); a model
    the run logged already (a resumed run) is reused. Returns its URIs, id and format."""
    existing = existing_model(client, experiment_id, run_id)
    if existing is not None:  # a resumed run that had already logged its student
        fmt = client.get_run(run_id).data.tags.get(T.MODEL_FORMAT, "")
        return {"model_uri": f"models:/{existing.model_id}", "model_id": existing.model_id,
                "model_format": fmt, "runs_uri": f"runs:/{run_id}/{MODEL_NAME}"}
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    cpu = copy.deepcopy(student).cpu().eval()
    x = example.detach().cpu().float()[:EXAMPLE_IMAGES]
    with torch.no_grad():
        logits = cpu(x).float().numpy()
    x_np = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    signature = infer_signature(x_np, logits)
    extra = [str(out / name) for name in MODEL_FILES]
    # recent MLflow 3 releases save in the safe pt2 format (torch.export); earlier ones pickle only
    formats = ("pt2", "pickle") if "serialization_format" in inspect.signature(
        mlflow.pytorch.log_model).parameters else ("pickle",)
    last: Exception | None = None
    for fmt in formats:
        with store_errors("log the student model", tracking_uri):
            logged = client.create_logged_model(
                experiment_id, name=MODEL_NAME, source_run_id=run_id,
                tags={TAG.KIND: "student", T.MODEL_FORMAT: fmt})
        try:
            with fluent_store(tracking_uri):
                info = mlflow.pytorch.log_model(
                    cpu, name=MODEL_NAME, model_id=logged.model_id, run_id=run_id, step=step,
                    signature=signature, input_example=x_np, extra_files=extra,
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                    **({"serialization_format": fmt} if len(formats) > 1 else {}))
        except Exception as e:  # noqa: BLE001 - torch.export cannot trace it: pickle; else report
            last = e
            try:  # no half-written model left behind
                client.delete_logged_model(logged.model_id)
            except Exception:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    client.finalize_logged_model(logged.model_id, "FAILED")
            if fmt == "pt2":
                print(f"train: torch.export cannot export the student ({one_line(e)[:200]}); logging it "
                      "in MLflow's pickle format (loading it needs granq_search installed)", file=sys.stderr)
            continue
        write_tags(client, run_id, tracking_uri, {T.MODEL_FORMAT: fmt})
        return {"model_uri": info.model_uri, "model_id": info.model_id, "model_format": fmt,
                "runs_uri": f"runs:/{run_id}/{MODEL_NAME}"}
    assert last is not None
    raise TrackingError(f"MLflow store {redact_uri(tracking_uri)}: cannot log the student model "
                        f"({type(last).__name__}: {one_line(last)[:300]})")


def register_student(client: Any, *, name: str, model_uri: str, final: Mapping[str, Any], run_id: str,
                     tracking_uri: str, teacher: str, lineage: Mapping[str, str]) -> dict[str, Any]:
    """A Model Registry version ``name`` of ``model_uri`` (the version run ``run_id`` registered
    already, if any), tagged with the run's validation and test figures and lineage."""
    import mlflow

    if "'" in name or "\\" in name:
        raise TrackingError(f"--register-as {name!r}: a registered model name must not contain quotes")
    with store_errors(f"register the model as '{name}'", tracking_uri), \
            fluent_store(tracking_uri):
        mv = None
        with contextlib.suppress(Exception):  # a resumed run already registered: reuse that version
            same = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
            mv = max(same, key=lambda v: int(v.version)) if same else None
        if mv is None:
            mv = mlflow.register_model(model_uri, name)
        tags: dict[str, Any] = {k: final[k] for k in MODEL_VERSION_TAGS if number(final.get(k)) is not None}
        tags.update({TAG.KIND: "train", TAG.RUN_ID: run_id, TAG.TEACHER: teacher,
                     **{k: v for k, v in lineage.items() if k in (TAG.SEARCH, TAG.TRIAL_ID)}})
        for k, v in tags.items():
            client.set_model_version_tag(name, str(mv.version), k, str(v))
    return {"registered_model": name, "registered_version": int(mv.version),
            "registered_uri": f"models:/{name}/{mv.version}"}
