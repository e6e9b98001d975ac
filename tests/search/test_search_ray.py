"""Searches through Ray Tune (one local Ray for the module: 2 CPUs, no dashboard).

The real trainable runs the digits pipeline at a tiny budget; the synthetic one (tests/search/
fakes.py) follows the same reporting contract in milliseconds.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")

import fakes  # noqa: E402  (tests/search is on sys.path under pytest)

from granq_search.search.runner import run_search  # noqa: E402
from granq_search.search.searcher import open_study  # noqa: E402
from granq_search.search.space import load_space  # noqa: E402

TINY = {"train.epochs": 2, "train.warmup_epochs": 1, "train.iters_per_epoch": 2}


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    d = tmp_path_factory.mktemp("markers")
    old = {fakes.MARKERS: os.environ.get(fakes.MARKERS)}
    os.environ[fakes.MARKERS] = str(d)  # inherited by the local Ray workers started below
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(fakes)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield d
    finally:
        ray.shutdown()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def space_file(tmp_path, **doc) -> Path:
    base = {"base": "digits", "fidelity": {"train.epochs": 4, "train.warmup_epochs": 1, "train.iters_per_epoch": 2},
            "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
            "scheduler": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}}
    base.update(doc)
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def study_of(outcome):
    space = load_space(json.loads(Path(outcome.path, "search.json").read_text())["space_file"])
    return open_study(space, outcome.journal, outcome.name)[0]


def by_trial(markers_dir, names=None):
    rows = fakes.read_markers(markers_dir)
    return [r for r in rows if names is None or r["trial_id"] in names]


def test_real_search_records_multi_objective_study_and_divergence(tmp_path, markers):
    """The real trainable: 2 directions, lr 1e6 diverges -> FAIL (not retried), the rest COMPLETE,
    MLflow record closed, best.yaml at the production budget."""
    space = space_file(
        tmp_path, fidelity=TINY,
        parameters={"optim.student.lr": {"type": "categorical", "choices": [1.0e-3, 1.0e6]},
                    "quant.act.bits": {"type": "categorical", "choices": [3, 4]}},
        initial_points=[{"optim.student.lr": 1.0e-3, "quant.act.bits": 4},
                        {"optim.student.lr": 1.0e6, "quant.act.bits": 4},
                        {"optim.student.lr": 1.0e-3, "quant.act.bits": 3}])
    out = run_search(space, name="real", output_dir=tmp_path / "runs", num_samples=3, max_concurrent=2,
                     progress=False)
    assert out.status == "finished" and out.num_trials == 3
    study = study_of(out)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    by_lr = {t.params["optim.student.lr"]: t for t in study.trials if t.params["quant.act.bits"] == 4}
    assert by_lr[1.0e6].state == TrialState.FAIL
    assert "diverged" in by_lr[1.0e6].user_attrs["failure_reason"]
    assert by_lr[1.0e-3].state == TrialState.COMPLETE
    assert Counter(t.state for t in study.trials) == {TrialState.COMPLETE: 2, TrialState.FAIL: 1}
    # the failure was reported, not raised: Ray did not retry it
    grid_dir = Path(out.ray_path)
    for trial_dir in grid_dir.glob("train_trial_*"):
        results = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert results[-1]["final"] == 1.0
        assert not (trial_dir / "error.txt").exists()
        if "failure_reason" in results[-1]:
            assert len(results) <= 2  # at most one epoch report before the failure, no retry
    # MLflow: one child per trial, closed with the right status and the reason
    from granq_search.tracking import load_runs

    board = load_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "real")
    assert sorted(board.df["status"]) == ["failed", "finished", "finished"]
    # export: the search budget (2 epochs) replaced by the production one (digits preset: 8)
    best = yaml.safe_load(Path(out.best_config).read_text())
    assert best["train"]["epochs"] == 8 and best["train"]["iters_per_epoch"] == 40
    assert best["provenance"]["search"] == "real"
    record = json.loads(Path(out.path, "search.json").read_text())
    assert record["status"] == "finished" and record["search_config"]["train"]["epochs"] == 2


def test_asha_pruned_trials_are_pruned_and_off_the_front(tmp_path, markers):
    space = space_file(
        tmp_path,
        parameters={"quant.act.threshold": {"type": "float", "low": 0.0, "high": 0.6}},
        initial_points=[{"quant.act.threshold": t} for t in (0.6, 0.0, 0.5, 0.05)],
        scheduler={"type": "asha", "reduction_factor": 2, "grace_period": 1})
    out = run_search(space, name="asha", output_dir=tmp_path / "runs", num_samples=4, max_concurrent=1,
                     progress=False, tracking=False, trainable=fakes.synthetic_trial)
    study = study_of(out)
    state = {t.params["quant.act.threshold"]: t.state for t in study.trials}
    assert state[0.0] == TrialState.PRUNED and state[0.05] == TrialState.PRUNED
    assert state[0.6] == TrialState.COMPLETE and state[0.5] == TrialState.COMPLETE
    front = {t.number for t in study.best_trials}
    assert all(study.trials[n].state == TrialState.COMPLETE for n in front)
    assert not front & {t.number for t in study.trials if t.state == TrialState.PRUNED}
    assert Path(out.path, "scheduler_state.json").is_file()
    assert out.counts["pruned"] == 2 and out.counts["running"] == 0


def test_duplicates_are_not_trained_twice(tmp_path, markers):
    space = space_file(tmp_path, parameters={
        "quant.act.bits": {"type": "categorical", "choices": [3, 4]},
        "quant.act.threshold": {"type": "categorical", "choices": [0.2, 0.8]}})
    out = run_search(space, name="dups", output_dir=tmp_path / "runs", num_samples=7, max_concurrent=2,
                     progress=False, tracking=False, trainable=fakes.synthetic_trial)
    study = study_of(out)
    trained = [r for r in by_trial(markers) if r["trial_id"] in {t.user_attrs.get("ray_trial_id")
                                                                 for t in study.trials}]
    keys = [tuple(sorted(r["params"].items())) for r in trained]
    assert len(keys) == len(set(keys)) == 4  # the 2 x 2 space, each configuration trained once
    assert out.num_trials == 4 and out.status == "exhausted"
    assert out.counts["running"] == 0 and out.counts["duplicates"] >= 1


def test_nan_objective_and_out_of_memory_are_fail(tmp_path, markers):
    space = space_file(
        tmp_path,
        parameters={"quant.act.bits": {"type": "categorical", "choices": [3, 4, 5]},
                    "optim.student.lr": {"type": "categorical", "choices": [1.0e-3, 10.0]}},
        initial_points=[{"quant.act.bits": 4, "optim.student.lr": 1.0e-3},
                        {"quant.act.bits": 3, "optim.student.lr": 1.0e-3},      # OOM in the real trainable
                        {"quant.act.bits": 5, "optim.student.lr": 10.0}])      # NaN objective
    out = run_search(space, name="fails", output_dir=tmp_path / "runs", num_samples=3, max_concurrent=2,
                     progress=False, trainable=fakes.oom_or_synthetic_trial)
    study = study_of(out)
    got = {(t.params["quant.act.bits"], t.params["optim.student.lr"]): t for t in study.trials}
    assert got[(4, 1.0e-3)].state == TrialState.COMPLETE
    assert got[(3, 1.0e-3)].state == TrialState.FAIL
    assert "out of memory" in got[(3, 1.0e-3)].user_attrs["failure_reason"]
    assert got[(5, 10.0)].state == TrialState.FAIL and "nan" in got[(5, 10.0)].user_attrs["failure_reason"]
    oom_id = got[(3, 1.0e-3)].user_attrs["ray_trial_id"]
    assert sum(1 for r in by_trial(markers, {oom_id})) == 1  # not retried
    from granq_search.tracking import load_runs

    df = load_runs(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", "fails").df.set_index("trial")
    assert df.loc[oom_id, "status"] == "failed"
    reason_col = next(c for c in df.columns if "reason" in c)
    assert "out of memory" in df.loc[oom_id, reason_col]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}").get_run(df.loc[oom_id, "run_id"])
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["granq.failure_reason"]


def interrupt_after(n: int, once: Path):
    """A Ray callback that sends this process SIGINT (Ctrl+C) once ``n`` trials have completed and
    a running one has checkpointed its second epoch.

    Ray pickles callbacks into tuner.pkl and calls them again after ``Tuner.restore``: the file
    ``once`` keeps the resumed run from being interrupted too."""
    from ray.tune import Callback

    class Interrupt(Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.done >= n and result.get("epoch", 0) >= 2 and not once.exists():
                once.touch()
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


def test_resume_after_interrupt(tmp_path, markers):
    # 6 epochs of 0.4 s: the interrupt comes while two trials are in flight
    space = space_file(tmp_path, fidelity={"train.epochs": 6, "train.warmup_epochs": 1, "train.iters_per_epoch": 40},
                       parameters={"quant.act.threshold": {"type": "float", "low": 0.0, "high": 1.0}},
                       initial_points=[{"quant.act.threshold": 0.9}])
    out = run_search(space, name="resumable", output_dir=tmp_path / "runs", num_samples=5, max_concurrent=2,
                     progress=False, tracking=False, trainable=fakes.synthetic_trial, callbacks=[interrupt_after(2, tmp_path / "interrupted")])
    assert out.status == "interrupted" and out.counts["running"] == 0
    seen = len(fakes.read_markers(markers))
    before = study_of(out).trials
    done_before = {t.user_attrs["ray_trial_id"] for t in before if t.state == TrialState.COMPLETE}
    in_flight = {t.user_attrs["ray_trial_id"] for t in before if t.state == TrialState.FAIL}
    assert len(done_before) == 2
    with pytest.raises(Exception, match="keeps the space"):
        run_search(space, name="resumable", output_dir=tmp_path / "runs", resume=True)

    again = run_search(name="resumable", output_dir=tmp_path / "runs", resume=True, progress=False, tracking=False,
                       trainable=fakes.synthetic_trial)
    assert again.status == "finished" and again.num_trials == 5
    study = study_of(again)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    complete_ids = {t.user_attrs["ray_trial_id"] for t in complete}
    assert len(complete_ids) == 5 and done_before <= complete_ids
    after = fakes.read_markers(markers)[seen:]
    assert not {r["trial_id"] for r in after} & done_before  # completed trials were not rerun
    restarted = [r for r in after if r["trial_id"] in in_flight]
    assert restarted and all(r["start_epoch"] >= 1 for r in restarted)  # from their last epoch checkpoint
    for r in restarted:  # the Optuna trial closed at the interrupt, the result recorded anew
        assert any(t.user_attrs.get("resumed_from") is not None for t in complete
                   if t.user_attrs["ray_trial_id"] == r["trial_id"])


def test_existing_name_and_missing_resume_fail_before_ray(tmp_path, markers):
    space = space_file(tmp_path, parameters={"quant.act.threshold": {"type": "float", "low": 0, "high": 1}})
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    with pytest.raises(Exception, match="already exists"):
        run_search(space, name="taken", output_dir=tmp_path / "runs")
    with pytest.raises(Exception, match="no search 'ghost'"):
        run_search(name="ghost", output_dir=tmp_path / "runs", resume=True)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["taken"]


def test_status_table_replaces_ray_output(tmp_path, markers, capfd):
    """progress=True: our table of trials (objectives, epochs, parameters) on stderr, at the end
    too; none of Ray's trial boxes or status blocks."""
    space = space_file(
        tmp_path,
        parameters={"quant.act.threshold": {"type": "float", "low": 0.0, "high": 0.6},
                    "quant.act.bits": {"type": "categorical", "choices": [3, 4]}},
        initial_points=[{"quant.act.threshold": t, "quant.act.bits": 4} for t in (0.6, 0.0, 0.5)],
        scheduler={"type": "asha", "reduction_factor": 2, "grace_period": 1})
    capfd.readouterr()
    out = run_search(space, name="table", output_dir=tmp_path / "runs", num_samples=3, max_concurrent=1,
                     progress=True, tracking=False, trainable=fakes.synthetic_trial, status_interval_s=0.0)
    stdout, stderr = capfd.readouterr()
    assert out.status == "finished"
    tables = [block for block in stderr.split("\n\n") if block.lstrip().startswith("search table [")]
    assert len(tables) >= 2, stderr[-3000:]
    last = tables[-1].strip().splitlines()
    assert "trials 3/3" in last[0] and "objectives: val_drop (min), bitops (min)" in last[0]
    assert last[1].split() == ["trial", "state", "epoch", "val_drop", "bitops", "bits", "threshold"]
    study = study_of(out)
    for t in study.trials:
        row = next(line.split() for line in last[2:] if line.startswith(t.user_attrs["ray_trial_id"][:8]))
        state = {TrialState.COMPLETE: "finished", TrialState.PRUNED: "pruned"}[t.state]
        assert row[1] == state and row[2].endswith("/4") and row[4] == "4M"
        if state == "finished":
            assert float(row[3]) == pytest.approx(t.values[0], abs=0.01) and row[2] == "4/4"
    assert any(line.split()[1] == "running" for table in tables for line in table.splitlines()[2:])
    for ray_output in ("Trial status:", "╭", "val_top5", "Checkpoint successfully created", "View detailed results"):
        assert ray_output not in stdout + stderr


def test_probe_accepts_a_real_ray_gcs(markers):
    from granq_search.search.preflight import probe_ray_address

    address = ray.get_runtime_context().gcs_address
    probe_ray_address(address)  # no error: Ray's GCS answers the HTTP/2 preface
