"""The MLflow record of a ``train`` run: one run, its epochs, the student as an MLflow model.

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

What (:class:`TrainRun`, a :class:`~granq_search.pipeline.reporter.Reporter`)
    Tags: ``granq.kind=train``, the lineage of an exported config (``granq.search``,
    ``granq.trial_id``, ``granq.source_run_id`` = the trial's MLflow run, ``granq.source_tracking_uri``,
    ``granq.selection_rule``, ``granq.budget``), ``granq.config_source``, version, git commit
    (also as ``mlflow.source.git.commit``), the command line (URIs redacted), the teacher and its
    accuracy, ``granq.status`` (running/finished/failed/interrupted, ``granq.failure_reason``).
    Params: the flat dotted config, batches of 100, values cut to MLflow's 6000 characters.
    Metrics: every epoch's (``step = epoch``), then the final ones at ``step = epochs_run``
    (``final = 1``). Artifacts: ``config.yaml``, ``final.json``. Model ``student``: the
    best-validation student, logged with ``mlflow.pytorch.log_model`` in MLflow's safe ``pt2``
    format (``torch.export``; loading runs no pickle and needs only torch), with a signature
    (normalised images ``(-1, C, H, W)`` float32 -> logits ``(-1, classes)``), an input example,
    and ``extra_files`` ``config.yaml`` + ``student_best.pt`` from which
    :func:`granq_search.pipeline.student_io.load_student` rebuilds the quantized ``nn.Module``.
    A student ``torch.export`` cannot trace is logged in MLflow's pickle format instead (tag
    ``granq.model_format``). ``register_as`` registers it in the Model Registry, the version
    tagged with its validation and test figures.

Resume
    ``OUTPUT_DIR/mlflow_run.json`` holds the store, experiment and run id; ``train --resume``
    reopens that run (RUNNING again), logs only the params it lacks and only the epochs it has
    not recorded, and reuses a student model (and registry version) already logged for it:
    one run per training, however often it is resumed.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search.config import ExperimentConfig, flatten, read_yaml, split_document
from granq_search.errors import GranqError, TrackingError
from granq_search.pipeline.reporter import Reporter
from granq_search.tracking.provenance import git_commit, git_dirty, package_version
from granq_search.tracking.schema import METRICS, TAG, param_value
from granq_search.tracking.uri import redact_argv, redact_text, redact_uri, resolve_tracking_uri, sqlite_path

__all__ = [
    "DEFAULT_TRAIN_EXPERIMENT",
    "RUN_FILE",
    "MODEL_NAME",
    "TrainTarget",
    "TrainRun",
    "resolve_target",
    "read_run_file",
    "download_student_files",
    "fluent_store",
]

DEFAULT_TRAIN_EXPERIMENT = "granq_train"
RUN_FILE = "mlflow_run.json"
MODEL_NAME = "student"
MODEL_FILES = ("config.yaml", "student_best.pt")
"""Logged with the model (``extra_files``): what :func:`load_student` rebuilds the student from."""

MAX_BATCH = 100  # params / tags per log_batch (MLflow's limit)
MAX_PARAM = 6000
MAX_TAG = 8000
MAX_REASON = 500
EXAMPLE_IMAGES = 2
MODEL_VERSION_TAGS = ("best_val_top1", "best_test_top1", "val_drop", "test_drop", "teacher_val_top1",
                      "teacher_test_top1", "best_epoch", "bitops", "size_bits", "compression")
FINAL_EXTRA = ("val_top1", "val_top5", "best_val_top1")


class T:  # tags of a train run, beyond schema.TAG
    CONFIG_SOURCE = "granq.config_source"
    SOURCE_RUN = "granq.source_run_id"
    SOURCE_URI = "granq.source_tracking_uri"
    RULE = "granq.selection_rule"
    BUDGET = "granq.budget"
    OUTPUT_DIR = "granq.output_dir"
    RESUMED = "granq.resumed"
    MODEL_FORMAT = "granq.model_format"
    CHECKPOINT = "granq.checkpoint_sha256"


# ----------------------------------------------------------------------------- where


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
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or None
    prov_uri = str(prov.get("tracking_uri") or "").strip() or None
    if prov_uri is not None:
        db = sqlite_path(prov_uri)
        if db is not None and not db.is_file():
            prov_uri = None  # the search's store is not on this machine: the default store
    if tracking_uri:
        uri, source = tracking_uri, "--tracking-uri"
    elif recorded:
        uri, source = recorded["tracking_uri"], f"{RUN_FILE} of the resumed run"
    elif env_uri:
        uri, source = env_uri, "MLFLOW_TRACKING_URI"
    elif prov_uri:
        uri, source = prov_uri, "provenance.tracking_uri of the config"
    else:
        uri, source = None, "default"
    resolved = resolve_tracking_uri(uri, out.expanduser().resolve().parent, check=True)
    if recorded and not _same_uri(resolved, str(recorded["tracking_uri"])):
        raise TrackingError(f"the run in {out} is recorded at {redact_uri(recorded['tracking_uri'])}; a resumed "
                            f"run keeps its store (drop --tracking-uri {redact_uri(resolved)}, or --no-tracking)")
    name = experiment or (recorded or {}).get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() \
        or DEFAULT_TRAIN_EXPERIMENT
    if recorded and recorded.get("experiment") and name != recorded["experiment"]:
        raise TrackingError(f"the run in {out} is recorded in experiment '{recorded['experiment']}'; a resumed "
                            f"run keeps its experiment (drop --experiment {name}, or --no-tracking)")
    return TrainTarget(tracking_uri=resolved, experiment=name, uri_source=source, lineage=_lineage(prov),
                       run_id=(recorded or {}).get("run_id"))


# ----------------------------------------------------------------------------- helpers


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return redact_text(text)[:MAX_REASON]


@contextlib.contextmanager
def _store_errors(what: str, uri: str) -> Iterator[None]:
    """MLflow and database errors -> one TrackingError line (URIs redacted)."""
    try:
        yield
    except GranqError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException, SQLAlchemy, requests, OSError
        raise TrackingError(f"MLflow store {redact_uri(uri)}: cannot {what} ({type(e).__name__}: "
                            f"{_one_line(e)[:300]})") from None


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


def _chunks(items: Sequence[Any], n: int = MAX_BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    if hasattr(v, "item") and callable(v.item):
        try:
            return _number(v.item())
        except (TypeError, ValueError):
            return None
    return None


def run_name(cfg: ExperimentConfig) -> str:
    """``train W3A3 resnet20 2025-01-31 12:00:00``."""
    return (f"train W{cfg.quant.weight.bits}A{cfg.quant.act.bits} {cfg.model.name} "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")


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
        raise GranqError(f"cannot download the MLflow model {model_uri} ({_one_line(e)[:300]}); check the URI "
                         "and the tracking store (MLFLOW_TRACKING_URI, or tracking_uri=)") from None
    root = local / "extra_files" if (local / "extra_files").is_dir() else local
    cfg_path, weights = root / MODEL_FILES[0], root / MODEL_FILES[1]
    if not cfg_path.is_file() or not weights.is_file():
        raise GranqError(f"{model_uri} is not a student logged by `train` (no extra_files/{MODEL_FILES[0]} and "
                         f"{MODEL_FILES[1]}); load it with mlflow.pytorch.load_model instead")
    return cfg_path, weights


# ----------------------------------------------------------------------------- the run


class TrainRun(Reporter):
    """One MLflow run of a ``train`` command: :meth:`open` before training (creates or reopens
    it), the trainer's reporter during training, then :meth:`log_results` (final metrics, the
    model, the registry) and :meth:`close`; :meth:`abort` when training raised."""

    def __init__(self, client: Any, target: TrainTarget, experiment_id: str, run_id: str,
                 logged_epochs: set[int], resumed: bool) -> None:
        self.client = client
        self.target = target
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.logged_epochs = logged_epochs
        self.resumed = resumed
        self.pending: list[Any] = []  # metrics a failed write left behind, retried on the next one
        self._warned = False
        self._last_ts = 0
        self.closed = False
        self.model_name = ""
        self.output_dir: Path | None = None

    # -- opening

    @classmethod
    def open(cls, target: TrainTarget, cfg: ExperimentConfig, *, config_source: str, output_dir: str | Path,
             command: Sequence[str] | None = None) -> TrainRun:
        """Create the run, or reopen ``target.run_id``; tags and params. One-line TrackingError on failure."""
        from mlflow.tracking import MlflowClient

        uri = target.tracking_uri
        with _store_errors("open the store", uri):
            db = sqlite_path(uri)
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(uri)
            run, resumed = None, False
            if target.run_id:
                try:
                    run = client.get_run(target.run_id)
                except Exception:  # noqa: BLE001 - deleted from the store: record a new run
                    print(f"train: MLflow run {target.run_id} of {RUN_FILE} is not in {redact_uri(uri)}; "
                          "recording the resumed training as a new run", file=sys.stderr)
                    run = None
                if run is not None and run.info.lifecycle_stage == "deleted":
                    client.restore_run(run.info.run_id)
            if run is not None:
                exp_id, resumed = run.info.experiment_id, True
                client.update_run(run.info.run_id, status="RUNNING")
                logged = {int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")}
                existing = dict(run.data.params)
                count = int(run.data.tags.get(T.RESUMED, "0") or 0) + 1
            else:
                exp_id = cls._experiment(client, target)
                run = client.create_run(exp_id, run_name=run_name(cfg))
                logged, existing, count = set(), {}, 0
            self = cls(client, target, exp_id, run.info.run_id, logged, resumed)
            self.model_name = cfg.model.name
            self.output_dir = Path(output_dir)
        try:
            self._write_tags(self._start_tags(cfg, config_source, output_dir, command, count))
            self._write_params({k: param_value(v) for k, v in flatten(cfg).items()}, existing)
        except BaseException as err:
            self.abort(err)  # not left RUNNING
            raise
        return self

    @staticmethod
    def _experiment(client: Any, target: TrainTarget) -> str:
        exp = client.get_experiment_by_name(target.experiment)
        if exp is None:
            db = sqlite_path(target.tracking_uri)
            location = (db.parent / "mlartifacts").as_uri() if db is not None else None
            try:
                return client.create_experiment(target.experiment, artifact_location=location)
            except Exception:  # noqa: BLE001 - created by someone else meanwhile
                exp = client.get_experiment_by_name(target.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _start_tags(self, cfg: ExperimentConfig, config_source: str, output_dir: str | Path,
                    command: Sequence[str] | None, resumed: int) -> dict[str, str]:
        commit = git_commit()
        tags = {
            TAG.KIND: "train",
            TAG.STATUS: "running",
            TAG.VERSION: package_version(),
            TAG.GIT_COMMIT: commit,
            TAG.GIT_DIRTY: git_dirty(),
            TAG.TEACHER: cfg.model.name,
            T.CONFIG_SOURCE: config_source,
            T.OUTPUT_DIR: str(Path(output_dir).expanduser().resolve()),
            "mlflow.source.name": "tune_main.py train",
            "mlflow.source.type": "LOCAL",
            **self.target.lineage,
        }
        if commit != "unknown":
            tags["mlflow.source.git.commit"] = commit
        if command:
            tags[TAG.COMMAND] = " ".join(redact_argv(list(command)))[:5000]
        if resumed:
            tags[T.RESUMED] = str(resumed)
        if not self.resumed:
            try:
                import getpass

                tags["mlflow.user"] = getpass.getuser()
            except Exception:  # noqa: BLE001 - no user name on this machine
                pass
        return tags

    def write_run_file(self, output_dir: str | Path) -> Path:
        """``OUTPUT_DIR/mlflow_run.json``: what ``--resume`` reopens."""
        path = Path(output_dir) / RUN_FILE
        doc = {"tracking_uri": self.target.tracking_uri, "experiment": self.target.experiment,
               "experiment_id": self.experiment_id, "run_id": self.run_id}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": redact_uri(self.target.tracking_uri), "experiment": self.target.experiment,
                "run_id": self.run_id}

    # -- writes

    def _write_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:MAX_TAG]) for k, v in tags.items()]
        with _store_errors("write tags", self.target.tracking_uri):
            for chunk in _chunks(items):
                self.client.log_batch(self.run_id, tags=chunk)

    def _write_params(self, params: Mapping[str, str], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new = []
        for k, v in params.items():
            v = v[:MAX_PARAM]
            if k not in existing:
                new.append(Param(k, v))
            elif existing[k] != v:
                print(f"train: MLflow param {k} of run {self.run_id} stays {existing[k]!r} (params are immutable); "
                      f"the resumed run uses {v!r}", file=sys.stderr)
        with _store_errors("write params", self.target.tracking_uri):
            for chunk in _chunks(new):
                self.client.log_batch(self.run_id, params=chunk)

    def _metrics(self, values: Mapping[str, Any], step: int, keys: Sequence[str] | None = None) -> list[Any]:
        from mlflow.entities import Metric

        ts = max(int(time.time() * 1000), self._last_ts + 1)  # later writes win at the same step
        self._last_ts = ts
        out = []
        for k, v in values.items():
            x = _number(v)
            if x is not None and (k in METRICS if keys is None else k in keys):
                out.append(Metric(k, x, ts, step))
        return out

    def _flush(self, metrics: list[Any], strict: bool) -> None:
        """Write ``pending + metrics``; during training a failure is kept and warned about once."""
        self.pending.extend(metrics)
        try:
            with _store_errors("write metrics", self.target.tracking_uri):
                while self.pending:
                    chunk = self.pending[:1000]  # MLflow's metrics per batch
                    self.client.log_batch(self.run_id, metrics=chunk)
                    del self.pending[:len(chunk)]
        except TrackingError as e:
            if strict:
                raise
            if not self._warned:
                print(f"warning: {e}; kept in memory and retried after the next epoch", file=sys.stderr)
                self._warned = True

    # -- Reporter

    def on_start(self, info: Mapping[str, Any]) -> None:
        tags = {TAG.TEACHER_VAL: info.get("teacher_val_top1"), TAG.TEACHER_TEST: info.get("teacher_test_top1"),
                T.CHECKPOINT: info.get("checkpoint_sha256")}
        try:
            self._write_tags({k: v for k, v in tags.items() if v is not None})
        except TrackingError as e:
            print(f"warning: {e}", file=sys.stderr)
        if info.get("resumed"):
            self._backfill(int(info.get("start_epoch") or 0))

    def _backfill(self, done: int) -> None:
        """Epochs 1..``done`` that the checkpoint holds but the run lacks (training stopped between
        the epoch checkpoint and its MLflow write): from ``metrics.jsonl`` of the run folder."""
        path = self.output_dir / "metrics.jsonl" if self.output_dir is not None else None
        if path is None or not path.is_file() or all(e in self.logged_epochs for e in range(1, done + 1)):
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                metrics = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash
            step = metrics.get("epoch") if isinstance(metrics, dict) else None
            if isinstance(step, int) and 1 <= step <= done:
                self.on_epoch_end(step - 1, metrics, None)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any], checkpoint: Path | None) -> None:
        step = int(metrics.get("epoch", epoch + 1))
        if step in self.logged_epochs:  # recorded before the run was resumed
            return
        self._flush(self._metrics(metrics, step), strict=False)
        self.logged_epochs.add(step)

    # -- the end

    def log_results(self, final: Mapping[str, Any], *, student: Any, example: Any, output_dir: str | Path,
                    register_as: str | None = None) -> dict[str, Any]:
        """Final metrics, the student model (``example``: a batch of input images) and, with
        ``register_as``, a Model Registry version. Returns what was recorded (model URI, version)."""
        step = int(final.get("epochs_run") or max(self.logged_epochs, default=0))
        values = dict(final)
        if not final.get("stopped_early"):
            values["final"] = 1.0
        self._flush(self._metrics(values, step, keys=tuple(METRICS) + FINAL_EXTRA), strict=True)
        out: dict[str, Any] = self.describe()
        model = self._log_student(student, example, Path(output_dir), step)
        out.update(model)
        if register_as:
            out.update(self._register(register_as, model["model_uri"], final))
        return out

    def _existing_model(self) -> Any | None:
        try:
            found = self.client.search_logged_models(
                [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND name = '{MODEL_NAME}'")
        except Exception:  # noqa: BLE001 - an older server without logged-model search
            return None
        ready = [m for m in found if str(getattr(m.status, "name", m.status)).upper().endswith("READY")]
        return ready[0] if ready else None

    def _log_student(self, student: Any, example: Any, out: Path, step: int) -> dict[str, Any]:
        existing = self._existing_model()
        if existing is not None:  # a resumed run that had already logged its student
            fmt = self.client.get_run(self.run_id).data.tags.get(T.MODEL_FORMAT, "")
            return {"model_uri": f"models:/{existing.model_id}", "model_id": existing.model_id,
                    "model_format": fmt, "runs_uri": f"runs:/{self.run_id}/{MODEL_NAME}"}
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
            with _store_errors("log the student model", self.target.tracking_uri):
                logged = self.client.create_logged_model(
                    self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id,
                    tags={TAG.KIND: "student", T.MODEL_FORMAT: fmt})
            try:
                with fluent_store(self.target.tracking_uri):
                    info = mlflow.pytorch.log_model(
                        cpu, name=MODEL_NAME, model_id=logged.model_id, run_id=self.run_id, step=step,
                        signature=signature, input_example=x_np, extra_files=extra,
                        pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                        **({"serialization_format": fmt} if len(formats) > 1 else {}))
            except Exception as e:  # noqa: BLE001 - torch.export cannot trace it: pickle; else report
                last = e
                try:  # no half-written model left behind
                    self.client.delete_logged_model(logged.model_id)
                except Exception:  # noqa: BLE001
                    with contextlib.suppress(Exception):
                        self.client.finalize_logged_model(logged.model_id, "FAILED")
                if fmt == "pt2":
                    print(f"train: torch.export cannot export the student ({_one_line(e)[:200]}); logging it "
                          "in MLflow's pickle format (loading it needs granq_search installed)", file=sys.stderr)
                continue
            self._write_tags({T.MODEL_FORMAT: fmt})
            return {"model_uri": info.model_uri, "model_id": info.model_id, "model_format": fmt,
                    "runs_uri": f"runs:/{self.run_id}/{MODEL_NAME}"}
        assert last is not None
        raise TrackingError(f"MLflow store {redact_uri(self.target.tracking_uri)}: cannot log the student model "
                            f"({type(last).__name__}: {_one_line(last)[:300]})")

    def _register(self, name: str, model_uri: str, final: Mapping[str, Any]) -> dict[str, Any]:
        import mlflow

        if "'" in name or "\\" in name:
            raise TrackingError(f"--register-as {name!r}: a registered model name must not contain quotes")
        with _store_errors(f"register the model as '{name}'", self.target.tracking_uri), \
                fluent_store(self.target.tracking_uri):
            mv = None
            with contextlib.suppress(Exception):  # a resumed run already registered: reuse that version
                same = self.client.search_model_versions(f"name = '{name}' AND run_id = '{self.run_id}'")
                mv = max(same, key=lambda v: int(v.version)) if same else None
            if mv is None:
                mv = mlflow.register_model(model_uri, name)
            tags: dict[str, Any] = {k: final[k] for k in MODEL_VERSION_TAGS if _number(final.get(k)) is not None}
            tags.update({TAG.KIND: "train", "granq.run_id": self.run_id, TAG.TEACHER: self.model_name,
                         **{k: v for k, v in self.target.lineage.items() if k in (TAG.SEARCH, TAG.TRIAL_ID)}})
            for k, v in tags.items():
                self.client.set_model_version_tag(name, str(mv.version), k, str(v))
        return {"registered_model": name, "registered_version": int(mv.version),
                "registered_uri": f"models:/{name}/{mv.version}"}

    def close(self, output_dir: str | Path) -> None:
        """Artifacts ``config.yaml`` and ``final.json``; the run FINISHED."""
        from granq_search.tracking.store import set_terminated

        out = Path(output_dir)
        with _store_errors("finish the run", self.target.tracking_uri):
            for name in ("config.yaml", "final.json"):
                if (out / name).is_file():
                    self.client.log_artifact(self.run_id, str(out / name))
            self._write_tags({TAG.STATUS: "finished"})
            set_terminated(self.client, self.run_id, "FINISHED")
        self.closed = True

    def abort(self, err: BaseException) -> None:
        """Training (or recording) raised: FAILED with the reason, or KILLED when interrupted.
        Never raises: the original error is the one to report."""
        if self.closed:
            return
        from granq_search.tracking.store import set_terminated

        interrupted = isinstance(err, KeyboardInterrupt)
        tags = {TAG.STATUS: "interrupted" if interrupted else "failed"}
        if not interrupted:
            tags[TAG.FAILURE] = f"{type(err).__name__}: {_one_line(err)}"[:MAX_REASON]
        with contextlib.suppress(Exception):
            self._flush([], strict=False)
            self._write_tags(tags)
            set_terminated(self.client, self.run_id, "KILLED" if interrupted else "FAILED")
        self.closed = True
