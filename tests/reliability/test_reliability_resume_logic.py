"""Resume after a killed driver, without Ray: the pieces that keep the record exact.

A trial the killed driver started after Ray's last experiment snapshot is unknown to the
restored experiment. The searcher gives its parameters (and its Optuna trial) to the next new
Ray trial; the recorder closes, tags ``lost`` and deletes its MLflow child, so every trial of the
search has exactly one active child. A fresh search never deletes anything.
"""

from __future__ import annotations

import pickle

import yaml
from optuna.trial import TrialState

from granq_search.search.searcher import OptunaSearcher
from granq_search.search.space import load_space
from reliability_helpers import FakeTrial, epoch_result, search_runs

OBJECTIVES = [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]


def _recorder(uri: str, name: str = "s"):
    from granq_search.tracking.callback import SearchRecorder

    return SearchRecorder(tracking_uri=uri, search_name=name, objectives=OBJECTIVES, retry_interval_s=0.0,
                          command_line=["tune_main.py"])


def _run(rec, trial, epochs, final=True):
    rec.on_trial_start(0, [trial], trial)
    for e in range(1, epochs + 1):
        res = epoch_result(e, 80.0 + e, final=final and e == epochs)
        trial.last_result = res
        rec.on_trial_result(0, [trial], trial, res)


def test_recorder_deletes_children_of_trials_the_restored_experiment_does_not_know(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _recorder(uri)
    first.setup()
    first.on_step_begin(0, [])
    done, resumed, lost = FakeTrial("t1"), FakeTrial("t2"), FakeTrial("t3")
    _run(first, done, 3)
    done.status = "TERMINATED"
    first.on_trial_complete(0, [done], done)
    _run(first, resumed, 1, final=False)
    _run(first, lost, 1, final=False)
    # the driver is killed here: no on_experiment_end, no finish(); Ray's snapshot knows t1 and t2
    second = pickle.loads(pickle.dumps(first))  # what Tuner.restore unpickles from tuner.pkl
    resumed.status = "PENDING"
    second.on_step_begin(0, [done, resumed])
    _, children, deleted = search_runs(uri, "s")
    assert sorted(c.data.tags["granq.trial_id"] for c in children) == ["t1", "t2"]
    (gone,) = deleted
    assert gone.data.tags["granq.trial_id"] == "t3" and gone.data.tags["granq.status"] == "lost"
    assert gone.info.status == "KILLED" and "snapshot" in gone.data.tags["granq.failure_reason"]
    # the resumed search goes on: t2 finishes, t4 runs t3's parameters
    new = FakeTrial("t4")
    resumed.status = "RUNNING"
    for t in (resumed, new):
        _run(second, t, 3)
        t.status = "TERMINATED"
        second.on_trial_complete(0, [done, resumed, new], t)
    second.on_experiment_end([done, resumed, new])
    _recorder(uri).finish()
    parents, children, deleted = search_runs(uri, "s")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.tags["granq.trial_id"] for c in children) == ["t1", "t2", "t4"]
    assert all(c.info.status == "FINISHED" for c in children) and len(deleted) == 1
    from granq_search.tracking import load_runs

    assert sorted(load_runs(uri, "s").df["trial"]) == ["t1", "t2", "t4"]


def test_fresh_search_with_running_children_deletes_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rec = _recorder(uri)
    rec.setup()
    rec.on_step_begin(0, [])       # a fresh experiment: no trials before the first step
    t = FakeTrial("a")
    _run(rec, t, 1, final=False)
    rec.on_step_begin(1, [t])      # later steps never look for lost trials
    rec.on_experiment_end([])      # even if Ray reported no trials at the end
    _, children, deleted = search_runs(uri, "s")
    assert [c.data.tags["granq.trial_id"] for c in children] == ["a"] and not deleted


def test_resumed_search_whose_snapshot_held_no_trial(tmp_path):
    """Killed within a second of its first trial: Ray's snapshot knows no trial; the driver marks
    the restored recorder ``resumed`` so the lost child is still found."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _recorder(uri)
    first.setup()
    first.on_step_begin(0, [])
    _run(first, FakeTrial("early"), 1, final=False)
    second = pickle.loads(pickle.dumps(first))
    second.resumed = True
    second.on_step_begin(0, [])
    _, children, deleted = search_runs(uri, "s")
    assert not children and [c.data.tags["granq.trial_id"] for c in deleted] == ["early"]


def _space(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": {"train.epochs": 2, "train.iters_per_epoch": 2},
        "objectives": OBJECTIVES,
        "parameters": {"quant.act.bits": {"type": "categorical", "choices": [3, 4]},
                       "quant.act.threshold": {"type": "categorical", "choices": [0.5]}},
        "initial_points": [{"quant.act.bits": 3, "quant.act.threshold": 0.5},
                           {"quant.act.bits": 4, "quant.act.threshold": 0.5},
                           {"quant.act.bits": 4, "quant.act.threshold": 0.5}],
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}}))
    return load_space(p)


def _final(drop):
    return {"final": 1.0, "val_drop": drop, "bitops": 1e6, "epoch": 2}


def test_searcher_adopts_lost_trials_and_their_deferred_duplicates(tmp_path):
    space = _space(tmp_path)
    journal = str(tmp_path / "optuna.journal")
    s = OptunaSearcher(space, journal_path=journal, study_name="s", max_retries=4)
    s.set_max_concurrency(2)
    assert s.suggest("a") == {"quant.act.bits": 3, "quant.act.threshold": 0.5}
    s.save(str(tmp_path / "state.json"))       # Ray's last snapshot knows only 'a'
    lost = s.suggest("b")                       # started after it
    assert s.suggest("x") is None               # concurrency 2 reached
    s.on_trial_complete("a", _final(1.0))
    s.suggest("c")  # the third initial point duplicates 'b': deferred (then the 2-point space is exhausted)
    assert params_of(s, 2) == lost and s.study.get_trials(deepcopy=False)[2].state == TrialState.RUNNING
    # the driver dies; the next one restores Ray's snapshot
    fresh = pickle.loads(pickle.dumps(OptunaSearcher(space, journal_path=journal, study_name="s")))
    fresh.set_max_concurrency(2)
    fresh.restore(str(tmp_path / "state.json"))
    assert fresh._orphans == [1] and 2 in fresh._twins.get(1, [])  # 'b' adopted later; its twin waits
    fresh.on_trial_complete("a", _final(1.0))   # 'a' was running in the snapshot: resumed, told
    assert fresh.suggest("d") == lost           # 'b' continues as Ray trial 'd'
    fresh.on_trial_complete("d", _final(0.5))
    trials = fresh.study.get_trials(deepcopy=False)
    assert trials[1].state == TrialState.COMPLETE and trials[1].user_attrs["lost_ray_trial_ids"] == ["b"]
    assert trials[2].state == TrialState.COMPLETE and trials[2].user_attrs["duplicate_of"] == 1
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert fresh.events["adopted"] == 1


def params_of(searcher, number):
    return dict(searcher.study.get_trials(deepcopy=False)[number].params)
