"""Your own code, named in a config by import path: ``MODULE:CALLABLE``.

``model.name`` and ``data.dataset`` take either a built-in name (``digits_cnn``, ``cifar10``) or
an import path such as ``mymodels:small_cnn`` or ``mypkg.data:build`` (a module importable with
``import``, a colon, then an attribute of it, dots allowed: ``mypkg.zoo:Nets.small``).

Where the module is looked up: ``sys.path`` as usual (``PYTHONPATH``, installed packages), then the
current directory, as ``python -m`` would (so ``granq-search train`` run from the folder holding
``mymodels.py`` finds it). Ray workers of a local search get the folders of these modules on their
``PYTHONPATH`` (:func:`code_roots`, :func:`worker_pythonpath`); on a cluster the code travels with
the job (``ray job submit --working-dir DIR`` or ``runtime_env={"py_modules": [...]}``).

Nothing here imports torch; every failure is a one-line :class:`ConfigError` naming the path.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import site
import sys
import sysconfig
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from granq_search.errors import ConfigError

__all__ = ["IMPORT_PATH", "is_import_path", "resolve_callable", "accepts_keyword", "call_with_accepted",
           "code_roots", "worker_pythonpath", "first_line"]

IMPORT_PATH = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
"""``package.module:attribute`` (the attribute may be dotted: ``module:Class.method``)."""


def is_import_path(text: object) -> bool:
    """True when ``text`` has the form ``MODULE:CALLABLE`` (a colon marks an import path)."""
    return isinstance(text, str) and ":" in text


def _parts(spec: str, field: str) -> tuple[str, str]:
    m = IMPORT_PATH.match(spec)
    if m is None:
        raise ConfigError(f"'{spec}' is not an import path; write MODULE:CALLABLE, for example "
                          "mymodels:small_cnn or mypkg.data:build", field=field)
    return m.group("module"), m.group("attr")


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (at most 200 characters of it), for one-line errors."""
    text = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _import(module: str) -> Any:
    """``importlib.import_module``; on a top-level module that is not found, also the current
    directory (appended to ``sys.path``, as ``python -m`` has it first)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        cwd = os.getcwd()
        on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
        if err.name != top or cwd in on_path:
            raise
        here = Path(cwd)
        if not ((here / f"{top}.py").is_file() or (here / top / "__init__.py").is_file()):
            raise
        sys.path.append(cwd)
        return importlib.import_module(module)


def resolve_callable(spec: str, *, field: str) -> Callable[..., Any]:
    """The callable named by ``spec`` (``MODULE:CALLABLE``), imported now.

    Raises :class:`ConfigError` (one line, prefixed with ``field``) when the path is malformed,
    the module cannot be imported, the attribute is missing or is not callable.
    """
    module_name, attr = _parts(spec, field)
    try:
        module = _import(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        if missing == module_name or module_name.startswith(missing + "."):
            top = module_name.split(".")[0]
            raise ConfigError(f"cannot import '{module_name}' for '{spec}' (no module named '{missing}'); put the "
                              f"folder holding {top}.py or the {top}/ package on PYTHONPATH, or run from that folder",
                              field=field) from None
        raise ConfigError(f"importing '{module_name}' for '{spec}' failed: it imports '{missing}', which is not "
                          "installed; install it", field=field) from None
    except Exception as err:  # noqa: BLE001 - the user's module raised while importing
        raise ConfigError(f"importing '{module_name}' for '{spec}' failed ({first_line(err)}); fix that module",
                          field=field) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            tip = f" (callables there: {shown})" if names else ""
            raise ConfigError(f"module '{module_name}' has no attribute '{attr}'{tip}; check '{spec}'", field=field)
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"'{spec}' is a {type(obj).__name__}, not a function or class; name a callable",
                          field=field)
    return obj


def _keyword_names(fn: Callable[..., Any]) -> tuple[Mapping[str, inspect.Parameter], frozenset[str] | None]:
    """(``fn``'s parameters, the names it accepts by keyword, or None when it takes ``**kwargs``).
    Raises ``TypeError`` / ``ValueError`` for a callable without a signature (some builtins)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return params, None
    return params, frozenset(n for n, p in params.items()
                             if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


def accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """True when ``fn`` can be called with the keyword argument ``name`` (or has no signature)."""
    try:
        _, accepted = _keyword_names(fn)
    except (TypeError, ValueError):
        return True
    return accepted is None or name in accepted


def call_with_accepted(fn: Callable[..., Any], offered: Mapping[str, Any], *, spec: str, field: str) -> Any:
    """Call ``fn`` with the keyword arguments of ``offered`` that it declares (all of them when it
    takes ``**kwargs``). A required parameter that is not offered is a :class:`ConfigError`."""
    try:
        params, accepted = _keyword_names(fn)
    except (TypeError, ValueError):  # builtins without a signature: offer nothing
        return fn()
    if accepted is None:
        return fn(**offered)
    kwargs = {k: v for k, v in offered.items() if k in accepted}
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if missing:
        raise ConfigError(f"'{spec}' requires argument(s) {', '.join(missing)} that granq_search does not pass; "
                          f"it passes {', '.join(offered)} by keyword: give the others default values", field=field)
    return fn(**kwargs)


def _system_dirs() -> list[str]:
    """The standard library and site-packages folders (modules there need no PYTHONPATH)."""
    dirs = {v for k, v in sysconfig.get_paths().items() if k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - old virtualenvs without these functions
        pass
    return [os.path.realpath(d) for d in dirs if d and os.path.realpath(d) != os.path.realpath(os.sep)]


def code_roots(specs: Iterable[object]) -> list[str]:
    """The folders that must be on ``sys.path`` for the modules of the import paths in ``specs``
    (other values are skipped) to import: for ``mypkg.data:build`` the folder holding ``mypkg/``.
    Modules of the Python installation itself (site-packages) need nothing and are left out. The
    modules are imported here (a bad path raises :class:`ConfigError`)."""
    roots: list[str] = []
    system = _system_dirs()
    for spec in specs:
        if not is_import_path(spec):
            continue
        resolve_callable(str(spec), field="import path")  # the path is well-formed from here on
        top = str(spec).split(":", 1)[0].split(".")[0]
        module = sys.modules.get(top)
        file = getattr(module, "__file__", None)
        if not file:
            continue  # a namespace package or a built-in module: nothing to add
        path = Path(file).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
        real = os.path.realpath(root)
        if any(real == d or real.startswith(d + os.sep) for d in system) or str(root) in roots:
            continue
        roots.append(str(root))
    return roots


def worker_pythonpath(roots: Iterable[str], current: str | None = None) -> str:
    """``PYTHONPATH`` for Ray workers: ``roots`` first, then the entries of ``current`` (default:
    this process's ``PYTHONPATH``) made absolute, without duplicates."""
    current = os.environ.get("PYTHONPATH", "") if current is None else current
    out: list[str] = []
    for entry in [*roots, *current.split(os.pathsep)]:
        if entry:
            absolute = os.path.abspath(entry)
            if absolute not in out:
                out.append(absolute)
    return os.pathsep.join(out)
