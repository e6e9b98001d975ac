"""Tracking URIs: defaults, refusals, fast failure on a dead server, redaction."""

from __future__ import annotations

import socket
import time

import pytest

from granq_search.errors import TrackingError
from granq_search.tracking.uri import (
    redact_argv,
    redact_uri,
    require_existing_store,
    resolve_store,
    resolve_tracking_uri,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_is_sqlite_in_the_output_dir_and_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "runs/search") == f"sqlite:///{tmp_path}/runs/search/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel/x.db", "ignored") == f"sqlite:///{tmp_path}/rel/x.db"
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/a.db", ".") == f"sqlite:///{tmp_path}/a.db"
    assert resolve_tracking_uri("postgresql://u:p@db/mlflow", ".") == "postgresql://u:p@db/mlflow"
    assert resolve_tracking_uri("databricks", ".") == "databricks"
    assert list(tmp_path.iterdir()) == []


def test_resolution_order_flag_then_environment_then_default(tmp_path, monkeypatch):
    default = f"sqlite:///{tmp_path}/runs/mlflow.db"
    env_db, flag_db = f"sqlite:///{tmp_path}/env.db", f"sqlite:///{tmp_path}/flag.db"
    store = resolve_store(None, None, tmp_path / "runs")
    assert (store.tracking_uri, store.uri_source, store.experiment, store.experiment_source) == \
        (default, "default", "granq_search", "default")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_db)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team_x")
    store = resolve_store(None, None, tmp_path / "runs")
    assert (store.tracking_uri, store.uri_source) == (env_db, "MLFLOW_TRACKING_URI")
    assert (store.experiment, store.experiment_source) == ("team_x", "MLFLOW_EXPERIMENT_NAME")
    assert resolve_tracking_uri(None, tmp_path / "runs") == env_db  # the same order for the plain function
    assert store.describe() == f"MLflow {env_db} (MLFLOW_TRACKING_URI), experiment 'team_x' (MLFLOW_EXPERIMENT_NAME)"

    store = resolve_store(flag_db, "mine", tmp_path / "runs")  # flags beat the environment
    assert (store.tracking_uri, store.uri_source, store.experiment, store.experiment_source) == \
        (flag_db, "--tracking-uri", "mine", "--experiment")
    # a resumed record beats the environment; a command's own fallback comes after it
    kept = {"tracking_uri": flag_db, "experiment": "kept"}
    store = resolve_store(None, None, tmp_path, resumed=kept, resumed_source="search.json")
    assert (store.tracking_uri, store.experiment, store.uri_source) == (flag_db, "kept", "search.json")
    store = resolve_store(None, None, tmp_path, fallback_uri=flag_db, fallback_source="provenance",
                          default_experiment="granq_train")
    assert (store.tracking_uri, store.experiment) == (env_db, "team_x")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")  # blank: not set
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    store = resolve_store(None, None, tmp_path, fallback_uri=flag_db, fallback_source="provenance",
                          default_experiment="granq_train")
    assert (store.tracking_uri, store.uri_source, store.experiment) == (flag_db, "provenance", "granq_train")
    assert list(tmp_path.iterdir()) == []  # resolving creates nothing


def test_a_bad_store_in_the_environment_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "mlruns"))
    with pytest.raises(TrackingError, match=r"file stores are not supported \(.*mlruns \(from MLFLOW_TRACKING_URI\)\)"):
        resolve_store(None, None, tmp_path)
    assert resolve_store(f"sqlite:///{tmp_path}/ok.db", None, tmp_path).uri_source == "--tracking-uri"


@pytest.mark.parametrize("uri", ["runs/mlruns", "/abs/mlruns", "file:///tmp/mlruns", "./mlruns"])
def test_file_stores_are_refused(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrackingError, match=r"MLflow file stores are not supported .* use sqlite:///PATH"):
        resolve_tracking_uri(uri, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_other_bad_uris(tmp_path):
    with pytest.raises(TrackingError, match="unsupported tracking URI scheme 'ftp:'"):
        resolve_tracking_uri("ftp://host/x", tmp_path)
    with pytest.raises(TrackingError, match="in-memory"):
        resolve_tracking_uri("sqlite:///:memory:", tmp_path)
    with pytest.raises(TrackingError, match="names a folder"):
        resolve_tracking_uri(f"sqlite:///{tmp_path}", tmp_path)


def test_unreachable_server_fails_fast_with_one_line(tmp_path):
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as info:
        resolve_tracking_uri(f"http://bob:pw@127.0.0.1:{port}", tmp_path)
    assert time.monotonic() - t0 < 4.0
    msg = str(info.value)
    assert msg.startswith(f"cannot reach MLflow tracking server at http://127.0.0.1:{port} (")
    assert "mlflow server --host 127.0.0.1" in msg and "--tracking-uri" in msg
    assert "\n" not in msg and "pw" not in msg and "bob" not in msg
    assert resolve_tracking_uri(f"http://127.0.0.1:{port}", tmp_path, check=False) == f"http://127.0.0.1:{port}"


def test_redaction():
    assert redact_uri("https://alice:s3cret@host:5000/path?x=1") == "https://host:5000/path?x=1"
    assert redact_uri("http://host:5000") == "http://host:5000"
    assert redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert redact_uri("postgresql://u:pw@db:5432/m") == "postgresql://db:5432/m"
    assert redact_uri("https://h/x?token=abc&run=2") == "https://h/x?token=***&run=2"
    assert redact_uri(None) == "" and redact_uri("not a uri") == "not a uri"
    argv = ["tune_main.py", "--tracking-uri", "http://u:p@h:1", "--tracking-uri=https://u:p@h:2", "--name", "s"]
    assert redact_argv(argv) == ["tune_main.py", "--tracking-uri", "http://h:1", "--tracking-uri=https://h:2",
                                 "--name", "s"]


def test_readers_need_an_existing_store(tmp_path):
    with pytest.raises(TrackingError, match=f"no searches recorded in {tmp_path / 'd'}"):
        require_existing_store(f"sqlite:///{tmp_path / 'd' / 'mlflow.db'}", tmp_path / "d")
    require_existing_store("http://h:5000")  # servers are probed elsewhere
    assert list(tmp_path.iterdir()) == []
