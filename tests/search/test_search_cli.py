"""``python tune_main.py search``: one-line user errors before anything is created and the JSON
output. (A driver killed with SIGKILL then resumed with ``--resume``:
tests/reliability/test_reliability_driver.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    # the local Ray's dashboard is off by default and a line says so; no Ray progress output
    assert "Ray dashboard: off (pass --dashboard to start it)" in r.stderr and doc["dashboard_url"] is None
    assert "Trial status:" not in r.stderr and "Checkpoint successfully created" not in r.stderr
    assert doc["objectives"] == [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]
    best = yaml.safe_load(Path(doc["best_config"]).read_text())
    assert best["train"]["epochs"] == 8  # production budget, not the search's 2
    record = json.loads((runs / "j" / "search.json").read_text())
    assert record["space_file"].endswith("search_spaces/digits.yaml") and record["status"] == "finished"


# --------------------------------------------------------------------------- fail fast, before Ray


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_fails_in_seconds(tmp_path, capsys, good_space, monkeypatch):
    import time

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.time()
    rc = main(["search", "--space", str(good_space), "--output-dir", str(tmp_path / "runs"), "--address", address])
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - t0 < 30
    assert err.startswith(f"error: cannot reach the Ray cluster at {address}: connection refused") and \
        err.count("\n") == 1, err
    assert "ray start --head" in err
    assert not (tmp_path / "runs").exists()


def test_unwritable_storage_path_fails_before_ray(tmp_path, capsys, good_space):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    rc = main(["search", "--space", str(good_space), "--output-dir", str(tmp_path / "runs"),
               "--storage-path", str(blocker / "ray")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--storage-path {blocker}/ray cannot be created: {blocker} is a file" in err
    assert not (tmp_path / "runs").exists()
    rc = main(["search", "--space", str(good_space), "--output-dir", str(blocker)])
    assert rc == 2 and f"--output-dir {blocker} is a file" in capsys.readouterr().err


def test_dashboard_without_its_packages(tmp_path, capsys, good_space):
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("ray[default] is installed: the dashboard can start")
    rc = main(["search", "--space", str(good_space), "--output-dir", str(tmp_path / "runs"), "--dashboard"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "pip install 'ray[default]'" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_cli_unreachable_cluster_exits_2_without_traceback(tmp_path):
    """The installed command as a user runs it: one line, exit 2, well within 30 s (Ray would
    retry for minutes)."""
    import time

    address = f"127.0.0.1:{_closed_port()}"
    t0 = time.time()
    r = subprocess.run([sys.executable, str(REPO / "tune_main.py"), "search", "--address", address, "--output-dir",
                        str(tmp_path / "runs")], capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60)
    took = time.time() - t0
    assert r.returncode == 2 and took < 30, (took, r.stderr[-2000:])
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and address in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_a_space_too_large_to_record_fails_before_any_folder(tmp_path, capsys, good_space, monkeypatch):
    """The space's MLflow record is made (and its size checked) while the plan is validated, not
    after Ray started and the search's folder was written."""
    import granq_search.search.plan as plan
    from granq_search.search.space import space_record_text

    monkeypatch.setattr(plan, "space_record_text", lambda space: space_record_text(space, limit=100))
    runs = tmp_path / "runs"
    rc = main(["search", "--space", str(good_space), "--output-dir", str(runs)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "too large to record on its MLflow run" in err, err
    assert not runs.exists()


def test_leaderboard_hint_names_the_searchs_store_and_experiment(tmp_path, capsys, monkeypatch):
    """The printed leaderboard command reaches the search's records: a resumed search that kept a
    store and experiment of its own names them, though no flag gave them this time."""
    import granq_search.search.runner as runner
    from granq_search.search.outcome import SearchOutcome

    runs = tmp_path / "runs"
    default_uri = f"sqlite:///{(runs.resolve() / 'mlflow.db').as_posix()}"

    def outcome(uri: str, experiment: str) -> SearchOutcome:
        return SearchOutcome(name="s", path=str(runs / "s"), status="finished", num_trials=1,
                             counts={"complete": 1, "pruned": 0, "fail": 0}, pareto=[], objectives=[], ray_path="",
                             journal="", tracking_uri=uri, wall_time_s=1.0, experiment=experiment)

    def hint(argv: list[str], result: SearchOutcome) -> str:
        monkeypatch.setattr(runner, "run_search", lambda *a, **k: result)
        assert main(["search", "--output-dir", str(runs), *argv]) == 0
        line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("search folder:")][0]
        return line.split("(leaderboard: ", 1)[1]

    other = f"sqlite:///{tmp_path}/team.db"
    assert hint(["--resume", "--name", "s"], outcome(other, "team")) == \
        f"granq-search leaderboard --output-dir {runs} --search s --tracking-uri {other} --experiment team)"
    assert hint([], outcome(default_uri, "granq_search")) == f"granq-search leaderboard --output-dir {runs} --search s)"
    assert hint([], outcome(other, "granq_search")).endswith(f"--search s --tracking-uri {other})")
    assert hint(["--resume"], outcome(default_uri, "granq_search")).endswith(f"--tracking-uri {default_uri})")
