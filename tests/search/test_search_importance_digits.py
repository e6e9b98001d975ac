"""Importance on a real search of the digits space: Ray trials, the Optuna journal the searcher
wrote, ``leaderboard --importance`` and the artifacts on the MLflow parent run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from granq_search.cli.main import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_importance_of_a_real_digits_search(tmp_path, capsys):
    doc = yaml.safe_load((REPO / "search_spaces" / "digits.yaml").read_text())
    doc["base"] = "digits"
    doc["scheduler"] = {"type": "none"}  # every trial finishes: importances need finished trials
    doc["sampler"] = {"type": "random", "seed": 3}
    space = tmp_path / "digits_all.yaml"
    space.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    search = subprocess.run(
        [sys.executable, str(REPO / "tune_main.py"), "search", "--space", str(space), "--name", "imp",
         "--num-samples", "4", "--output-dir", str(runs), "--no-progress", "--format", "json",
         "--set", "train.epochs=2", "--set", "train.iters_per_epoch=4"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=220)
    assert search.returncode == 0, search.stderr[-3000:]
    assert json.loads(search.stdout)["counts"]["complete"] == 4

    capsys.readouterr()
    assert main(["leaderboard", "--output-dir", str(runs), "--search", "imp", "--importance", "--format", "json"]) == 0
    imp = json.loads(capsys.readouterr().out)["importance"]
    text = json.dumps(imp)
    searched = set(doc["parameters"])
    for objective in ("val_drop", "bitops"):
        assert objective in text
    named = {p for p in searched if p in text}
    assert len(named) >= 3, named  # the digits space's own parameters, under their dotted names

    from mlflow.tracking import MlflowClient

    from granq_search.tracking.store import find_parent

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    parent = find_parent(client, client.get_experiment_by_name("granq_search").experiment_id, "imp")
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"importance.png", "importance.json"} <= files
