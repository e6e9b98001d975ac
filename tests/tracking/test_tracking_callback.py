"""SearchRecorder driven directly with fake trials against a real SQLite MLflow store."""

from __future__ import annotations

import json
import pickle

import pytest
from mlflow.tracking import MlflowClient

from granq_search.config import flatten
from granq_search.errors import TrackingError
from granq_search.tracking.ray_trial import failure_reason
from granq_search.tracking.schema import TAG
from tracking_helpers import FakeTrial, epoch_result, make_recorder, runs_of, trial_config

RAY_ERROR_FILE = """Failure # 1 (occurred at 2026-01-01_10-00-00)
ray::ImplicitFunc.train() (pid=4242, ip=127.0.0.1, actor_id=abc)
  File "/x/ray/tune/trainable/trainable.py", line 331, in train
    raise skipped from exception_cause(skipped)
  File "/x/granq_search/pipeline/trainer.py", line 300, in run_training
    raise TrainingDiverged(msg)
granq_search.pipeline.trainer.TrainingDiverged: student loss is NaN at epoch 2; lower optim.student.lr
"""


def _run_trial(rec, trial, epochs=3, final=True, val0=80.0):
    rec.on_trial_start(0, [trial], trial)
    for e in range(1, epochs + 1):
        r = epoch_result(e, val0 + e, final=final and e == epochs)
        trial.last_result = r
        rec.on_trial_result(0, [trial], trial, r)


def _complete(rec, trial):
    trial.status = "TERMINATED"
    rec.on_trial_complete(0, [trial], trial)


def test_finished_trial_is_recorded_completely(store):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3})
    _run_trial(rec, t)
    _complete(rec, t)
    rec.on_experiment_end([t])
    rec.finish()
    assert rec.pending == 0 and rec.dropped == []

    c = MlflowClient(store)
    parent = runs_of(store, kind="search")
    assert len(parent) == 1
    p = parent[0]
    assert p.info.status == "FINISHED" and p.info.run_name == "s1"
    tags = p.data.tags
    assert tags[TAG.SEARCH] == "s1" and tags[TAG.KIND] == "search"
    assert json.loads(tags[TAG.OBJECTIVES]) == [{"metric": "val_drop", "mode": "min"},
                                                {"metric": "bitops", "mode": "min"}]
    assert tags[TAG.VERSION] == "0.1.0" and tags[TAG.GIT_COMMIT]
    assert tags[TAG.TEACHER] == "digits_cnn" and float(tags[TAG.TEACHER_VAL]) == 90.0
    assert float(tags[TAG.TEACHER_TEST]) == 89.0 and tags[TAG.SPACE] == "search_spaces/digits.yaml"
    assert "s3cret" not in tags[TAG.COMMAND] and "alice" not in tags[TAG.COMMAND]
    assert "mlflow.example:5000" in tags[TAG.COMMAND]
    assert {a.path for a in c.list_artifacts(p.info.run_id)} == {"leaderboard.csv", "pareto.png"}

    (child,) = runs_of(store, parent_id=p.info.run_id)
    assert child.info.run_name == "t1 W4A3" and child.info.status == "FINISHED"
    assert json.loads(child.data.tags[TAG.SEARCHED]) == ["quant.act.bits"]
    assert json.loads(p.data.tags[TAG.SEARCHED]) == ["quant.act.bits"]
    assert child.data.tags[TAG.TRIAL_ID] == "t1" and child.data.tags[TAG.STATUS] == "finished"
    expected = flatten(trial_config({"quant.act.bits": 3}))
    assert set(child.data.params) == set(expected)
    assert child.data.params["quant.act.bits"] == "3" and child.data.params["train.epochs"] == "3"
    m = child.data.metrics
    assert m["final"] == 1.0 and m["bitops"] == 1e6 and m["val_top1"] == 83.0
    for junk in ("time_this_iter_s", "pid", "timestamp", "done", "training_iteration"):
        assert junk not in m
    hist = c.get_metric_history(child.info.run_id, "val_top1")
    assert sorted((h.step, h.value) for h in hist) == [(1, 81.0), (2, 82.0), (3, 83.0)]
    assert {a.path for a in c.list_artifacts(child.info.run_id)} == {"config.yaml", "sites.json"}
    cfg_text = c.download_artifacts(child.info.run_id, "config.yaml", str(store[len("sqlite:///"):] + ".d"))
    assert "bits: 3" in open(cfg_text).read()


def test_retry_reuses_the_child(store):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3})
    _run_trial(rec, t, epochs=2, final=False)
    t.error_file = None
    rec.on_trial_recover(0, [t], t)  # Ray will retry it
    _run_trial(rec, t, epochs=3)  # started again
    _complete(rec, t)
    rec.finish()
    children = runs_of(store, kind="trial")
    assert len(children) == 1
    assert children[0].info.status == "FINISHED" and children[0].data.tags[TAG.STATUS] == "finished"


def test_resume_with_a_new_recorder_finds_parent_and_children(store):
    rec = make_recorder(store)
    rec.setup()
    t1, t2 = FakeTrial("t1", {"quant.act.bits": 3}), FakeTrial("t2", {"quant.act.bits": 5})
    _run_trial(rec, t1)
    _complete(rec, t1)
    _run_trial(rec, t2, epochs=1, final=False)
    # the driver dies here: t2's child stays RUNNING, the parent too
    parent_id = rec.parent_run_id
    child2 = rec.child_run_id("t2")

    resumed = pickle.loads(pickle.dumps(rec))  # what Tuner.restore hands back from tuner.pkl
    assert resumed.parent_run_id is None and resumed.pending == 0
    resumed.setup()
    resumed.on_step_begin(0, [t1, t2])
    assert resumed.parent_run_id == parent_id
    _run_trial(resumed, t2, epochs=3)  # Ray restarts t2 from its checkpoint
    assert resumed.child_run_id("t2") == child2
    _complete(resumed, t2)
    resumed.on_experiment_end([t1, t2])
    resumed.finish()
    assert len(runs_of(store, kind="search")) == 1
    children = runs_of(store, kind="trial")
    assert sorted(r.info.run_name for r in children) == ["t1 W4A3", "t2 W4A5"]  # names kept on resume
    assert {r.info.status for r in children} == {"FINISHED"}
    assert runs_of(store, kind="search")[0].data.tags["granq.command_resume"]


def test_failure_reason_and_failed_status(store, tmp_path):
    err = tmp_path / "error.txt"
    err.write_text(RAY_ERROR_FILE)
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3}, error_file=str(err))
    _run_trial(rec, t, epochs=2, final=False)
    t.status = "ERROR"
    rec.on_trial_error(0, [t], t)
    rec.finish()
    (child,) = runs_of(store, kind="trial")
    assert child.info.status == "FAILED" and child.data.tags[TAG.STATUS] == "failed"
    reason = child.data.tags[TAG.FAILURE]
    assert reason.startswith("granq_search.pipeline.trainer.TrainingDiverged: student loss is NaN")
    assert "\n" not in reason and len(reason) <= 500


def test_failure_reported_in_a_result(store):
    """The trainable ends recognised failures with one report: final 1.0 + failure_reason."""
    rec = make_recorder(store)
    rec.setup()
    t, u = FakeTrial("t1"), FakeTrial("t2")
    rec.on_trial_start(0, [t], t)
    rec.on_trial_result(0, [t], t, epoch_result(1, 50.0))
    failure = {"final": 1.0, "failure_reason": "out of memory on cuda:0\nmore", "val_top1": 51.0,
               "training_iteration": 2}
    t.last_result = failure
    rec.on_trial_result(0, [t], t, failure)
    _complete(rec, t)
    # the same kind of trial, ended while the store was unreachable: a resumed recorder closes it
    rec.on_trial_start(0, [u], u)
    u.status, u.last_result = "TERMINATED", dict(failure, failure_reason="TrainingDiverged: NaN")
    resumed = make_recorder(store)
    resumed.setup()
    resumed.on_step_begin(0, [t, u])
    resumed.finish()
    by_name = {r.data.tags[TAG.TRIAL_ID]: r for r in runs_of(store, kind="trial")}
    assert by_name["t1"].info.status == "FAILED"
    assert by_name["t1"].data.tags[TAG.FAILURE] == "out of memory on cuda:0 more"
    assert by_name["t2"].info.status == "FAILED" and by_name["t2"].data.tags[TAG.FAILURE] == "TrainingDiverged: NaN"


def test_failure_reason_parsing():
    assert failure_reason(error=ValueError("boom\nsecond line")) == "ValueError: boom"
    assert failure_reason(error="x" * 2000) == "x" * 500
    text = "Failure # 1 (occurred at t)\nValueError: first\nFailure # 2 (occurred at t)\nKeyError: 'second'\n"
    assert failure_reason(error=text) == "KeyError: 'second'"
    assert failure_reason(FakeTrial("t", error_file="/nonexistent")) == "unknown error (no error file)"


def test_pruned_and_interrupted_status_and_nothing_left_running(store):
    rec = make_recorder(store)
    rec.setup()
    pruned, running = FakeTrial("p1"), FakeTrial("r1")
    _run_trial(rec, pruned, epochs=1, final=False)
    _complete(rec, pruned)  # ASHA stopped it: no final report
    _run_trial(rec, running, epochs=1, final=False)
    rec.on_experiment_end([pruned, running])  # interrupted while r1 runs
    rec.finish("KILLED")
    rec.finish("KILLED")  # safe twice
    by_name = {r.data.tags[TAG.TRIAL_ID]: r for r in runs_of(store, kind="trial")}
    assert by_name["p1"].info.status == "KILLED" and by_name["p1"].data.tags[TAG.STATUS] == "pruned"
    assert by_name["r1"].info.status == "KILLED" and by_name["r1"].data.tags[TAG.STATUS] == "interrupted"
    (parent,) = runs_of(store, kind="search")
    assert parent.info.status == "KILLED" and parent.data.tags[TAG.STATUS] == "interrupted"
    assert not [r for r in runs_of(store) if r.info.status == "RUNNING"]


def test_finish_from_a_fresh_instance_closes_stragglers(store):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1")
    _run_trial(rec, t, epochs=1, final=False)
    other = make_recorder(store)  # e.g. the driver's own instance after Tuner.restore
    other.finish()
    assert not [r for r in runs_of(store) if r.info.status == "RUNNING"]
    assert runs_of(store, kind="trial")[0].data.tags[TAG.STATUS] == "interrupted"


def test_store_failures_are_buffered_and_retried(store):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1")
    rec.on_trial_start(0, [t], t)
    real = rec.client.log_batch
    calls = {"n": 0}

    def broken(*a, **k):
        calls["n"] += 1
        raise ConnectionError("server went away")

    rec.client.log_batch = broken
    rec.on_trial_result(0, [t], t, epoch_result(1, 81.0))
    rec.on_trial_result(0, [t], t, epoch_result(2, 82.0))
    assert rec.pending == 2 and calls["n"] >= 1
    rec.client.log_batch = real  # the server is back
    rec.on_trial_result(0, [t], t, epoch_result(3, 83.0, final=True))
    assert rec.pending == 0
    _complete(rec, t)
    rec.finish()
    (child,) = runs_of(store, kind="trial")
    hist = MlflowClient(store).get_metric_history(child.info.run_id, "val_top1")
    assert sorted(h.step for h in hist) == [1, 2, 3]  # nothing lost, in order
    assert child.info.status == "FINISHED"


def test_finish_reports_unrecorded_writes(store, monkeypatch):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1")
    rec.on_trial_start(0, [t], t)

    def broken(*a, **k):
        raise ConnectionError("server went away")

    rec.client.log_batch = broken
    rec.on_trial_result(0, [t], t, epoch_result(1, 81.0))
    monkeypatch.setattr("granq_search.tracking.writer.time.sleep", lambda s: None)
    with pytest.raises(TrackingError, match=r"could not be recorded .* rerun with --resume"):
        rec.finish()
    assert rec.pending >= 1


def test_resume_replays_results_missing_from_mlflow(store, tmp_path):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3})
    _run_trial(rec, t, epochs=1, final=False)  # epoch 1 recorded, then the store went away
    # Ray kept everything: result.json and the final last_result
    trial_dir = tmp_path / "ray" / "t1"
    trial_dir.mkdir(parents=True)
    results = [epoch_result(e, 80.0 + e, final=e == 3) for e in (1, 2, 3)]
    (trial_dir / "result.json").write_text("".join(json.dumps(r) + "\n" for r in results))
    done = FakeTrial("t1", {"quant.act.bits": 3}, status="TERMINATED", last_result=results[-1],
                     local_path=str(trial_dir))
    resumed = make_recorder(store)
    resumed.setup()
    resumed.on_step_begin(0, [done])
    resumed.finish()
    (child,) = runs_of(store, kind="trial")
    assert child.info.status == "FINISHED" and child.data.metrics["final"] == 1.0
    hist = MlflowClient(store).get_metric_history(child.info.run_id, "val_top1")
    assert sorted(h.step for h in hist) == [1, 2, 3]  # epoch 1 not duplicated


def test_params_are_not_rewritten_on_reuse(store, caplog):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3})
    rec.on_trial_start(0, [t], t)
    again = make_recorder(store)
    again.setup()
    t_changed = FakeTrial("t1", {"quant.act.bits": 5})
    again.on_trial_start(0, [t_changed], t_changed)
    assert again.pending == 0 and again.dropped == []
    (child,) = runs_of(store, kind="trial")
    assert child.data.params["quant.act.bits"] == "3"
    assert "immutable" in caplog.text


def test_dead_server_never_blocks_the_search(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = make_recorder(f"http://127.0.0.1:{port}", "down")
    t0 = time.monotonic()
    rec.setup()
    t = FakeTrial("t1")
    rec.on_trial_start(0, [t], t)
    for e in (1, 2, 3):
        rec.on_trial_result(0, [t], t, epoch_result(e, 80.0 + e, final=e == 3))
    _complete(rec, t)
    rec.on_experiment_end([t])
    assert rec.pending >= 5  # everything kept, in order
    with pytest.raises(TrackingError, match=rf"could not be recorded at http://127.0.0.1:{port} .*does not answer"):
        rec.finish()
    assert time.monotonic() - t0 < 10
    assert list(tmp_path.iterdir()) == []


def test_children_are_found_when_their_first_query_failed(store):
    rec = make_recorder(store)
    rec.setup()
    t = FakeTrial("t1", {"quant.act.bits": 3})
    _run_trial(rec, t, epochs=1, final=False)
    child = rec.child_run_id("t1")

    again = make_recorder(store)  # e.g. the recorder of a resumed driver
    real = again.client.search_runs
    calls = {"children": 0}

    def flaky(*a, **k):
        if "mlflow.parentRunId" in str(k.get("filter_string", "")):
            calls["children"] += 1
            if calls["children"] == 1:
                raise ConnectionError("server went away")
        return real(*a, **k)

    again.client.search_runs = flaky
    again.setup()  # the parent is found, its children's query fails: the write stays queued
    assert again.pending == 1 and again.parent_run_id is None and calls["children"] == 1
    assert again._writer.flush(force=True)
    assert calls["children"] == 2  # queried again, not skipped because the parent was known
    assert again.child_run_id("t1") == child
    assert again._writer.runs.children["t1"].params  # what reconciliation compares against


def test_a_long_proposal_is_recorded_whole_or_not_at_all(store, caplog):
    rec = make_recorder(store)
    rec.setup()
    long = FakeTrial("t1", {"quant.act.bits": 3, "note": "x" * 6000})  # > the old 5000-character cut
    too_long = FakeTrial("t2", {"quant.act.bits": 5, "note": "y" * 9000})  # > an MLflow tag
    for t in (long, too_long):
        rec.on_trial_start(0, [t], t)
    assert rec.pending == 0 and rec.dropped == []
    by_trial = {c.data.tags[TAG.TRIAL_ID]: c for c in runs_of(store, kind="trial")}
    assert json.loads(by_trial["t1"].data.tags[TAG.PROPOSAL]) == long.config
    assert TAG.PROPOSAL not in by_trial["t2"].data.tags  # never a cut, unreadable JSON
    assert "more than an MLflow tag holds" in caplog.text


def test_a_failure_reason_never_holds_credentials():
    from granq_search.tracking.ray_trial import clip_reason

    reason = clip_reason("ConnectionError: cannot reach https://alice:s3cret@mlflow.example:5000/api\n  retry")
    assert "s3cret" not in reason and "mlflow.example" in reason and "\n" not in reason
