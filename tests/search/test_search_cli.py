"""``python tune_main.py search``: one-line user errors before anything is created, the JSON
output, and a driver killed with SIGKILL then resumed with ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from granq_search.cli.main import _normalise, main
from granq_search.search.runner import default_space_dir, resolve_space_arg

REPO = Path(__file__).resolve().parents[2]
TINY_SET = ["--set", "train.epochs=2", "--set", "train.iters_per_epoch=2"]


@pytest.fixture
def good_space(tmp_path) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": {"train.epochs": 2, "train.iters_per_epoch": 2},
        "objectives": [{"metric": "val_drop", "mode": "min"}],
        "parameters": {"quant.act.threshold": {"type": "float", "low": 0.0, "high": 1.0}},
        "scheduler": {"type": "none"}}))
    return p


def test_default_command_and_space():
    assert _normalise([]) == ["search"] and _normalise(["--num-samples", "3"])[:1] == ["search"]
    assert resolve_space_arg(None) == default_space_dir() / "digits.yaml" == REPO / "search_spaces" / "digits.yaml"
    assert resolve_space_arg("cifar10_resnet20").name == "cifar10_resnet20.yaml"


@pytest.mark.parametrize("extra, words", [
    (["--space", "nosuchspace"], "no search space named 'nosuchspace'"),
    (["--space", "missing.yaml"], "does not exist"),
    (["--set", "quant.act.bitz=3"], "--set quant.act.bitz"),
    (["--set", "train.warmup_epochs=7"], "the config rejects it"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--max-concurrent", "0"], "--max-concurrent must be >= 1"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial"),
    (["--tracking-uri", "file:///tmp/mlruns"], "file stores are not supported"),
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach MLflow tracking server"),
    (["--address", "not an address"], "is not a Ray address"),
    (["--name", "a/b"], "--name"),
    (["--name", "taken"], "already exists"),
    (["--resume", "--name", "ghost"], "no search 'ghost'"),
    (["--resume", "--name", "taken"], "no search 'taken'"),
])
def test_user_errors_are_one_line_and_create_nothing(tmp_path, capsys, good_space, extra, words):
    runs = tmp_path / "runs"
    (runs / "taken").mkdir(parents=True)
    args = ["search", "--output-dir", str(runs)]
    if "--resume" not in extra and "--space" not in extra:
        args += ["--space", str(good_space)]
    rc = main(args + extra)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err, err
    assert sorted(p.name for p in runs.iterdir()) == ["taken"]  # nothing created, no Ray started


def test_bad_space_file_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: digits\nobjectives: [{metric: test_top1, mode: max}]\n"
                   "parameters: {quant.act.bits: {type: categorical, choices: [3, 4]}}\n")
    assert main(["search", "--space", str(bad), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "objectives[0].metric" in err and "validation" in err
    assert not (tmp_path / "runs").exists()


def test_resume_without_any_search(tmp_path, capsys):
    assert main(["search", "--resume", "--output-dir", str(tmp_path / "empty")]) == 2
    assert "no search to resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- subprocess drivers


def _env():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tree(root: int) -> set[int]:
    from raycluster import _tree as tree

    return tree(root)


def _kill_leftovers(pids: set[int]) -> None:
    time.sleep(2.0)
    for pid in pids:
        try:
            if b"ray" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.mark.slow
def test_cli_json_output_is_one_document(tmp_path):
    """The shipped default space at a tiny budget: stdout is exactly one JSON document."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(REPO / "tune_main.py"), "search", "--num-samples", "2", "--name", "j",
           "--output-dir", str(runs), "--format", "json", *TINY_SET]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "finished" and doc["num_trials"] == 2 and doc["counts"]["running"] == 0
    assert doc["objectives"] == [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]
    best = yaml.safe_load(Path(doc["best_config"]).read_text())
    assert best["train"]["epochs"] == 8  # production budget, not the search's 2
    record = json.loads((runs / "j" / "search.json").read_text())
    assert record["space_file"].endswith("search_spaces/digits.yaml") and record["status"] == "finished"


@pytest.mark.slow
def test_driver_killed_then_resumed(tmp_path):
    """SIGKILL the driver once a trial is complete; --resume keeps completed trials and finishes."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    runs = tmp_path / "runs"
    base = [sys.executable, str(REPO / "tune_main.py"), "search", "--name", "k", "--output-dir", str(runs)]
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(base + ["--num-samples", "4", "--max-concurrent", "2", "--no-progress",
                                      "--set", "train.epochs=4", "--set", "train.iters_per_epoch=3"],
                              stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path)
    journal = runs / "k" / "optuna.journal"
    seen: set[int] = set()
    complete: list = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and driver.poll() is None:
            seen |= _tree(driver.pid)
            if journal.is_file():
                storage = JournalStorage(JournalFileBackend(str(journal)))
                trials = storage.get_all_trials(storage.get_study_id_from_name("k"))
                complete = [t for t in trials if t.state == TrialState.COMPLETE]
                if complete and any(t.state == TrialState.RUNNING for t in trials):
                    break
            time.sleep(0.5)
        assert driver.poll() is None and complete, (tmp_path / "driver.log").read_text()[-3000:]
        seen |= _tree(driver.pid)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(timeout=30)
        _kill_leftovers(seen)
        log.close()
    done_ids = {t.user_attrs["ray_trial_id"] for t in complete}
    ray_dir = runs / "k" / "ray"
    lines_before = {d.name: (d / "result.json").read_text() for d in ray_dir.glob("train_trial_*")
                    if any(i in d.name for i in done_ids)}
    assert len(lines_before) == len(done_ids) >= 1

    r = subprocess.run(base + ["--resume", "--format", "json"], capture_output=True, text=True, env=_env(),
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "finished" and doc["num_trials"] == 4 and doc["counts"]["running"] == 0
    for name, text in lines_before.items():  # completed trials were not trained again
        now = (ray_dir / name / "result.json").read_text()
        assert now.startswith(text)
        added = [json.loads(line) for line in now[len(text):].splitlines() if line.strip()]
        # Ray's last snapshot before the SIGKILL may predate a trial's end: Ray restarts it, and the
        # trainable replays the recorded final report instead of training
        assert all(r.get("replayed") == 1.0 and r["final"] == 1.0 for r in added), added
    # every trial has its outcome in Optuna; those the killed driver had started after Ray's last
    # snapshot (Ray does not know them; their folders stay) are closed as lost, the 4 others ended
    storage = JournalStorage(JournalFileBackend(str(journal)))
    trials = storage.get_all_trials(storage.get_study_id_from_name("k"))
    outcome = {t.user_attrs["ray_trial_id"]: t for t in trials if "ray_trial_id" in t.user_attrs}
    folders = {d.name.split("_")[2] for d in ray_dir.glob("train_trial_*")}
    assert folders <= set(outcome)
    lost = {rid for rid, t in outcome.items() if t.user_attrs.get("failure_reason") == "lost when the driver stopped"}
    ended = set(outcome) - lost
    assert len(ended) == 4 and all(outcome[r].state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                                   for r in ended)
    record = json.loads((runs / "k" / "search.json").read_text())
    assert record["resumes"] == 1 and record["status"] == "finished"
