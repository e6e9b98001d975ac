"""The MLflow record of a ``train`` run: one run, its epochs, the student as an MLflow model.

Where the run is recorded: :mod:`granq_search.tracking.train_target` (:func:`resolve_target`,
called before anything is trained or created). The student as an MLflow model and its registry
version: :mod:`granq_search.tracking.train_model`.

What (:class:`TrainRun`, a :class:`~granq_search.pipeline.reporter.Reporter`)
    Tags: ``granq.kind=train``, the lineage of an exported config (``granq.search``,
    ``granq.trial_id``, ``granq.source_run_id`` = the trial's MLflow run, ``granq.source_tracking_uri``,
    ``granq.selection_rule``, ``granq.budget``), ``granq.config_source``, version, git commit
    (also as ``mlflow.source.git.commit``), the command line (URIs redacted), the teacher and its
    accuracy, ``granq.status`` (running/finished/failed/interrupted, ``granq.failure_reason``).
    Params: the flat dotted config, batches of 100, values cut to MLflow's 6000 characters.
    Metrics (the recorded names of :mod:`granq_search.metrics`): every epoch's (``step = epoch``),
    then the final ones at ``step = epochs_run`` (``final = 1``). Artifacts: ``config.yaml``,
    ``final.json``. Model ``student``: the best-validation student (``train_model``);
    ``register_as`` registers it in the Model Registry.

Resume
    ``OUTPUT_DIR/mlflow_run.json`` holds the store, experiment and run id; ``train --resume``
    reopens that run (RUNNING again), logs only the params it lacks and only the epochs it has
    not recorded, and reuses a student model (and registry version) already logged for it:
    one run per training, however often it is resumed.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.config import ExperimentConfig, flatten
from granq_search.errors import TrackingError
from granq_search.pipeline.reporter import Reporter
from granq_search.jsonutil import write_json_atomic
from granq_search.tracking.mlflow_io import (
    MAX_METRICS,
    MAX_REASON,
    chunks,
    ensure_experiment,
    new_params,
    number,
    one_line,
    open_client,
    store_errors,
    write_tags,
)
from granq_search.tracking.provenance import git_commit, git_dirty, package_version
from granq_search.tracking.schema import METRICS, TAG, TRAIN_TAG as T, param_value
from granq_search.tracking.train_model import log_student, register_student
from granq_search.tracking.train_target import RUN_FILE, TrainTarget
from granq_search.tracking.uri import redact_argv, redact_uri

__all__ = ["TrainRun", "run_name"]


def run_name(cfg: ExperimentConfig) -> str:
    """``train W3A3 resnet20 2025-01-31 12:00:00``."""
    return (f"train W{cfg.quant.weight.bits}A{cfg.quant.act.bits} {cfg.model.name} "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")


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
        uri = target.tracking_uri
        with store_errors("open the store", uri):
            client = open_client(uri)
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
                logged = {int(m.step) for m in client.get_metric_history(run.info.run_id, M.EPOCH)}
                existing = dict(run.data.params)
                count = int(run.data.tags.get(T.RESUMED, "0") or 0) + 1
            else:
                exp_id = ensure_experiment(client, target.experiment, uri)
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
            "mlflow.source.name": "granq-search train",
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
        write_json_atomic(path, doc)
        return path

    def describe(self) -> dict[str, Any]:
        return {"tracking_uri": redact_uri(self.target.tracking_uri), "experiment": self.target.experiment,
                "run_id": self.run_id}

    # -- writes

    def _write_tags(self, tags: Mapping[str, Any]) -> None:
        write_tags(self.client, self.run_id, self.target.tracking_uri, tags)

    def _write_params(self, params: Mapping[str, str], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        def changed(k: str, old: str, v: str) -> None:
            print(f"train: MLflow param {k} of run {self.run_id} stays {old!r} (params are immutable); "
                  f"the resumed run uses {v!r}", file=sys.stderr)

        new = [Param(k, v) for k, v in new_params(params, existing, changed).items()]
        with store_errors("write params", self.target.tracking_uri):
            for chunk in chunks(new):
                self.client.log_batch(self.run_id, params=chunk)

    def _metrics(self, values: Mapping[str, Any], step: int) -> list[Any]:
        """The recorded metrics (``schema.METRICS``) among ``values``, as MLflow metrics at ``step``."""
        from mlflow.entities import Metric

        ts = max(int(time.time() * 1000), self._last_ts + 1)  # later writes win at the same step
        self._last_ts = ts
        out = []
        for k, v in values.items():
            x = number(v)
            if x is not None and k in METRICS:
                out.append(Metric(k, x, ts, step))
        return out

    def _flush(self, metrics: list[Any], strict: bool) -> None:
        """Write ``pending + metrics``; during training a failure is kept and warned about once."""
        self.pending.extend(metrics)
        try:
            with store_errors("write metrics", self.target.tracking_uri):
                while self.pending:
                    chunk = self.pending[:MAX_METRICS]
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
        tags = {TAG.TEACHER_VAL: info.get(M.TEACHER_VAL_TOP1), TAG.TEACHER_TEST: info.get(M.TEACHER_TEST_TOP1),
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
            step = metrics.get(M.EPOCH) if isinstance(metrics, dict) else None
            if isinstance(step, int) and 1 <= step <= done:
                self.on_epoch_end(step - 1, metrics, None)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any], checkpoint: Path | None) -> None:
        step = int(metrics.get(M.EPOCH, epoch + 1))
        if step in self.logged_epochs:  # recorded before the run was resumed
            return
        self._flush(self._metrics(metrics, step), strict=False)
        self.logged_epochs.add(step)

    # -- the end

    def log_results(self, final: Mapping[str, Any], *, student: Any, example: Any, output_dir: str | Path,
                    register_as: str | None = None) -> dict[str, Any]:
        """Final metrics, the student model (``example``: a batch of input images) and, with
        ``register_as``, a Model Registry version. Returns what was recorded (model URI, version)."""
        step = int(final.get(M.EPOCHS_RUN) or max(self.logged_epochs, default=0))
        values = dict(final)
        if not final.get("stopped_early"):
            values[M.FINAL] = 1.0
        self._flush(self._metrics(values, step), strict=True)
        out: dict[str, Any] = self.describe()
        model = log_student(self.client, experiment_id=self.experiment_id, run_id=self.run_id,
                            tracking_uri=self.target.tracking_uri, student=student, example=example,
                            out=Path(output_dir), step=step)
        out.update(model)
        if register_as:
            out.update(register_student(self.client, name=register_as, model_uri=model["model_uri"], final=final,
                                        run_id=self.run_id, tracking_uri=self.target.tracking_uri,
                                        teacher=self.model_name, lineage=self.target.lineage))
        return out

    def close(self, output_dir: str | Path) -> None:
        """Artifacts ``config.yaml`` and ``final.json``; the run FINISHED."""
        from granq_search.tracking.store import set_terminated

        out = Path(output_dir)
        with store_errors("finish the run", self.target.tracking_uri):
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
            tags[TAG.FAILURE] = f"{type(err).__name__}: {one_line(err)}"[:MAX_REASON]
        with contextlib.suppress(Exception):
            self._flush([], strict=False)
            self._write_tags(tags)
            set_terminated(self.client, self.run_id, "KILLED" if interrupted else "FAILED")
        self.closed = True
