"""``granq-search searches`` (the searches of a store), ``--version`` and the command's name.

The records are search.json files in the layout the driver writes (docs/ARCHITECTURE.md) and
real Optuna journals; a real search listed from an installed package: tests/test_install.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from granq_search.cli.main import _normalise, main

REPO = Path(__file__).resolve().parents[1]
OBJECTIVES = [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]


def _record(root: Path, name: str, status: str, created: float, **extra) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    record = {"name": name, "created": created, "updated": created + 60.0, "status": status,
              "space_file": "/somewhere/search_spaces/digits.yaml", "objectives": OBJECTIVES,
              "num_samples": 8, "max_concurrent": 2, "study_name": name,
              "journal": str(folder / "optuna.journal"), "resumes": 0, **extra}
    (folder / "search.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    return folder


def _journal(folder: Path, name: str) -> None:
    """A study with 2 complete (one a duplicate proposal), 1 pruned, 1 failed and 1 running trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))),
                                study_name=name, directions=["minimize", "minimize"])
    for i, state in enumerate([TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]):
        t = study.ask()
        if i == 1:
            t.set_user_attr("duplicate_of", 0)
        if state == TrialState.COMPLETE:
            study.tell(t, [0.5, 1e6])
        else:
            study.tell(t, state=state)
    study.ask()  # running


@pytest.fixture
def store(tmp_path) -> Path:
    root = tmp_path / "runs" / "search"
    outcome = {"name": "done", "status": "finished", "num_trials": 8, "best_config": "/x/best.yaml",
               "counts": {"complete": 5, "pruned": 3, "fail": 0, "running": 0, "waiting": 0, "duplicates": 0}}
    _record(root, "done", "finished", 1_700_000_000.0, outcome=outcome)
    live = _record(root, "live", "running", 1_700_000_300.0, resumes=1,
                   outcome={**outcome, "name": "live"})  # the outcome of its run before the resume
    _journal(live, "live")
    _record(root, "early", "interrupted", 1_700_000_100.0)  # stopped before its study was written
    bad = root / "broken"
    bad.mkdir()
    (bad / "search.json").write_text("{not json", encoding="utf-8")
    os.utime(bad / "search.json", (1_600_000_000, 1_600_000_000))
    (root / "mlartifacts").mkdir()  # not a search
    (root / "mlflow.db").write_bytes(b"")
    return root


def test_searches_json(store, capsys):
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert main(["searches", "--output-dir", str(store), "--format", "json"]) == 0
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before  # reading writes nothing
    doc = json.loads(capsys.readouterr().out)
    assert doc["output_dir"] == str(store.resolve())
    by = {s["name"]: s for s in doc["searches"]}
    assert [s["name"] for s in doc["searches"]] == ["broken", "done", "early", "live"]  # oldest first
    assert doc["latest"] == "live"
    done = by["done"]
    assert (done["status"], done["trials"], done["counts_from"], done["best_config"]) == \
        ("finished", 8, "outcome", "/x/best.yaml")
    assert done["counts"]["complete"] == 5 and done["objectives"] == OBJECTIVES and done["num_samples"] == 8
    live = by["live"]  # resumed and running: the stale outcome is not used, the journal is
    assert live["counts_from"] == "journal" and live["resumes"] == 1
    assert {k: live["counts"][k] for k in ("complete", "pruned", "fail", "running", "duplicates")} == \
        {"complete": 2, "pruned": 1, "fail": 1, "running": 1, "duplicates": 1}
    assert live["trials"] == 4  # 5 Optuna trials, one of them a duplicate proposal
    assert by["early"]["trials"] == 0 and by["early"]["counts"] == {}
    assert by["broken"]["status"] == "unreadable" and "cannot read search.json" in by["broken"]["error"]
    assert all(s["path"] == str(store / s["name"]) for s in doc["searches"])


def test_searches_table(store, capsys):
    assert main(["searches", "--output-dir", str(store)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"4 search(es) in {store}, oldest first:"
    assert lines[1].split() == ["name", "status", "trials", "complete", "pruned", "failed", "running", "created",
                                "updated", "space", "objectives"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:6]}
    assert rows["done"][1:7] == ["finished", "8/8", "5", "3", "0", "0"]
    assert rows["live"][1:7] == ["running", "4/8", "2", "1", "1", "1"]
    assert rows["early"][1:3] == ["interrupted", "0/8"]
    assert rows["done"][-2:] == ["digits", "val_drop(min),bitops(min)"]
    assert rows["broken"][1] == "unreadable"
    assert "latest: live " in out and "--resume --name NAME" in out
    assert "note: broken: cannot read search.json" in out


def test_searches_empty_store(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["searches", "--output-dir", str(empty)]) == 0
    out, err = capsys.readouterr()
    assert out == f"no searches in {empty} yet; start one with: granq-search search --output-dir {empty}\n"
    assert err == ""
    assert main(["searches", "--output-dir", str(empty), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"output_dir": str(empty.resolve()), "latest": None,
                                                   "searches": []}


@pytest.mark.parametrize("make", ["missing", "file"])
def test_searches_not_a_store_is_one_line(tmp_path, capsys, make):
    target = tmp_path / "runs"
    if make == "file":
        target.write_text("x")
    assert main(["searches", "--output-dir", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and str(target) in err
    assert (make == "missing") == (not target.exists())  # nothing created


def test_version_flag(capsys):
    assert _normalise(["--version"]) == ["--version"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"granq-search {version('granq_search')}\n"


def test_prog_is_granq_search(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: granq-search: ") and "see 'granq-search --help'" in err


def test_tune_main_is_an_alias(tmp_path):
    """``python tune_main.py`` keeps working, from any directory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, str(REPO / "tune_main.py"), "--version"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == f"granq-search {version('granq_search')}\n"
