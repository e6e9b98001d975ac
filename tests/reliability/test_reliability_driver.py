"""The search driver SIGKILLed mid-search, then ``--resume``.

The first driver runs with ``TUNE_GLOBAL_CHECKPOINT_S=3600`` so that Ray snapshots the experiment
only when forced (after ``num_to_keep`` checkpoints of a trial): the test kills it at a moment
when a trial has started (Optuna trial RUNNING, MLflow child created) that Ray's newest snapshot
on disk does not hold yet, the gap a killed driver leaves. After ``--resume`` (default snapshot
period):

* trials finished before the kill are not trained again (their ``result.json`` only gains
  replayed copies of the recorded final report);
* the search reaches N Ray trials; Optuna holds exactly N trials (the lost one's parameters went
  to a new Ray trial, same Optuna trial), none RUNNING;
* MLflow holds ONE parent and exactly N active children, none RUNNING; the lost trial's child is
  deleted (tagged ``lost``);
* the leaderboard rows of the trials that had finished before the kill are unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from reliability_helpers import (
    Watched,
    driver_env,
    journal_trials,
    ray_snapshot_text,
    search_cmd,
    search_runs,
)

pytestmark = pytest.mark.slow

N = 4
ROW = ["status", "val_top1", "val_drop", "bitops"]


def _children_in_db(db: Path) -> set[str]:
    """Ray trial ids of the MLflow children recorded so far (plain sqlite3 read, no MLflow import)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as con:
            return {v for (v,) in con.execute("select value from tags where key = 'granq.trial_id'")}
    except sqlite3.Error:
        return set()


def _rows(uri: str, name: str, trials: set[str]) -> dict[str, dict]:
    from granq_search.tracking import load_runs

    df = load_runs(uri, name).df.set_index("trial")
    return {t: {k: df.loc[t, k] for k in ROW} for t in trials if t in df.index}


def test_driver_killed_then_resumed(tmp_path):
    from optuna.trial import TrialState

    runs = tmp_path / "runs"
    name = "k"
    base = ["--name", name, "--output-dir", str(runs)]
    journal, ray_dir, db = runs / name / "optuna.journal", runs / name / "ray", runs / "mlflow.db"
    uri = f"sqlite:///{db}"
    driver = Watched(search_cmd(*base, "--num-samples", str(N), "--max-concurrent", "2", "--no-progress",
                                "--set", "train.epochs=4", "--set", "train.iters_per_epoch=6"),
                     tmp_path / "driver.log", env=driver_env(TUNE_GLOBAL_CHECKPOINT_S="3600"), cwd=tmp_path)
    finished_before: dict[str, object] = {}
    try:
        deadline = time.time() + 240
        killed = False
        while time.time() < deadline and driver.proc.poll() is None and not killed:
            driver.record()
            time.sleep(0.1)
            if not journal.is_file():
                continue
            trials = journal_trials(journal, name)
            ended = {t.user_attrs["ray_trial_id"]: t for t in trials
                     if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "ray_trial_id" in t.user_attrs}
            running = [t.user_attrs["ray_trial_id"] for t in trials
                       if t.state == TrialState.RUNNING and "ray_trial_id" in t.user_attrs]
            if not (ended and running):
                continue
            children = _children_in_db(db)
            if not [r for r in running if r not in ray_snapshot_text(ray_dir) and r in children]:
                continue
            # freeze the driver (its snapshot thread too), then look again: kill only inside a gap
            # and never while a snapshot on disk is half written
            os.kill(driver.pid, signal.SIGSTOP)
            snapshot = ray_snapshot_text(ray_dir)
            try:
                json.loads(snapshot)
                whole = True
            except ValueError:
                whole = False
            if whole and [r for r in running if r not in snapshot and r in children]:
                driver.kill()
                killed = True
                finished_before = ended
            else:
                os.kill(driver.pid, signal.SIGCONT)
        assert killed, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.cleanup()

    # what the resumed driver will find: Ray's newest snapshot on disk, the journal, MLflow (the
    # store does not change after the kill: these rows are the rows before it)
    snapshot = ray_snapshot_text(ray_dir)
    trials = journal_trials(journal, name)
    lost = {t.user_attrs["ray_trial_id"]: t.number for t in trials if t.state == TrialState.RUNNING
            and t.user_attrs.get("ray_trial_id") and t.user_attrs["ray_trial_id"] not in snapshot}
    with_child = _children_in_db(db)
    assert lost and set(lost) & with_child, "the kill did not fall in a snapshot gap"
    rows_before = _rows(uri, name, set(finished_before))
    assert set(rows_before) == set(finished_before) and rows_before
    results_before = {rid: [d for d in ray_dir.glob(f"train_trial_{rid}_*")][0] for rid in finished_before}
    text_before = {rid: (d / "result.json").read_text() for rid, d in results_before.items()}

    r = subprocess.run(search_cmd(*base, "--resume", "--format", "json"), capture_output=True, text=True,
                       env=driver_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["status"] == "finished" and doc["num_trials"] == N and doc["counts"]["running"] == 0, doc

    # completed trials were not trained again: only replayed copies of their final report
    for rid, d in results_before.items():
        now = (d / "result.json").read_text()
        assert now.startswith(text_before[rid])
        added = [json.loads(line) for line in now[len(text_before[rid]):].splitlines() if line.strip()]
        assert all(a.get("replayed") == 1.0 for a in added), added

    # Optuna: N trials, one per Ray trial; the lost ones continued under new Ray trial ids
    trials = journal_trials(journal, name)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    counted = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert len(counted) == N, [(t.number, t.state, t.user_attrs) for t in trials]
    ray_ids = {t.user_attrs["ray_trial_id"] for t in counted}
    assert len(ray_ids) == N and not ray_ids & set(lost)
    for old, number in lost.items():
        adopted = trials[number]
        assert old in adopted.user_attrs["lost_ray_trial_ids"]
        assert adopted.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        assert adopted.user_attrs.get("failure_reason") != "lost when the driver stopped"

    # MLflow: one parent, N active children (the Ray trials), none RUNNING, lost children deleted
    parents, children, deleted = search_runs(f"sqlite:///{db}", name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["granq.trial_id"] for c in children) == sorted(ray_ids)
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert {c.data.tags["granq.trial_id"] for c in deleted} == set(lost) & with_child
    assert all(c.data.tags["granq.status"] == "lost" and c.info.status == "KILLED" for c in deleted)

    # the leaderboard rows of trials finished before the kill are unchanged
    after = _rows(f"sqlite:///{db}", name, set(rows_before))
    assert set(after) == set(rows_before)
    for t, row in rows_before.items():
        assert after[t]["status"] == row["status"], (t, row, after[t])
        for k in ("val_top1", "val_drop", "bitops"):
            assert after[t][k] == pytest.approx(row[k], nan_ok=True), (t, k, row, after[t])
    record = json.loads((runs / name / "search.json").read_text())
    assert record["resumes"] == 1 and record["status"] == "finished"
