"""examples/custom_model end to end: a user's own model (``model.name: mymodels:small_cnn``) and
data (``data.dataset: mydata:digits_eval``) through the Python API (``train``, ``quantize``,
``run_search``) and the CLI (``granq-search train`` and a real 2-trial ``search``), as a user runs
them: from the example's folder, or with the folder only on the Python path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import granq_search
from granq_search.pipeline.evaluation import evaluate
from granq_search.quant import site_report

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "custom_model"
TINY = {"train.epochs": 2, "train.warmup_epochs": 1, "train.iters_per_epoch": 2, "train.batch_size": 16}
TINY_SET = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
TEACHER_EPOCHS = 6


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """A copy of the example folder, its teacher trained by its own script (a shorter recipe), and
    the folder on this process's ``sys.path`` (as a notebook next to the code would have it)."""
    root = tmp_path_factory.mktemp("custom_model")
    for f in EXAMPLE.iterdir():
        if f.suffix in (".py", ".yaml", ".md"):
            shutil.copy(f, root / f.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        for name in ("mymodels", "mydata", "train_teacher"):
            sys.modules.pop(name, None)
        import train_teacher

        train_teacher.main(["--epochs", str(TEACHER_EPOCHS), "--output", str(root / "small_cnn.pt")])
        yield root
    for name in ("mymodels", "mydata", "train_teacher"):
        sys.modules.pop(name, None)


def _env() -> dict[str, str]:
    """A user's shell: no PYTHONPATH pointing at the example, no Ray cluster."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _cli() -> list[str]:
    script = Path(sys.executable).with_name("granq-search")
    if not script.is_file():
        pytest.skip(f"the console script {script} is not installed (pip install -e .)")
    return [str(script)]


def test_api_train_runs_the_example(example, monkeypatch):
    monkeypatch.chdir(example)  # config.yaml names small_cnn.pt relative to the working directory
    result = granq_search.train("config.yaml", overrides=TINY)
    m = result.metrics
    assert m["teacher_val_top1"] > 85.0 and m["teacher_test_top1"] > 85.0  # the user's trained teacher
    assert len(m["history"]) == 2 and m["epochs_run"] == 2
    assert 0.0 <= m["best_val_top1"] <= 100.0 and m["bitops"] < m["bitops_fp"]
    sites = site_report(result.best_student)
    assert len(sites) == 3 and {s["bits"] for s in sites} == {4}  # the three ReLUs of SmallCNN


def test_quantize_the_example_model(example):
    import mydata
    import mymodels

    model = mymodels.small_cnn()
    model.load_state_dict(torch.load(example / "small_cnn.pt", weights_only=True))
    model.eval()
    loader = torch.utils.data.DataLoader(mydata.digits_eval(mymodels.MEAN, mymodels.STD), batch_size=128)
    fp = evaluate(model, loader, "cpu")["top1"]
    w8a8 = granq_search.quantize(model, {"weight": {"bits": 8}, "act": {"bits": 8, "range_mode": "static"}},
                                 example_input=torch.zeros(1, 1, 8, 8), calibration_data=loader)
    assert all(s["calibrated"] for s in site_report(w8a8))
    assert abs(evaluate(w8a8, loader, "cpu")["top1"] - fp) <= 1.0
    w3a3 = granq_search.quantize(model, {"weight": {"bits": 3}, "act": {"bits": 3}})
    assert evaluate(w3a3, loader, "cpu")["top1"] < fp  # the student that QAT has to repair
    assert evaluate(model, loader, "cpu")["top1"] == fp  # the model itself is untouched


@pytest.mark.slow
def test_cli_train_from_the_example_folder(example, tmp_path):
    """``granq-search train`` run from the folder (a console script: the folder is not on its
    sys.path), no tracking; the run folder then loads back with ``load_student``."""
    out = tmp_path / "run"
    cmd = [*_cli(), "train", "--config", "config.yaml", "--output-dir", str(out), "--no-tracking",
           "--no-progress", "--format", "json", *TINY_SET]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout)
    assert final["data"]["dataset"] == "mydata:digits_eval" and final["data"]["splits"] == "seeded"
    assert final["data"]["n_val"] + final["data"]["n_test"] == final["data"]["n_total"] == 719
    assert final["teacher_val_top1"] > 85.0 and final["checkpoint_sha256"]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["name"] == "mymodels:small_cnn" and saved["model"]["mean"] == [0.3053]
    import mydata

    student = granq_search.load_student(out)  # rebuilt from config.yaml: mymodels is importable here
    loader = torch.utils.data.DataLoader(mydata.digits_eval((0.3053,), (0.3760,)), batch_size=256)
    # the whole dataset is the union of the two splits: the run's own figures, weighted by size
    n_val, n_test = final["data"]["n_val"], final["data"]["n_test"]
    recorded = (n_val * final["best_val_top1"] + n_test * final["best_test_top1"]) / (n_val + n_test)
    assert evaluate(student, loader, "cpu")["top1"] == pytest.approx(recorded, abs=0.1)


@pytest.mark.slow
def test_cli_search_from_the_example_folder(example, tmp_path):
    """A real 2-trial search of the example's space, from its folder: Ray trials import mymodels."""
    runs = tmp_path / "runs"
    cmd = [*_cli(), "search", "--space", "space.yaml", "--num-samples", "2", "--max-concurrent", "2",
           "--name", "example", "--output-dir", str(runs), "--no-progress", "--format", "json", *TINY_SET]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=example, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "finished" and doc["num_trials"] == 2, doc
    assert doc["counts"]["fail"] == 0 and doc["counts"]["complete"] >= 1, doc["counts"]
    best = yaml.safe_load(Path(doc["best_config"]).read_text())
    assert best["model"]["name"] == "mymodels:small_cnn" and best["data"]["dataset"] == "mydata:digits_eval"
    assert best["model"]["checkpoint"] == "small_cnn.pt"  # as config.yaml has it: train runs from the folder
    assert best["train"]["epochs"] == 8  # the production budget of config.yaml


@pytest.mark.slow
def test_api_search_with_the_folder_only_on_sys_path(example, tmp_path, monkeypatch):
    """The example folder is on this process's sys.path only (not PYTHONPATH, not the working
    directory, which Ray gives its workers): the search hands it to the local Ray workers."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    outcome = granq_search.run_search(
        example / "space.yaml", overrides={**TINY, "model.checkpoint": str(example / "small_cnn.pt")},
        name="api", output_dir=tmp_path / "runs", num_samples=1, max_concurrent=1, progress=False)
    assert outcome.status == "finished" and outcome.num_trials == 1
    assert outcome.counts["complete"] == 1 and outcome.counts["fail"] == 0, outcome.counts
    assert outcome.best_config and Path(outcome.best_config).is_file()
