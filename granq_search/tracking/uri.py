"""Tracking-store URIs: resolve the default, refuse file stores, probe servers, hide secrets.

Where a command records or reads (:func:`resolve_store`, the one resolution order of every
command: ``search``, ``leaderboard``, ``export`` and ``train``)
    store: ``--tracking-uri``; else the store of the search or run being resumed; else
    ``$MLFLOW_TRACKING_URI``; else a command's own fallback (``train``: the search's store named
    in an exported config); else ``sqlite:///<abs DIR>/mlflow.db`` (one store for every search
    in DIR). Experiment: ``--experiment``; else the resumed one's; else
    ``$MLFLOW_EXPERIMENT_NAME``; else the command's default (``granq_search`` for searches,
    ``granq_train`` for ``train``). The result says where each value came from.

MLflow file stores (a plain folder or a ``file:`` URI) are refused: MLflow 3 raises on them
unless ``MLFLOW_ALLOW_FILE_STORE=true``, and they do not survive concurrent writers. Clusters
use an MLflow server (``http(s)://``).

Nothing here creates a file: validation runs before any store is opened, and readers
(leaderboard, export) call :func:`require_existing_store` so that reading a store that was
never written does not create an empty database.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granq_search.errors import TrackingError
from granq_search.tracking.schema import DEFAULT_EXPERIMENT

__all__ = [
    "DEFAULT_DB_NAME",
    "ENV_TRACKING_URI",
    "ENV_EXPERIMENT",
    "TrackingStore",
    "resolve_store",
    "resolve_tracking_uri",
    "redact_uri",
    "redact_argv",
    "redact_text",
    "sqlite_path",
    "require_existing_store",
    "check_server",
]

DEFAULT_DB_NAME = "mlflow.db"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
PROBE_TIMEOUT_S = 3.0

# SQLAlchemy database URIs MLflow accepts as tracking stores (besides sqlite).
_DB_SCHEMES = ("postgresql", "mysql", "mssql")
_PASS_THROUGH = ("databricks", "databricks-uc", "uc")
_SECRET_QUERY = re.compile(r"(token|password|passwd|secret|key|sig|signature|credential)", re.I)


def redact_uri(uri: str | None) -> str:
    """``uri`` without ``user:password@`` and without secret-looking query values.

    ``https://bob:pw@host:5000/x?token=abc`` -> ``https://host:5000/x?token=***``.
    Strings that are not URIs come back unchanged.
    """
    if not uri:
        return "" if uri is None else uri
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return uri
    if not parts.scheme or "://" not in uri:
        return uri
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if parts.query else []
    secret_query = any(_SECRET_QUERY.search(k) for k, _ in pairs)
    if "@" not in parts.netloc and not secret_query:
        return uri  # nothing to hide (and sqlite:////abs/path keeps its four slashes)
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(f"{k}=***" if _SECRET_QUERY.search(k) else (f"{k}={v}" if v != "" else k) for k, v in pairs)
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with every URI redacted (``--tracking-uri``, ``--storage-path s3://...``)."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.startswith("-") and "://" in value:
            out.append(f"{key}={redact_uri(value)}")
        else:
            out.append(redact_uri(arg) if "://" in arg else arg)
    return out


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """``text`` (an error message, a log line) with every URI in it redacted (:func:`redact_uri`):
    MLflow's errors name the request URL, credentials included."""
    if not text or "://" not in text:
        return text
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), else None."""
    if not uri.startswith("sqlite:"):
        return None
    rest = uri[len("sqlite:"):]
    if not rest.startswith("///"):
        return None
    path = rest[3:].split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path) if path.startswith("/") else Path(path).resolve()


@dataclass(frozen=True)
class TrackingStore:
    """Where a command records or reads, and where each value came from."""

    tracking_uri: str
    """Resolved (absolute SQLite path, no trailing slash); not redacted."""
    experiment: str
    uri_source: str
    """``--tracking-uri``, ``MLFLOW_TRACKING_URI``, ``default``, or a caller's label (a resumed search,
    an exported config's provenance)."""
    experiment_source: str
    """``--experiment``, ``MLFLOW_EXPERIMENT_NAME``, ``default``, or a caller's label."""

    def describe(self) -> str:
        """One line for banners: ``MLflow sqlite:////abs/mlflow.db (MLFLOW_TRACKING_URI), experiment
        'x' (default)``, credentials redacted."""
        return (f"MLflow {redact_uri(self.tracking_uri)} ({self.uri_source}), "
                f"experiment '{self.experiment}' ({self.experiment_source})")


def _given(value: Any) -> str | None:
    text = "" if value is None else str(value).strip()
    return text or None


def resolve_store(tracking_uri: str | None, experiment: str | None, output_dir: str | Path, *,
                  default_experiment: str = DEFAULT_EXPERIMENT, resumed: Mapping[str, Any] | None = None,
                  resumed_source: str = "the resumed search", fallback_uri: str | None = None,
                  fallback_source: str = "fallback", check: bool = True,
                  environ: Mapping[str, str] | None = None) -> TrackingStore:
    """The store and experiment a command uses (the module docstring gives the order).

    ``resumed``: ``{"tracking_uri", "experiment"}`` of the search or run being continued (they
    come right after the flags: a resumed record keeps its store). ``fallback_uri`` comes after
    the environment. ``environ`` defaults to ``os.environ``. The URI is validated by
    :func:`resolve_tracking_uri` rules (an error names where the bad value came from). Creates
    nothing.
    """
    env = os.environ if environ is None else environ
    resumed = resumed or {}
    uri_choices = ((tracking_uri, "--tracking-uri"), (resumed.get("tracking_uri"), resumed_source),
                   (env.get(ENV_TRACKING_URI), ENV_TRACKING_URI), (fallback_uri, fallback_source))
    raw, uri_source = next(((_given(v), src) for v, src in uri_choices if _given(v)), (None, "default"))
    exp_choices = ((experiment, "--experiment"), (resumed.get("experiment"), resumed_source),
                   (env.get(ENV_EXPERIMENT), ENV_EXPERIMENT), (default_experiment, "default"))
    name, exp_source = next(((_given(v), src) for v, src in exp_choices if _given(v)),
                            (default_experiment, "default"))
    uri = _validated(raw, output_dir, check=check, source=uri_source)
    return TrackingStore(tracking_uri=uri, experiment=str(name), uri_source=uri_source,
                         experiment_source=exp_source)


def resolve_tracking_uri(uri: str | None, output_dir: str | Path, *, check: bool = True,
                         environ: Mapping[str, str] | None = None) -> str:
    """The tracking URI a command uses: ``uri``, else ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///<abs output_dir>/mlflow.db`` (:func:`resolve_store` without an experiment).

    Accepted: ``sqlite:///PATH`` (relative paths made absolute), ``http(s)://HOST``, SQLAlchemy
    database URIs (``postgresql://``, ``mysql://``, ``mssql://``) and Databricks URIs (passed
    through). Refused with :class:`TrackingError`: folders and ``file:`` URIs. With ``check`` an
    http(s) server is probed (3 s); an unreachable one is a one-line TrackingError.
    Creates nothing.
    """
    return resolve_store(uri, None, output_dir, check=check, environ=environ).tracking_uri


def _validated(uri: str | None, output_dir: str | Path, *, check: bool, source: str = "--tracking-uri") -> str:
    """``uri`` checked and normalised (``None``: the default store of ``output_dir``)."""
    if uri is None or str(uri).strip() == "":
        return f"sqlite:///{(Path(output_dir).expanduser().resolve() / DEFAULT_DB_NAME).as_posix()}"
    uri = str(uri).strip()
    given = f"{source} {redact_uri(uri)}" if source.startswith("-") else f"{redact_uri(uri)} (from {source})"
    if uri in _PASS_THROUGH:  # "databricks" alone: the default Databricks profile
        return uri
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) else ""
    if scheme == "" or scheme == "file" or len(scheme) == 1:  # len 1: a Windows drive letter
        raise TrackingError(
            f"MLflow file stores are not supported ({given}); "
            "use sqlite:///PATH (for example sqlite:///runs/search/mlflow.db) or an http:// server"
        )
    if scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            raise TrackingError(
                f"unusable SQLite tracking URI {given}; write sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db (an in-memory database would lose the record)"
            )
        if path.exists() and path.is_dir():
            raise TrackingError(f"{given} names a folder; give a database file, e.g. "
                                f"sqlite:///{(path / DEFAULT_DB_NAME).as_posix()}")
        query = uri.split("?", 1)[1] if "?" in uri else ""
        return f"sqlite:///{path.as_posix()}" + (f"?{query}" if query else "")
    if scheme in ("http", "https"):
        if check:
            check_server(uri)
        return uri.rstrip("/")
    if scheme.split("+", 1)[0] in _DB_SCHEMES or scheme in _PASS_THROUGH:
        return uri
    raise TrackingError(
        f"unsupported tracking URI scheme '{scheme}:' in {given}; "
        "use sqlite:///PATH or an http:// MLflow server"
    )


def _request(url: str, timeout: float) -> int:
    """GET ``url``; the HTTP status (raises URLError/OSError when nothing answers)."""
    parts = urllib.parse.urlsplit(url)
    headers = {}
    if parts.username is not None:
        cred = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        url = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, parts.fragment))
    req = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            return resp.status
    except urllib.error.HTTPError as e:  # the server answered
        return e.code


def check_server(uri: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise a one-line TrackingError unless an MLflow server answers at ``uri``."""
    base = uri.rstrip("/")
    shown = redact_uri(base)
    hint = (f"start it with `mlflow server --host 127.0.0.1 --port PORT --backend-store-uri "
            f"sqlite:///PATH/mlflow.db` or pass --tracking-uri")
    try:
        status = _request(base + "/health", timeout)
        if status == 404:  # served under a proxy without /health: try the REST API
            status = _request(base + "/api/2.0/mlflow/experiments/search?max_results=1", timeout)
    except (urllib.error.URLError, OSError, socket.timeout, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"cannot reach MLflow tracking server at {shown} ({reason}); {hint}") from None
    if status == 404:
        raise TrackingError(f"{shown} answers but is not an MLflow tracking server (HTTP 404); {hint}")
    if status >= 500:
        raise TrackingError(f"MLflow tracking server at {shown} is not healthy (HTTP {status}); "
                            "check the server's log or pass another --tracking-uri")


def server_reachable(uri: str, timeout: float = 1.0) -> bool:
    """Quick probe used between writes; True for non-http stores."""
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        check_server(uri, timeout)
        return True
    except TrackingError:
        return False


def require_existing_store(uri: str, output_dir: str | Path | None = None) -> None:
    """For readers: a ``sqlite:///`` store must already exist (opening it would create it)."""
    path = sqlite_path(uri)
    if path is None:
        return
    if not path.is_file():
        where = Path(output_dir) if output_dir is not None and path.parent == Path(output_dir).resolve() \
            else path.parent
        raise TrackingError(f"no searches recorded in {where} (no {path.name} there); "
                            "run `granq-search` first, or pass --output-dir/--tracking-uri")
