"""The MLflow tracking server crashes mid-search and comes back.

A real ``mlflow server`` (SQLite store, 127.0.0.1, one worker) records a search run as a
subprocess driver with credentials in the tracking URI (``http://user:secret@127.0.0.1:PORT``;
the MLflow client accepts them, the server ignores them). Once the first per-epoch metrics are
recorded the server's process group is SIGKILLed; it is restarted on the same port and database
after a trial has finished meanwhile. Documented behaviour (tracking/callback.py, README "Faults
and recovery"): the recorder buffers the failed writes in order and retries them, so the search
completes by itself and nothing already recorded or buffered is lost. The secret appears
nowhere: not in the record (params, tags of every run) and not in the driver's output.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from reliability_helpers import (
    MlflowServer,
    Watched,
    driver_env,
    journal_trials,
    metric_steps,
    results_of,
    search_cmd,
    search_runs,
)

pytestmark = pytest.mark.slow

N = 3
EPOCHS = 4
SECRET = "s3cr3tPW"


def _epochs_recorded(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as con:
            return con.execute("select count(*) from metrics where key = 'epoch'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_server_killed_mid_search_and_restarted(tmp_path):
    from optuna.trial import TrialState

    server = MlflowServer(tmp_path)
    driver = None
    try:
        server.start()
        uri = f"http://user:{SECRET}@127.0.0.1:{server.port}"
        runs = tmp_path / "runs"
        driver = Watched(search_cmd("--name", "srv", "--output-dir", str(runs), "--num-samples", str(N),
                                    "--max-concurrent", "2", "--tracking-uri", uri,
                                    "--set", f"train.epochs={EPOCHS}", "--set", "train.iters_per_epoch=6"),
                         tmp_path / "driver.log", env=driver_env(), cwd=tmp_path)
        journal = runs / "srv" / "optuna.journal"
        deadline = time.time() + 240
        while time.time() < deadline and driver.proc.poll() is None and _epochs_recorded(server.db) < 1:
            driver.record()
            time.sleep(0.2)
        assert driver.proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        server.kill()                                    # crash: SIGKILL to the whole process group
        down_at = time.time()

        def ended() -> int:
            if not journal.is_file():
                return 0
            return sum(1 for t in journal_trials(journal, "srv") if t.state != TrialState.RUNNING)

        ended_before = ended()
        while time.time() < deadline and driver.proc.poll() is None and ended() <= ended_before \
                and time.time() - down_at < 90:
            driver.record()
            time.sleep(0.2)
        assert driver.proc.poll() is None, "the search must not stop while the server is down"
        assert ended() > ended_before, "no trial ended while the server was down"
        server.start()                                   # same port, same database
        rc = driver.proc.wait(timeout=max(30.0, deadline - time.time()))
        log = (tmp_path / "driver.log").read_text(errors="replace")
        assert rc == 0, log[-3000:]

        # nothing recorded or buffered was lost: one parent, N children, none RUNNING, every epoch
        parents, children, deleted = search_runs(server.url, "srv")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == N and not deleted
        assert not [c for c in children if c.info.status == "RUNNING"]
        ray_dir = runs / "srv" / "ray"
        for c in children:
            tid = c.data.tags["granq.trial_id"]
            (trial_dir,) = list(ray_dir.glob(f"train_trial_{tid}_*"))
            reported = sorted({int(r["epoch"]) for r in results_of(trial_dir) if "epoch" in r})
            steps = metric_steps(server.url, c.info.run_id, "epoch")
            assert reported and sorted(set(steps)) == reported, (tid, reported, steps)
            # validation only where ASHA decides and at the last epoch: a subset of the epochs
            validated = sorted({int(r["epoch"]) for r in results_of(trial_dir) if "val_top1" in r and "epoch" in r})
            assert sorted(set(metric_steps(server.url, c.info.run_id, "val_top1"))) == validated
            if c.data.tags["granq.status"] == "finished":
                assert reported == list(range(1, EPOCHS + 1)) and c.data.metrics["final"] == 1.0
                assert "val_drop" in c.data.metrics and "bitops" in c.data.metrics

        # no secret anywhere: the record (params and tags of the parent and every child), the output
        for run in [*parents, *children]:
            text = " ".join(f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items())
            assert SECRET not in text and "user:" not in text, run.info.run_id
        assert f"http://127.0.0.1:{server.port}" in parents[0].data.tags["granq.command"]
        assert SECRET not in log
        assert "buffered" in log  # the recorder's warning (URI redacted) when the server went away
    finally:
        if driver is not None:
            driver.cleanup()
        server.stop()
