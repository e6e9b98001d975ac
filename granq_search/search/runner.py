"""The search driver: validate, build the Tuner (or restore it), run, close the record, export.

Layout of a search (``--output-dir DIR --name NAME``, docs/ARCHITECTURE.md)::

    DIR/NAME/search.json             name, space, objectives, base config, status
    DIR/NAME/ray/                    Ray Tune experiment (--storage-path P: P/NAME instead)
    DIR/NAME/optuna.journal          Optuna study (the driver is its only writer)
    DIR/NAME/scheduler_state.json    ASHA rung records
    DIR/NAME/best.yaml               exported best config
    DIR/mlflow.db                    MLflow store of every search in DIR (default --tracking-uri)

Order of work in :func:`run_search`: every check a user can fail (space file, overrides,
numbers, name collision or missing search to resume, tracking URI, teacher and, locally, data)
happens before any directory is created or Ray is started, and so do the checks of
:mod:`~granq_search.search.preflight` (the cluster at ``address`` answers, ``--storage-path`` and
``--output-dir`` take files: seconds, not minutes of Ray retries). Ray is started only when it is
not running yet (``address`` None: a local instance, its dashboard only with ``dashboard``;
``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``: an existing cluster), and shut down only when this
call started it. A line on stderr names the dashboard's address or says why there is none.
Ray's own progress output is off; the live status table (:mod:`~granq_search.search.status`)
replaces it.

Trial settings follow ../shared/SEARCH.md: ``TuneConfig`` never gets ``metric``/``mode`` (the
objectives live on the searcher), ``max_concurrent_trials`` is always set, the scheduler gets
its own metric and mode, ``FailureConfig(max_failures=2)`` (worker deaths; failures that would
repeat are reported by the trainable instead), ``CheckpointConfig(num_to_keep=2)``, experiment
snapshots every :data:`SNAPSHOT_PERIOD_S` (``TUNE_GLOBAL_CHECKPOINT_S``, for ``--resume`` after a
killed driver),
``RAY_CHDIR_TO_TRIAL_DIR=0`` for the trials, and relative data/checkpoint paths made absolute
before launch. At the end no Optuna trial is left RUNNING, the MLflow parent run is closed and
the best configuration is exported to ``best.yaml``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search.config import ExperimentConfig, get_path, to_dict, with_overrides
from granq_search.errors import GranqError, SearchSpaceError
from granq_search.search.space import SearchSpace, TrialConfig, load_space, space_from_record, space_record_text

__all__ = ["run_search", "SearchOutcome", "SearchPaths", "latest_search", "read_search_record",
           "default_space_dir", "resolve_space_arg", "SearchError"]

SNAPSHOT_PERIOD_S = 1.0
"""Seconds between Ray's experiment-state snapshots (``TUNE_GLOBAL_CHECKPOINT_S``; Ray's default
'auto' is at least 10 s). The environment variable, when set, wins."""

FINISH_WAIT_S = 30.0
"""Seconds the MLflow recorder keeps retrying at the end of a search when the tracking server does
not answer (a server being restarted) before the search ends with 'rerun with --resume'."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class SearchError(GranqError):
    """A search that cannot start or resume as asked."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class SearchPaths:
    output_dir: Path
    name: str

    @property
    def root(self) -> Path:
        return self.output_dir / self.name

    @property
    def record(self) -> Path:
        return self.root / "search.json"

    @property
    def journal(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def scheduler_state(self) -> Path:
        return self.root / "scheduler_state.json"

    @property
    def best(self) -> Path:
        return self.root / "best.yaml"


def default_space_dir() -> Path:
    """The shipped search spaces: ``granq_search/search_spaces`` in an installed package (a wheel,
    ``pip install .``; pyproject.toml maps the top-level folder there), else ``<repository>/search_spaces``
    (a source checkout or an editable install, where the package sits next to it)."""
    from importlib.resources import files

    import granq_search

    shipped = files(granq_search).joinpath("search_spaces")
    if isinstance(shipped, Path) and shipped.is_dir():
        return shipped.resolve()
    return Path(granq_search.__file__).resolve().parent.parent / "search_spaces"


def resolve_space_arg(space: str | None) -> Path:
    """``--space``: a YAML path, or the name of a shipped space (:func:`default_space_dir`).

    A YAML name, a name with a ``/`` or an existing file is a path (relative to the working
    directory); any other name is looked up among the shipped spaces, wherever the command runs.
    """
    directory = default_space_dir()
    if space is None:
        space = "digits"
    p = Path(space)
    if p.suffix in (".yaml", ".yml") or p.is_file() or "/" in space or os.sep in space:
        if not p.is_file():
            raise SearchSpaceError(f"search space file '{space}' does not exist; check the path")
        return p
    candidate = directory / f"{space}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in directory.glob("*.yaml")) if directory.is_dir() else []
        where = f"in {directory}" if directory.is_dir() else \
            f"(this install ships no search spaces: {directory} is missing; reinstall granq_search)"
        tip = f"; known: {', '.join(known)}" if known else ""
        raise SearchSpaceError(f"no search space named '{space}' {where}{tip}; pass --space PATH to a "
                               "search-space YAML")
    return candidate


def read_search_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SearchError(f"cannot read '{path}' ({e}); it is not a granq_search search folder") from None


def latest_search(output_dir: Path) -> str:
    """Name of the most recently started search in ``output_dir``."""
    found = []
    if output_dir.is_dir():
        for rec in output_dir.glob("*/search.json"):
            try:
                created = float(json.loads(rec.read_text(encoding="utf-8")).get("created", 0))
            except (OSError, ValueError):
                created = rec.stat().st_mtime
            found.append((created, rec.parent.name))
    if not found:
        raise SearchError(f"no search to resume in '{output_dir}'; pass --name NAME and --output-dir DIR of "
                          "an earlier search")
    return max(found)[1]


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    from granq_search.jsonutil import json_safe

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(dict(record)), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- outcome


@dataclass
class SearchOutcome:
    name: str
    path: str
    status: str
    """finished | interrupted | exhausted (the sampler ran out of new configurations)."""
    num_trials: int
    """Ray trials run (a duplicate proposal is not a Ray trial)."""
    counts: dict[str, int]
    """Optuna trial states: complete, pruned, fail (+ running, always 0 at the end)."""
    pareto: list[dict[str, Any]]
    objectives: list[dict[str, str]]
    ray_path: str
    journal: str
    tracking_uri: str
    wall_time_s: float
    best_config: str | None = None
    experiment: str = ""
    """The MLflow experiment of the record ('' without tracking)."""
    leaderboard: str | None = None
    notes: list[str] = field(default_factory=list)
    dashboard_url: str | None = None
    """Ray's dashboard, when this search started or reached one that reports it."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


# --------------------------------------------------------------------------- helpers


def _abs_paths(cfg: ExperimentConfig, *, local: bool) -> ExperimentConfig:
    """Relative data/checkpoint paths made absolute (trials must not depend on their cwd).

    Locally every relative path is resolved against the current directory; on a cluster only
    paths that exist here (the driver's working directory is shipped to the workers with
    ``ray job submit --working-dir``; other paths are the workers' own).
    """
    changes = {}
    for path in ("data.root", "model.checkpoint"):
        value = get_path(cfg, path)
        if isinstance(value, str) and value and not _URI.match(value) and not os.path.isabs(value):
            p = Path(value).expanduser()
            if local or p.exists():
                changes[path] = str(p.resolve())
    return with_overrides(cfg, changes) if changes else cfg


def _check_numbers(num_samples: int, max_concurrent: int, cpus: float, gpus: float) -> None:
    if num_samples < 1:
        raise SearchError(f"--num-samples must be >= 1, got {num_samples}")
    if max_concurrent < 1:
        raise SearchError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    if not (cpus > 0 and math.isfinite(cpus)):
        raise SearchError(f"--cpus-per-trial must be > 0, got {cpus}")
    if not (gpus >= 0 and math.isfinite(gpus)) or (gpus > 1 and not float(gpus).is_integer()):
        raise SearchError(f"--gpus-per-trial must be a fraction in [0, 1] or a whole number, got {gpus}")


def _check_address(address: str | None) -> None:
    if address is None or address == "auto":
        return
    if address.startswith("ray://") or re.match(r"^[A-Za-z0-9.\-\[\]:]+:\d+$", address):
        return
    from granq_search.tracking.uri import redact_uri

    raise SearchError(f"--address {redact_uri(address)!r} is not a Ray address; use auto, HOST:PORT or "
                      "ray://HOST:PORT")


def _storage(storage_path: str | None, paths: SearchPaths) -> tuple[str, str]:
    """(Ray storage_path, experiment name)."""
    if storage_path is None:
        return str(paths.root), "ray"
    if _URI.match(storage_path):
        return storage_path.rstrip("/"), paths.name
    return str(Path(storage_path).expanduser().resolve()), paths.name


def _teacher(cfg: ExperimentConfig) -> tuple[dict[str, Any], str | None, str]:
    """The teacher's weights (CPU tensors) for the object store, its sha256, where it came from."""
    from granq_search.models import build_teacher

    teacher = build_teacher(cfg.model, "cpu")
    state = {k: v.detach().cpu() for k, v in teacher.model.state_dict().items()}
    return state, teacher.checkpoint_sha256, teacher.source


def _measure_teacher(cfg: ExperimentConfig, teacher_state: Mapping[str, Any], teacher_sha: str | None, *,
                     threads: int | None) -> dict[str, Any]:
    """The teacher's validation and test accuracy (this also checks the data before Ray starts)
    and, when ``threads`` is given (trials on CPU), its FP latency at the trials' thread count:
    measured once here and handed to every trial instead of being measured in each."""
    import torch

    from granq_search.pipeline.trainer import TeacherMetrics, build_setup, latency_shape, measure_latency

    setup = build_setup(cfg, "cpu", teacher_state=teacher_state, teacher_sha256=teacher_sha)
    latency = None
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            latency = measure_latency(setup.teacher, latency_shape(setup.cfg, setup.in_channels), setup.device)
        finally:
            torch.set_num_threads(before)
    return TeacherMetrics(setup.teacher_val, setup.teacher_test, latency).to_dict()


def _pareto(study, space: SearchSpace) -> list[dict[str, Any]]:
    out, seen = [], set()
    try:
        best = study.best_trials
    except Exception:  # noqa: BLE001 - no finished trial
        best = []
    for t in sorted(best, key=lambda t: t.values):
        source = t.user_attrs.get("duplicate_of", t.number)
        if source in seen:
            continue
        seen.add(source)
        out.append({"number": t.number, "ray_trial_id": t.user_attrs.get("ray_trial_id"),
                    "values": dict(zip(space.metrics, t.values)), "params": dict(t.params)})
    return out


def _counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    names = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "fail",
             TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
    counts = {v: 0 for v in names.values()}
    for t in trials:
        counts[names[t.state]] += 1
    counts["duplicates"] = sum(1 for t in trials if "duplicate_of" in t.user_attrs)
    return counts


# --------------------------------------------------------------------------- the driver


def run_search(
    space: str | Path | SearchSpace | None = None,
    *,
    name: str | None = None,
    output_dir: str | Path = "runs/search",
    num_samples: int | None = None,
    max_concurrent: int | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    address: str | None = None,
    storage_path: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    resume: bool = False,
    set_overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    trainable: Callable[..., Any] | None = None,
    callbacks: Sequence[Any] = (),
    leaderboard_top: int = 5,
    tracking: bool = True,
    dashboard: bool = False,
    status_interval_s: float = 15.0,
) -> SearchOutcome:
    """Run (or with ``resume`` continue) a search; see the module docstring.

    ``num_samples`` (default 8) and ``max_concurrent`` (default 2) are fixed when a search
    starts; a resumed search keeps them (giving other values is an error). ``trainable``
    replaces :func:`~granq_search.search.trainable.train_trial` (same keyword parameters) and
    ``callbacks`` are extra Ray callbacks: both for embedding and tests. ``tracking=False``
    records nothing in MLflow (tests of the search machinery only).

    ``progress``: the live status table (:mod:`granq_search.search.status`, on stderr, at most
    every ``status_interval_s`` seconds) in place of Ray's own output, which is always off (Ray's
    warnings and errors stay visible). ``dashboard``: start Ray's dashboard with a local Ray
    (needs ``ray[default]``); a line on stderr names its address, or says it is off.
    """
    t0 = time.time()
    output = Path(output_dir).expanduser().resolve()
    _check_address(address)
    local = address is None

    # ------------------------------------------------------------- validate (no side effects)
    if resume:
        if space is not None:
            raise SearchError("a resumed search keeps the space it started with; drop --space")
        if set_overrides:
            raise SearchError("a resumed search keeps its overrides; drop --set")
        name = name or latest_search(output)
        paths = SearchPaths(output, name)
        if not paths.record.is_file():
            raise SearchError(f"no search '{name}' in '{output}' (no {paths.record.name}); check --name and "
                              "--output-dir, or start it without --resume")
        record = read_search_record(paths.record)
        the_space = space_from_record(record["space"])
        for flag, given, kept in (("--num-samples", num_samples, record["num_samples"]),
                                  ("--max-concurrent", max_concurrent, record["max_concurrent"])):
            if given is not None and int(given) != int(kept):
                raise SearchError(f"search '{name}' was started with {flag} {kept}; a resumed search keeps it")
        num_samples, max_concurrent = int(record["num_samples"]), int(record["max_concurrent"])
        if storage_path is not None and storage_path != record.get("storage_path_arg"):
            raise SearchError(f"search '{name}' keeps its Ray results at {record['ray_path']}; drop --storage-path")
        storage_arg = record.get("storage_path_arg")
    else:
        if isinstance(space, SearchSpace):
            the_space = space
            if set_overrides:
                raise SearchError("pass --set overrides to load_space, not with a loaded space")
        else:
            the_space = load_space(resolve_space_arg(None if space is None else str(space)), set_overrides)
        if name is None:
            stem = Path(the_space.source).stem if the_space.source else "search"
            name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if not _NAME.match(name):
            raise SearchError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (at most 100, no '/')")
        paths = SearchPaths(output, name)
        if paths.root.exists():
            raise SearchError(f"search '{name}' already exists in '{output}'; pass --resume to continue it or "
                              "choose another --name")
        num_samples = 8 if num_samples is None else int(num_samples)
        max_concurrent = 2 if max_concurrent is None else int(max_concurrent)
        storage_arg = storage_path
        record = {}
    _check_numbers(num_samples, max_concurrent, float(cpus_per_trial), float(gpus_per_trial))
    ray_storage, ray_name = _storage(storage_arg, paths)
    ray_path = f"{ray_storage}/{ray_name}"
    _preflight(address, storage_arg, ray_storage, output, dashboard=dashboard)

    from granq_search.tracking import DEFAULT_EXPERIMENT, redact_uri
    from granq_search.tracking.uri import resolve_store

    # --tracking-uri / --experiment, else the resumed search's, else MLFLOW_TRACKING_URI /
    # MLFLOW_EXPERIMENT_NAME, else DIR/mlflow.db and granq_search
    kept = {"tracking_uri": record.get("tracking_uri"), "experiment": record.get("experiment") or DEFAULT_EXPERIMENT}
    store = resolve_store(tracking_uri, experiment, output, resumed=kept if resume else None) if tracking else None
    uri = store.tracking_uri if store is not None else None
    if resume and store is not None and store.experiment != kept["experiment"]:
        raise SearchError(f"search '{name}' is recorded in MLflow experiment '{kept['experiment']}'; a resumed "
                          "search keeps its experiment: drop --experiment")
    if store is not None and progress:
        import sys

        print(f"search {name}: {store.describe()}", file=sys.stderr)
    if resume and tracking and record.get("tracking_uri") and uri != record["tracking_uri"]:
        # the MLflow callback restored from Ray's tuner.pkl keeps writing to the first store
        raise SearchError(f"search '{name}' is recorded at {redact_uri(record['tracking_uri'])}; a resumed search "
                          "keeps its tracking store: drop --tracking-uri")
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(ray_path):
            raise SearchError(f"search '{name}' has no Ray experiment state at {ray_path} to resume")

    trial_base = _abs_paths(the_space.search_base, local=local)
    teacher_state, teacher_sha, teacher_source = _teacher(trial_base)
    teacher_metrics = record.get("teacher_metrics") if resume else None
    if local and teacher_metrics is None:
        from granq_search.search.trainable import threads_for_cpus

        threads = threads_for_cpus(cpus_per_trial) if not gpus_per_trial else None
        teacher_metrics = _measure_teacher(trial_base, teacher_state, teacher_sha, threads=threads)

    # ------------------------------------------------------------- side effects start here
    import ray
    from ray import tune

    from granq_search.search.costs import EfficiencyCost
    from granq_search.search.scheduler import asha_for, eval_epochs
    from granq_search.search.resume import close_running_trials, replayable_results, restored_recorder
    from granq_search.search.searcher import OptunaSearcher, open_study
    from granq_search.search.trainable import make_trainable

    # before any folder: a refused connection leaves nothing
    from granq_search.user_code import code_roots

    # the folders of the config's own modules (model.name / data.dataset import paths) for local trials
    code_paths = code_roots((trial_base.model.name, trial_base.data.dataset))
    started_ray, dashboard_url = _connect(address, progress, dashboard=dashboard, code_paths=code_paths)
    made_root = not paths.root.exists()
    fit_started = False
    recorder = None
    status = "interrupted"
    notes: list[str] = []
    num_trials = 0
    # Trials must not depend on their working directory: Ray propagates this variable to every
    # trial actor (and relative paths were made absolute above).
    env = {"RAY_CHDIR_TO_TRIAL_DIR": "0",
           # Ray snapshots the experiment (trials, searcher) every ~10 s by default; trials a killed
           # driver started after the last snapshot are unknown to Ray on --resume (the searcher
           # then proposes their parameters again). A short period keeps that gap small.
           "TUNE_GLOBAL_CHECKPOINT_S": os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S)),
           # one checkpoint per epoch with num_to_keep=2 forces frequent snapshots, by design
           "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S":
               os.environ.get("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0"),
           # trials validate only at the scheduler's rung epochs and the last one (eval_epochs):
           # the other epochs' reports carry no val_top1, which ASHA skips and the searcher and
           # recorder accept; Ray's check that every report names the scheduler metric is off
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    # Ray's own progress output is off (the legacy engine at verbose 0 prints nothing; the new one
    # prints headers and per-trial boxes even at verbose 0); the status table replaces it
    env["RAY_AIR_NEW_OUTPUT"] = "0"
    table = _status_table(the_space, name, num_samples, status_interval_s) if progress else None
    try:
        with _env(env):
            paths.root.mkdir(parents=True, exist_ok=True)
            if not resume:
                record = {
                    "name": name,
                    "created": time.time(),
                    "space_file": the_space.source,
                    "objectives": [{"metric": o.metric, "mode": o.mode} for o in the_space.objectives],
                    "space": the_space.to_record(),
                    "base_config": to_dict(the_space.base),
                    "search_config": to_dict(the_space.search_base),
                    "num_samples": num_samples,
                    "max_concurrent": max_concurrent,
                    "storage_path_arg": storage_arg,
                    "ray_path": ray_path,
                    "journal": str(paths.journal),
                    "scheduler_state": str(paths.scheduler_state),
                    "study_name": name,
                    "tracking_uri": uri,
                    "experiment": store.experiment if store is not None else None,
                    "teacher": {"source": teacher_source, "sha256": teacher_sha},
                    "teacher_metrics": teacher_metrics,
                }
                open_study(the_space, str(paths.journal), name, create=True)  # enqueues the initial points
            record.update(status="running", updated=time.time(), cpus_per_trial=cpus_per_trial,
                          gpus_per_trial=gpus_per_trial, address=address,
                          resumes=int(record.get("resumes", -1)) + 1)
            _write_record(paths.record, record)

            # A killed driver's last Ray snapshot may predate the end of some trials; the study
            # (written at once) has their last results: replayed, not trained again.
            replay = replayable_results(the_space, str(paths.journal), name) if resume else {}
            # the one builder of the trials' configs: the trainable trains with it, the recorder logs it
            trials = TrialConfig(trial_base)
            fn = make_trainable(trials, teacher_state=teacher_state, teacher_sha256=teacher_sha,
                                cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, function=trainable,
                                replay=replay, teacher_metrics=teacher_metrics, eval_epochs=eval_epochs(the_space))
            if tracking:
                from granq_search.search.trainable import threads_for_cpus
                from granq_search.tracking import SearchRecorder
                from granq_search.tracking.schema import TAG

                recorder = SearchRecorder(
                    tracking_uri=uri, experiment_name=store.experiment, search_name=name,
                    searched=list(the_space.parameters),
                    parent_tags={
                        "granq.space_file": the_space.source,
                        "granq.pinned": json.dumps(dict(getattr(the_space, "pinned", {}) or {}), default=str),
                        TAG.SPACE_RECORD: space_record_text(the_space),  # what export rebuilds
                        TAG.SEARCH_DIR: str(paths.root),
                        "granq.ray_path": ray_path,
                        TAG.TRIAL_THREADS: str(threads_for_cpus(cpus_per_trial)),
                    },
                    objectives=[{"metric": o.metric, "mode": o.mode} for o in the_space.objectives],
                    trial_config=trials,
                    finish_wait_s=FINISH_WAIT_S,
                )
            if resume:
                # The searcher, scheduler and recorder come back from Ray's tuner.pkl: they reopen
                # the journal, reload the rung records and find their MLflow runs by themselves.
                tuner = tune.Tuner.restore(ray_path, trainable=fn, resume_unfinished=True, resume_errored=True)
                # finish() on the restored instance itself, so that writes it could not record
                # (a store that is down) are retried at the end rather than dropped with it
                recorder = restored_recorder(tuner, recorder)
                _replace_status_table(tuner, table)
            else:
                searcher = OptunaSearcher(the_space, journal_path=str(paths.journal), study_name=name,
                                          cost_fn=EfficiencyCost() if the_space.constraints else None)
                scheduler = asha_for(the_space, paths.scheduler_state)
                tuner = tune.Tuner(
                    fn,
                    tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=num_samples,
                                                max_concurrent_trials=max_concurrent, reuse_actors=True),
                    run_config=tune.RunConfig(
                        name=ray_name, storage_path=ray_storage,
                        failure_config=tune.FailureConfig(max_failures=2),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                        callbacks=[*([recorder] if recorder is not None else []),
                                   *([table] if table is not None else []), *callbacks],
                        verbose=0,
                    ),
                )
            fit_started = True
            grid = tuner.fit()
        num_trials = len(grid)
        finished = grid.num_terminated + grid.num_errors == num_trials
        study, _ = open_study(the_space, str(paths.journal), name)
        exhausted = bool(study.user_attrs.get("exhausted"))
        if finished and (num_trials >= num_samples or exhausted):
            status = "exhausted" if exhausted and num_trials < num_samples else "finished"
    except BaseException:
        if not fit_started and made_root:  # nothing worth keeping was written
            shutil.rmtree(paths.root, ignore_errors=True)
            if started_ray:
                ray.shutdown()
            raise
        status = "interrupted"
        raise
    finally:
        if fit_started or not made_root:
            closed = close_running_trials(str(paths.journal), name)
            if closed and status != "interrupted":
                notes.append(f"{closed} Optuna trial(s) were still RUNNING at the end and were told FAIL")
            if started_ray and ray.is_initialized():
                ray.shutdown()
            if paths.record.is_file():
                record.update(status=status, updated=time.time())
                _write_record(paths.record, record)
            if recorder is not None and fit_started:
                # also when fit() raised; the recorder's own error must not hide the first one
                try:
                    recorder.finish("FINISHED" if status != "interrupted" else "KILLED")
                except GranqError as e:
                    notes.append(str(e))

    study, _ = open_study(the_space, str(paths.journal), name)
    outcome = SearchOutcome(
        name=name, path=str(paths.root), status=status, num_trials=num_trials, counts=_counts(study),
        pareto=_pareto(study, the_space), objectives=record["objectives"], ray_path=ray_path,
        journal=str(paths.journal), tracking_uri=redact_uri(uri) if uri else "", wall_time_s=time.time() - t0,
        experiment=store.experiment if store is not None else "",
        notes=notes, dashboard_url=dashboard_url,
    )
    if tracking and outcome.counts["complete"]:
        from granq_search.export.production import export_config
        from granq_search.tracking import format_leaderboard, load_runs

        try:
            outcome.leaderboard = format_leaderboard(load_runs(uri, name, experiment=outcome.experiment), "table",
                                                     top=leaderboard_top)
        except GranqError as e:
            notes.append(f"leaderboard: {e}")
        try:
            outcome.best_config = str(export_config(uri, name, "best", output=paths.best,
                                                    experiment=outcome.experiment))
        except GranqError as e:
            notes.append(f"export: {e}")
        if outcome.counts["complete"] >= 2:
            from granq_search.search.importance import log_importance_artifacts

            if not log_importance_artifacts(uri, name, paths.journal, record["objectives"],
                                            experiment=outcome.experiment):
                notes.append("importance: importance.json/png not stored in MLflow (see the warning above); "
                             "`granq-search leaderboard --importance` computes them")
    record.update(outcome={k: v for k, v in outcome.to_dict().items() if k not in ("leaderboard",)})
    _write_record(paths.record, record)
    return outcome


def _connect(address: str | None, progress: bool, *, dashboard: bool = False,
             code_paths: Sequence[str] = ()) -> tuple[bool, str | None]:
    """Start Ray locally (``address`` None) or connect to a cluster, unless Ray is already up.
    Returns (True when this call started or connected Ray, and so must shut it down; the
    dashboard's URL or None) and says on stderr where the dashboard is, or why it is off.

    Ray's INFO logs (driver and trial processes: one line per checkpoint) stay off; warnings and
    errors are shown, the trials' own output only with ``progress``.

    ``code_paths``: folders a local Ray's workers need on ``PYTHONPATH`` (the modules of the
    config's import paths; Ray itself adds only the driver's working directory). A cluster gets
    code with the job (``ray job submit --working-dir``, ``runtime_env``), not from here."""
    import ray

    if ray.is_initialized():
        return False, None
    init: dict[str, Any] = {"log_to_driver": bool(progress), "configure_logging": True,
                            "logging_level": "WARNING",
                            "runtime_env": {"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}}
    # the trial processes' Ray logger at WARNING too (Ray logs one INFO line per checkpoint)
    init["runtime_env"].setdefault("env_vars", {}).setdefault(
        "RAY_LOGGER_LEVEL", os.environ.get("RAY_LOGGER_LEVEL", "warning"))
    if address is None:
        init["include_dashboard"] = bool(dashboard)
        if code_paths:
            from granq_search.user_code import worker_pythonpath

            init["runtime_env"]["env_vars"]["PYTHONPATH"] = worker_pythonpath(code_paths)
    else:
        init["address"] = address
    try:
        context = ray.init(**init)
    except Exception as e:  # noqa: BLE001 - one line for the user
        from granq_search.tracking.uri import redact_text, redact_uri

        first = redact_text(" ".join(str(e).split()))[:300]
        where = "start Ray locally" if address is None else f"connect to the Ray cluster at {redact_uri(address)}"
        hint = "; is it running (`ray status`)?"
        if "auth" in first.lower() or "token" in first.lower():
            hint = ("; the cluster uses token authentication: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                    "(`ray get-auth-token` on the head node), see docs/cluster.md")
        raise SearchError(f"cannot {where} ({type(e).__name__}: {first}){hint}") from None
    url = _dashboard_url(context)
    if url:
        line = f"Ray dashboard: {url}"
    elif address is None:
        line = "Ray dashboard: off (pass --dashboard to start it)"
    else:
        line = "Ray dashboard: the cluster reports none (`ray start --head --include-dashboard=true` starts it)"
    print(line, file=sys.stderr, flush=True)
    return True, url


def _dashboard_url(context: Any) -> str | None:
    url = str(getattr(context, "dashboard_url", "") or "").strip()
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _dashboard_missing() -> str | None:
    """Why Ray's dashboard cannot start here (the ``ray[default]`` packages), or None."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401 - what Ray itself checks
    except ImportError as e:
        return str(e.name or e)
    return None


def _preflight(address: str | None, storage_arg: str | None, ray_storage: str, output: Path, *,
               dashboard: bool) -> None:
    """Checks that need no Ray: the cluster answers, the storage and the output folder take
    files, the dashboard can start (see :mod:`granq_search.search.preflight`)."""
    from granq_search.search.preflight import check_writable_dir, probe_ray_address

    probe_ray_address(address)
    if storage_arg is not None:
        check_writable_dir(ray_storage, "--storage-path")
    check_writable_dir(str(output), "--output-dir")
    if dashboard and address is None:
        missing = _dashboard_missing()
        if missing:
            raise SearchError(f"--dashboard needs Ray's dashboard packages ({missing} is missing): "
                              "pip install 'ray[default]', or drop --dashboard")


def _status_table(space: SearchSpace, name: str, num_samples: int, interval_s: float):
    from granq_search.search.status import StatusTable

    epochs = None if "train.epochs" in space.parameters else int(space.search_base.train.epochs)
    return StatusTable(name=name, objectives=[{"metric": o.metric, "mode": o.mode} for o in space.objectives],
                       params=list(space.parameters), num_samples=num_samples, epochs=epochs, interval_s=interval_s)


def _replace_status_table(tuner: Any, table: Any) -> None:
    """A restored Tuner brings back the status table of the run before (Ray pickles callbacks):
    swap it for this run's (or drop it with ``progress`` off)."""
    from granq_search.search.status import StatusTable

    try:
        callbacks = tuner._local_tuner.get_run_config().callbacks
    except Exception:  # noqa: BLE001 - Ray Client, or Ray's internals moved
        return
    if callbacks is None:
        return
    callbacks[:] = [cb for cb in callbacks if not isinstance(cb, StatusTable)]
    if table is not None:
        callbacks.append(table)


@contextlib.contextmanager
def _env(values: Mapping[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_TrialConfig = TrialConfig  # the recorder's builder in the tuner.pkl of a search started before it moved

