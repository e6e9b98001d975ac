"""Fixtures for the MLflow record: real SQLite stores in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def _template_db(tmp_path_factory) -> Path:
    """An empty MLflow schema, made once (creating the tables takes ~5 s; copying is instant)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "template.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, _template_db) -> str:
    """A fresh SQLite tracking URI in tmp_path/search (the default layout: DIR/mlflow.db)."""
    d = tmp_path / "search"
    d.mkdir()
    shutil.copy(_template_db, d / "mlflow.db")
    return f"sqlite:///{d / 'mlflow.db'}"
