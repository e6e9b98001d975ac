"""Before a search starts: every check a user can fail, then the frozen :class:`SearchPlan`.

:func:`validate` checks the arguments, the space (file, overrides), the numbers, the name (a
collision, or a missing search to resume, whose record then fixes the space, the sample counts
and the storage), the address, the tracking URI and experiment, and runs the checks of
:mod:`~granq_search.search.preflight` (the cluster at ``address`` answers, ``--storage-path`` and
``--output-dir`` take files: seconds, not minutes of Ray retries). :func:`plan_teacher` adds the
teacher (its weights, and locally its measures, which also check the data). Nothing is created
and Ray is not started before both have passed; the driver (:mod:`~granq_search.search.runner`)
then launches the plan as it is.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from granq_search.config import ExperimentConfig, get_path, with_overrides
from granq_search.search.layout import SearchError, SearchPaths, latest_search, read_search_record, resolve_space_arg
from granq_search.search.preflight import URI_SCHEME, parse_ray_address
from granq_search.search.space import SearchSpace, load_space, space_from_record, space_record_text

__all__ = ["SearchPlan", "validate", "plan_teacher"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class SearchPlan:
    """Everything decided before a search is launched."""

    name: str
    paths: SearchPaths
    space: SearchSpace
    resume: bool
    record: Mapping[str, Any]
    """The resumed search's record as read ({} for a new search)."""
    num_samples: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    address: str | None
    storage_arg: str | None
    """``--storage-path`` as given (a resumed search: as first given)."""
    ray_storage: str
    ray_name: str
    tracking_uri: str | None
    """The MLflow store (None without tracking)."""
    experiment: str | None
    """The MLflow experiment (None without tracking)."""
    trial_base: ExperimentConfig
    """The space's search base with data/checkpoint paths made absolute."""
    progress: bool
    tracking: bool
    dashboard: bool
    status_interval_s: float
    space_text: str | None = None
    """The space as the MLflow parent run records it (:func:`~granq_search.search.space.space_record_text`;
    None without tracking): made here, so that a space too large to record fails before anything starts."""
    teacher_state: Mapping[str, Any] = field(default_factory=dict)
    teacher_sha: str | None = None
    teacher_source: str = ""
    teacher_metrics: dict[str, Any] | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    @property
    def ray_path(self) -> str:
        return f"{self.ray_storage}/{self.ray_name}"


def validate(
    space: str | Path | SearchSpace | None,
    *,
    name: str | None,
    output_dir: str | Path,
    num_samples: int | None,
    max_concurrent: int | None,
    cpus_per_trial: float,
    gpus_per_trial: float,
    address: str | None,
    storage_path: str | None,
    tracking_uri: str | None,
    experiment: str | None,
    resume: bool,
    set_overrides: Mapping[str, Any] | None,
    progress: bool,
    tracking: bool,
    dashboard: bool,
    status_interval_s: float,
) -> SearchPlan:
    """The arguments of :func:`~granq_search.search.runner.run_search` checked and decided, the
    teacher not yet loaded (:func:`plan_teacher`). Raises :class:`SearchError` (or the space's and
    the tracking store's own errors) and creates nothing."""
    output = Path(output_dir).expanduser().resolve()
    parse_ray_address(address)  # the address's form only: the cluster is probed in _preflight
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
    space_text = space_record_text(the_space) if tracking else None
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
    if resume and tracking and record.get("tracking_uri") and uri != record["tracking_uri"]:
        # the MLflow callback restored from Ray's tuner.pkl keeps writing to the first store
        raise SearchError(f"search '{name}' is recorded at {redact_uri(record['tracking_uri'])}; a resumed search "
                          "keeps its tracking store: drop --tracking-uri")
    if store is not None and progress:
        print(f"search {name}: {store.describe()}", file=sys.stderr)
    if resume:
        from ray.tune import Tuner

        if not Tuner.can_restore(ray_path):
            raise SearchError(f"search '{name}' has no Ray experiment state at {ray_path} to resume")

    return SearchPlan(
        name=name, paths=paths, space=the_space, resume=resume, record=record, num_samples=num_samples,
        max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
        address=address, storage_arg=storage_arg, ray_storage=ray_storage, ray_name=ray_name,
        tracking_uri=uri, experiment=store.experiment if store is not None else None,
        trial_base=_abs_paths(the_space.search_base, local=address is None), progress=progress,
        tracking=tracking, dashboard=dashboard, status_interval_s=status_interval_s, space_text=space_text,
    )


def plan_teacher(plan: SearchPlan) -> SearchPlan:
    """The plan with its teacher: the weights (CPU tensors, for the object store), their sha256
    and source, and its measures (kept from the resumed search's record, else measured here with
    a local Ray: none on a cluster)."""
    teacher_state, teacher_sha, teacher_source = _teacher(plan.trial_base)
    teacher_metrics = plan.record.get("teacher_metrics") if plan.resume else None
    if plan.local and teacher_metrics is None:
        from granq_search.search.trainable import threads_for_cpus

        threads = threads_for_cpus(plan.cpus_per_trial) if not plan.gpus_per_trial else None
        teacher_metrics = _measure_teacher(plan.trial_base, teacher_state, teacher_sha, threads=threads)
    return replace(plan, teacher_state=teacher_state, teacher_sha=teacher_sha, teacher_source=teacher_source,
                   teacher_metrics=teacher_metrics)


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
        if isinstance(value, str) and value and not URI_SCHEME.match(value) and not os.path.isabs(value):
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


def _storage(storage_path: str | None, paths: SearchPaths) -> tuple[str, str]:
    """(Ray storage_path, experiment name)."""
    if storage_path is None:
        return str(paths.root), "ray"
    if URI_SCHEME.match(storage_path):
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
