"""A search's folder and its record: where things go, how ``search.json`` is read and written.

Layout of a search (``--output-dir DIR --name NAME``, docs/ARCHITECTURE.md)::

    DIR/NAME/search.json             name, space, objectives, base config, status
    DIR/NAME/ray/                    Ray Tune experiment (--storage-path P: P/NAME instead)
    DIR/NAME/optuna.journal          Optuna study (the driver is its only writer)
    DIR/NAME/scheduler_state.json    ASHA rung records
    DIR/NAME/best.yaml               exported best config
    DIR/mlflow.db                    MLflow store of every search in DIR (default --tracking-uri)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granq_search.errors import GranqError, SearchSpaceError

__all__ = ["SearchError", "SearchPaths", "default_space_dir", "resolve_space_arg", "read_search_record",
           "latest_search", "search_order", "write_record"]


class SearchError(GranqError):
    """A search that cannot start or resume as asked."""


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


def search_order(created: float | None, name: str) -> tuple[float, str]:
    """The sort key of the searches of a folder, oldest first: when the search started (its
    record's ``created``; None: 0), then its name. :func:`latest_search` is the last in this order,
    and ``granq-search searches`` (:func:`~granq_search.search.catalog.list_searches`) lists them in it."""
    return (created if created is not None else 0.0, name)


def latest_search(output_dir: Path) -> str:
    """Name of the most recently started search in ``output_dir`` (the last in :func:`search_order`)."""
    found = []
    if output_dir.is_dir():
        for rec in output_dir.glob("*/search.json"):
            try:
                created = float(json.loads(rec.read_text(encoding="utf-8")).get("created", 0))
            except (OSError, ValueError):
                created = rec.stat().st_mtime
            found.append(search_order(created, rec.parent.name))
    if not found:
        raise SearchError(f"no search to resume in '{output_dir}'; pass --name NAME and --output-dir DIR of "
                          "an earlier search")
    return max(found)[1]


def write_record(path: Path, record: Mapping[str, Any]) -> None:
    from granq_search.jsonutil import json_safe

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(dict(record)), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
