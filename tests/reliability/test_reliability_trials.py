"""Faults inside trials, one real search (the real trainable on digits, tiny budget) for all:

* the Ray worker process of a trial is SIGKILLed mid-epoch: Ray retries the trial from its last
  epoch checkpoint (``FailureConfig(max_failures=2)``), the search finishes with every trial,
  MLflow keeps one child for it;
* a configuration that diverges (student learning rate 1e30) ends FAILED with its reason in
  Optuna, MLflow and the leaderboard, and is not retried; the other trials finish.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import yaml

from reliability_helpers import cmdline, metric_steps, results_of, search_runs

pytestmark = pytest.mark.slow

VICTIM = {"optim.student.lr": 1.0e-3, "quant.act.bits": 4}
DIVERGES = {"optim.student.lr": 1.0e30, "quant.act.bits": 4}
OTHER = {"optim.student.lr": 1.0e-3, "quant.act.bits": 3}
EPOCHS = 4


def kill_worker_at_epoch(victim: dict, epoch: int, log: Path):
    """A Ray callback (runs in the driver) that SIGKILLs the worker process of the trial whose
    config is ``victim`` 0.3 s after its report of ``epoch`` (the worker is then in the next
    epoch); Ray puts the worker's ``pid`` in every result. Writes what it did to ``log``."""
    from ray.tune import Callback

    class KillWorker(Callback):
        done = False

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.done or result.get("epoch") != epoch:
                return
            if any(trial.config.get(k) != v for k, v in victim.items()):
                return
            pid = int(result["pid"])
            if pid == os.getpid() or "ray::" not in cmdline(pid):
                return  # only ever a Ray worker
            self.done = True
            log.write_text(json.dumps({"trial_id": trial.trial_id, "pid": pid, "cmdline": cmdline(pid)}))
            threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()

    return KillWorker()


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    from granq_search.search.runner import run_search

    tmp = tmp_path_factory.mktemp("faults")
    space = tmp / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "digits",
        "fidelity": {"train.epochs": EPOCHS, "train.warmup_epochs": 1, "train.iters_per_epoch": 6},
        "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
        "parameters": {"optim.student.lr": {"type": "categorical", "choices": [1.0e-3, 1.0e30]},
                       "quant.act.bits": {"type": "categorical", "choices": [3, 4]}},
        "initial_points": [VICTIM, DIVERGES, OTHER],
        "scheduler": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}}))
    killed = tmp / "killed.json"
    out = run_search(space, name="faults", output_dir=tmp / "runs", num_samples=3, max_concurrent=2,
                     progress=False, callbacks=[kill_worker_at_epoch(VICTIM, 2, killed)])
    uri = f"sqlite:///{tmp / 'runs' / 'mlflow.db'}"
    from granq_search.search.searcher import open_study
    from granq_search.search.space import load_space

    study, _ = open_study(load_space(space), out.journal, "faults")
    by_params = {(t.params["optim.student.lr"], t.params["quant.act.bits"]): t for t in study.trials}
    return {"out": out, "uri": uri, "study": study, "by_params": by_params, "killed": killed,
            "ray": Path(out.ray_path)}


def _trial_dir(ray_dir: Path, trial_id: str) -> Path:
    (d,) = [p for p in ray_dir.glob("train_trial_*") if trial_id in p.name]
    return d


def test_search_completes_with_every_trial(search):
    out = search["out"]
    assert out.status == "finished" and out.num_trials == 3, out.to_dict()
    assert out.counts["running"] == 0 and len(search["study"].trials) == 3
    parents, children, deleted = search_runs(search["uri"], "faults")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 3 and not deleted
    assert not [c for c in children if c.info.status == "RUNNING"]


def test_killed_worker_trial_resumes_from_its_epoch_checkpoint(search):
    assert search["killed"].is_file(), "the worker was never killed"
    killed = json.loads(search["killed"].read_text())
    tid = killed["trial_id"]
    assert "ray::" in killed["cmdline"]
    victim = search["by_params"][(VICTIM["optim.student.lr"], VICTIM["quant.act.bits"])]
    assert victim.user_attrs["ray_trial_id"] == tid
    assert victim.state.name == "COMPLETE" and len(victim.values) == 2

    results = results_of(_trial_dir(search["ray"], tid))
    epochs = [r.get("epoch") for r in results if r.get("epoch") is not None]
    pids = {r["pid"] for r in results}
    assert killed["pid"] in pids and len(pids) == 2, pids  # a second worker process took over
    # resumed from the last epoch checkpoint: no epoch reported twice except, at most, the one
    # that was running when the worker died; epoch 1 never again
    assert epochs.count(1) == 1 and sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
    restart = next(i for i, r in enumerate(results) if r["pid"] != killed["pid"])
    assert results[restart]["epoch"] >= 2 and results[restart]["iterations_since_restore"] == 1, results[restart]
    assert len(results) <= EPOCHS + 1
    assert results[-1]["final"] == 1.0 and "failure_reason" not in results[-1]

    parents, children, _ = search_runs(search["uri"], "faults")
    mine = [c for c in children if c.data.tags["granq.trial_id"] == tid]
    assert len(mine) == 1, "one MLflow child for the retried trial"
    child = mine[0]
    assert child.info.status == "FINISHED" and child.data.tags["granq.status"] == "finished"
    assert "granq.last_error" in child.data.tags  # the retry is visible
    steps = metric_steps(search["uri"], child.info.run_id, "val_top1")
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1)) and len(steps) <= EPOCHS + 1, steps


def test_diverging_trial_fails_with_its_reason_everywhere(search):
    from granq_search.tracking import load_runs

    bad = search["by_params"][(DIVERGES["optim.student.lr"], DIVERGES["quant.act.bits"])]
    assert bad.state.name == "FAIL" and "diverged" in bad.user_attrs["failure_reason"]
    tid = bad.user_attrs["ray_trial_id"]
    trial_dir = _trial_dir(search["ray"], tid)
    results = results_of(trial_dir)
    assert not (trial_dir / "error.txt").exists() and len({r["pid"] for r in results}) == 1  # not retried
    assert results[-1]["final"] == 1.0 and "diverged" in results[-1]["failure_reason"]

    _, children, _ = search_runs(search["uri"], "faults")
    (child,) = [c for c in children if c.data.tags["granq.trial_id"] == tid]
    assert child.info.status == "FAILED" and child.data.tags["granq.status"] == "failed"
    assert "diverged" in child.data.tags["granq.failure_reason"]

    board = load_runs(search["uri"], "faults").df.set_index("trial")
    assert board.loc[tid, "status"] == "failed" and "diverged" in board.loc[tid, "failure_reason"]
    assert not bool(board.loc[tid, "pareto"])
    others = board.drop(index=tid)
    assert list(others["status"]) == ["finished", "finished"]
    assert others["val_drop"].notna().all() and others["bitops"].notna().all()
