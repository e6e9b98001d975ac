"""The embedded default as a user runs it: ``granq-search`` with no arguments but the output folder
(search_spaces/digits.yaml, 8 trials, 2 at a time, real Ray, MLflow and training). What it must
show: a front of several trade-offs (search.json's ``pareto``: at least 3 distinct points), the
live status table of the trials on stderr, the dashboard line, and the leaderboard at the end of
stdout, with none of Ray's own progress output.

About 2-4 minutes on a busy 2-core machine (docs/default_search.md has the measured times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_default_search_has_a_front(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI",
                                                            "MLFLOW_EXPERIMENT_NAME")}
    env["PYTHONUNBUFFERED"] = "1"
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, str(REPO / "tune_main.py"), "--output-dir", str(runs), "--name", "default"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=580)
    assert r.returncode == 0, r.stderr[-4000:]

    record = json.loads((runs / "default" / "search.json").read_text())
    assert record["space_file"] == str(REPO / "search_spaces" / "digits.yaml") and record["num_samples"] == 8
    outcome = record["outcome"]
    assert outcome["status"] == "finished" and outcome["num_trials"] == 8
    points = {tuple(round(v, 6) for v in p["values"].values()) for p in outcome["pareto"]}
    print(f"{r.stdout.splitlines()[0]}; front (val_drop, bitops): {sorted(points)}")  # shown with -rP
    assert len(points) >= 3, outcome["pareto"]
    assert [o["metric"] for o in outcome["objectives"]] == ["val_drop", "bitops"]

    # stderr: the dashboard line and the status table (objectives as columns), no Ray boxes
    assert "Ray dashboard: off (pass --dashboard to start it)" in r.stderr
    tables = [b for b in r.stderr.split("\n\n") if b.lstrip().startswith("search default [")]
    assert tables, r.stderr[-4000:]
    final = tables[-1].strip().splitlines()
    assert "trials 8/8" in final[0]
    assert final[1].split()[:5] == ["trial", "state", "epoch", "val_drop", "bitops"]
    for ray_output in ("Trial status:", "╭", "Checkpoint successfully created", "View detailed results"):
        assert ray_output not in r.stdout + r.stderr
    # stdout: the summary, then the leaderboard (front flags), the exported config
    assert r.stdout.startswith("search default finished: 8 trial(s)")
    assert "front" in r.stdout and "val drop" in r.stdout and "best config: " in r.stdout
