"""Slow integration tests: a real Ray Tune run, and a real MLflow server over http."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from granq_search.tracking import load_runs, resolve_tracking_uri
from granq_search.tracking.schema import TAG
from tracking_helpers import FakeTrial, epoch_result, make_recorder, runs_of

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- Ray Tune


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


def test_real_tune_run_and_restore(ray_local, store, tmp_path):
    from ray import tune

    def trainable(config):  # defined here so Ray ships it by value
        from ray import tune as t

        for epoch in range(1, 4):
            r = {"epoch": epoch, "val_top1": 50.0 + epoch, "best_val_top1": 50.0 + epoch,
                 "val_drop": 40.0 - epoch, "prune": 1.0 if config["mode"] == "prune" else 0.0}
            if config["mode"] == "fail" and epoch == 2:
                raise ValueError("boom at epoch 2")
            if epoch == 3:
                r.update(final=1.0, bitops=1e6, size_bits=1e5, teacher_val_top1=90.0, teacher_test_top1=89.0,
                         best_test_top1=52.0, sites_json="[]")
            t.report(r)

    def stop(trial_id, result):  # an early stop without a final report, like ASHA's
        return result.get("prune") == 1.0 and result["epoch"] >= 1

    rec = make_recorder(store, "ray")
    run_config = tune.RunConfig(name="exp", storage_path=str(tmp_path / "ray"), callbacks=[rec], stop=stop,
                                verbose=0, failure_config=tune.FailureConfig(max_failures=0))
    tuner = tune.Tuner(trainable,
                       param_space={"mode": tune.grid_search(["finish", "fail", "prune"]), "quant.act.bits": 3},
                       tune_config=tune.TuneConfig(max_concurrent_trials=1), run_config=run_config)
    grid = tuner.fit()
    rec.finish()
    ray_ids = {r.metrics["trial_id"] for r in grid}

    (parent,) = runs_of(store, kind="search")
    assert parent.info.status == "FINISHED"
    children = runs_of(store, parent_id=parent.info.run_id)
    by_mode = {}
    for c in children:
        by_mode[json.loads(c.data.tags["granq.proposal"])["mode"]] = c
    assert set(by_mode) == {"finish", "fail", "prune"} and len(children) == 3
    assert by_mode["finish"].info.status == "FINISHED" and by_mode["finish"].data.metrics["final"] == 1.0
    assert by_mode["prune"].info.status == "KILLED" and by_mode["prune"].data.tags[TAG.STATUS] == "pruned"
    assert by_mode["fail"].info.status == "FAILED"
    assert by_mode["fail"].data.tags[TAG.FAILURE] == "ValueError: boom at epoch 2"
    assert by_mode["finish"].data.params["quant.act.bits"] == "3"
    # named by Ray's trial counter (0-based for a grid search, 1-based with a searcher) and bits
    assert sorted(c.info.run_name for c in children) == ["t00 W4A3", "t01 W4A3", "t02 W4A3"]
    assert by_mode["finish"].info.run_name == "t00 W4A3"  # the grid's first point
    assert {c.data.tags[TAG.TRIAL_ID] for c in children} == ray_ids and len(ray_ids) == 3  # how --resume finds them
    for c in children:
        assert "time_this_iter_s" not in c.data.metrics and "prune" not in c.data.metrics

    # resume: Ray unpickles the recorder from tuner.pkl and retries the errored trial
    restored = tune.Tuner.restore(str(tmp_path / "ray" / "exp"), trainable, resume_errored=True)
    restored.fit()
    make_recorder(store, "ray").finish()  # the driver's own instance
    assert len(runs_of(store, kind="search")) == 1
    children = runs_of(store, kind="trial")
    assert len(children) == 3
    assert sorted(c.info.run_name for c in children) == ["t00 W4A3", "t01 W4A3", "t02 W4A3"]  # kept on resume
    assert not [r for r in runs_of(store) if r.info.status == "RUNNING"]
    board = load_runs(store, "ray")
    assert list(board.df.loc[board.df["pareto"], "status"]) == ["finished"]


# ----------------------------------------------------------------------------- MLflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rest(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else sys.executable, *([] if mlflow_bin.exists() else
           ["-m", "mlflow"]), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield base
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)  # the server's workers live in its process group
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # workers may outlive the main process
        except ProcessLookupError:
            pass
        log.close()


def test_recorder_against_a_real_server(mlflow_server, tmp_path):
    uri = resolve_tracking_uri(mlflow_server, tmp_path)
    rec = make_recorder(uri, "http")
    rec.setup()
    done, pruned = FakeTrial("t1", {"quant.act.bits": 3}), FakeTrial("t2", {"quant.act.bits": 2})
    for trial, epochs in ((done, 3), (pruned, 1)):
        rec.on_trial_start(0, [trial], trial)
        for e in range(1, epochs + 1):
            rec.on_trial_result(0, [trial], trial, epoch_result(e, 80.0 + e, final=epochs == 3 and e == 3))
        trial.status = "TERMINATED"
        rec.on_trial_complete(0, [trial], trial)
    rec.on_trial_start(0, [done], done)  # a retry of the same trial reuses its child
    rec.on_trial_result(0, [done], done, epoch_result(3, 83.0, final=True))
    rec.on_trial_complete(0, [done], done)
    rec.on_experiment_end([done, pruned])
    rec.finish()
    assert rec.pending == 0

    exp = _rest(mlflow_server, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=granq_search")
    exp_id = exp["experiment"]["experiment_id"]
    parents = _rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                    {"experiment_ids": [exp_id], "filter": "tags.`granq.kind` = 'search'"})["runs"]
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    parent_id = parents[0]["info"]["run_id"]
    children = _rest(mlflow_server, "/api/2.0/mlflow/runs/search",
                     {"experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})["runs"]
    status = {next(t["value"] for t in c["data"]["tags"] if t["key"] == "granq.trial_id"): c["info"]["status"]
              for c in children}
    assert status == {"t1": "FINISHED", "t2": "KILLED"}
    board = load_runs(uri, "http")
    assert list(board.df["trial"]) == ["t1", "t2"] and bool(board.df["pareto"][0])
