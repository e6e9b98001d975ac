"""Shared fixtures: a per-session cache for the digits teacher, the ../shared material."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    return Path(os.environ.get("GRANQ_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(scope="session", autouse=True)
def _granq_cache(tmp_path_factory):
    """Keep the digits teacher cache inside the test session, unless one is given."""
    if "GRANQ_CACHE_DIR" not in os.environ:
        os.environ["GRANQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("granq_cache"))
    yield


@pytest.fixture(autouse=True)
def _no_mlflow_env(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME must not redirect the tests' records;
    tests that need them set them with monkeypatch."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def shared():
    root = shared_root()
    if not (root / "models" / "resnet20_cifar10_optionA.th").is_file() or not (root / "data" / "cifar10" / "test").is_dir():
        pytest.skip(f"../shared (real CIFAR-10 folder and ResNet-20 checkpoint) not found at {root}; "
                    "set GRANQ_SHARED to run these tests")
    return root
