"""OptunaSearcher driven directly (no Ray runtime): every Optuna trial is told exactly once."""

from __future__ import annotations

import math
import pickle

import pytest
import yaml
from optuna.trial import TrialState
from ray.tune.search import Searcher

from granq_search.search.resume import INTERRUPTED_REASON, LOST_REASON, close_running_trials, replayable_results
from granq_search.search.searcher import OptunaSearcher, params_key
from granq_search.search.space import load_space
from granq_search.search.study import open_study


def make_space(tmp_path, parameters=None, **extra):
    doc = {
        "base": "digits",
        "fidelity": {"train.epochs": 4, "train.warmup_epochs": 1, "train.iters_per_epoch": 2},
        "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
        "parameters": parameters or {
            "quant.act.bits": {"type": "categorical", "choices": [3, 4]},
            "quant.weight.bits": {"type": "categorical", "choices": [3, 4]},
        },
        "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2},
        **extra,
    }
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(doc))
    return load_space(p)


def searcher_for(tmp_path, space, **kw):
    return OptunaSearcher(space, journal_path=str(tmp_path / "optuna.journal"), study_name="s", **kw)


def final(val_drop, bitops, **more):
    return {"final": 1.0, "val_drop": val_drop, "bitops": bitops, "epoch": 4, **more}


def states(searcher):
    return [t.state for t in searcher.study.get_trials(deepcopy=False)]


def test_multi_objective_outcomes(tmp_path):
    space = make_space(tmp_path, parameters={"quant.act.threshold": {"type": "float", "low": 0, "high": 1}})
    s = searcher_for(tmp_path, space)
    ids = [f"t{i}" for i in range(6)]
    configs = [s.suggest(i) for i in ids]
    assert all(isinstance(c, dict) and set(c) == {"quant.act.threshold"} for c in configs)
    s.on_trial_complete("t0", final(0.5, 2e7))
    s.on_trial_complete("t1", {"epoch": 2, "val_top1": 90.0, "val_drop": 0.1})   # stopped by ASHA
    s.on_trial_complete("t2", final(math.nan, 2e7))                              # NaN objective
    s.on_trial_complete("t3", None, error=True)                                  # raised
    s.on_trial_complete("t4", {"final": 1.0, "failure_reason": "training diverged", "val_top1": math.nan})
    s.on_trial_complete("t5", final(0.2, 3e7))
    study = s.study
    assert [d.name for d in study.directions] == ["MINIMIZE", "MINIMIZE"]
    assert states(s) == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.FAIL,
                         TrialState.FAIL, TrialState.COMPLETE]
    trials = study.trials
    assert "nan" in trials[2].user_attrs["failure_reason"]
    assert trials[4].user_attrs["failure_reason"] == "training diverged"
    assert trials[0].values == [0.5, 2e7]
    best = {t.number for t in study.best_trials}
    assert best == {0, 5} and 1 not in best  # pruned trials never reach the Pareto front
    # a second notification for the same Ray trial adds nothing
    s.on_trial_complete("t0", final(9.0, 9e9))
    assert len(study.trials) == 6 and study.trials[0].values == [0.5, 2e7]


def test_missing_objective_is_fail_not_running(tmp_path):
    s = searcher_for(tmp_path, make_space(tmp_path))
    s.suggest("a")
    s.on_trial_complete("a", {"final": 1.0, "val_drop": 0.3})  # bitops missing
    assert states(s) == [TrialState.FAIL]
    assert "bitops" in s.study.trials[0].user_attrs["failure_reason"]


def test_duplicates_are_not_trained_twice(tmp_path):
    space = make_space(tmp_path)  # 2 x 2 = 4 distinct configurations
    s = searcher_for(tmp_path, space, max_retries=30)
    trained = []
    for i in range(10):
        cfg = s.suggest(f"t{i}")
        if cfg == Searcher.FINISHED:
            break
        assert cfg is not None
        trained.append(params_key(cfg))
        s.on_trial_complete(f"t{i}", final(float(i), 1e7 * (i + 1)))
    assert len(trained) == len(set(trained)) == 4          # each configuration trained once
    assert cfg == Searcher.FINISHED                        # then the space is exhausted
    study = s.study
    assert study.user_attrs.get("exhausted") is True
    dups = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert dups and s.events["duplicates"] == len(dups)
    for t in dups:  # a duplicate gets its original's outcome, never RUNNING
        original = study.trials[t.user_attrs["duplicate_of"]]
        assert t.state == original.state and t.values == original.values
        assert t.params == original.params
    assert TrialState.RUNNING not in states(s)


def test_duplicate_of_running_trial_waits_for_it(tmp_path):
    space = make_space(tmp_path, parameters={"quant.act.bits": {"type": "categorical", "choices": [4]},
                                             "train.seed": {"type": "int", "low": 0, "high": 1}})
    s = searcher_for(tmp_path, space, max_retries=20)
    first = s.suggest("a")
    second = s.suggest("b")
    assert params_key(first) != params_key(second)
    third = s.suggest("c")  # only duplicates of the two running trials are left
    assert third == Searcher.FINISHED
    deferred = [t for t in s.study.trials if t.state == TrialState.RUNNING and "duplicate_of" in t.user_attrs]
    assert deferred and s.events["deferred"] == len(deferred)
    s.on_trial_complete("a", final(0.1, 1e7))
    s.on_trial_complete("b", {"epoch": 2})
    for t in s.study.trials:
        assert t.state != TrialState.RUNNING
        if "duplicate_of" in t.user_attrs:
            assert t.state == s.study.trials[t.user_attrs["duplicate_of"]].state


def test_concurrency_limit_and_pickling(tmp_path):
    s = searcher_for(tmp_path, make_space(tmp_path))
    assert s.set_max_concurrency(1) is True  # Ray's ConcurrencyLimiter then passes everything through
    assert isinstance(s.suggest("a"), dict)
    assert s.suggest("b") is None
    clone = pickle.loads(pickle.dumps(s))  # Ray pickles the searcher into tuner.pkl
    assert clone._study is None and clone._live == {"a": 0}
    s.on_trial_complete("a", final(0.1, 1e7))
    assert isinstance(s.suggest("b"), dict)


def test_save_restore_reconciles_lost_trials(tmp_path):
    space = make_space(tmp_path, parameters={"quant.act.threshold": {"type": "float", "low": 0, "high": 1}})
    s = searcher_for(tmp_path, space)
    s.suggest("a")
    s.suggest("b")
    s.on_trial_complete("a", final(0.1, 1e7))
    s.save(str(tmp_path / "state.json"))
    lost = s.suggest("c")  # asked after the last save: no restored Ray trial knows it
    # the driver dies here; a new driver restores
    fresh = pickle.loads(pickle.dumps(searcher_for(tmp_path, space)))
    fresh.restore(str(tmp_path / "state.json"))
    trials = fresh.study.trials
    assert trials[1].state == TrialState.RUNNING          # 'b' is resumed by Ray
    assert trials[2].state == TrialState.RUNNING and fresh._orphans == [2]  # adopted by the next Ray trial
    fresh.on_trial_complete("b", final(0.2, 2e7))
    assert fresh.study.trials[1].state == TrialState.COMPLETE
    assert fresh.suggest("d") == lost                     # same parameters, same Optuna trial
    adopted = fresh.study.trials[2]
    assert adopted.user_attrs["ray_trial_id"] == "d" and adopted.user_attrs["lost_ray_trial_ids"] == ["c"]
    fresh.on_trial_complete("d", final(0.3, 1e7))
    assert fresh.study.trials[2].state == TrialState.COMPLETE and len(fresh.study.trials) == 3
    assert TrialState.RUNNING not in states(fresh) and LOST_REASON not in str(fresh.study.trials)
    # the reopened sampler does not replay the first proposals
    again = fresh.suggest("e")
    assert params_key(again) not in {params_key(t.params) for t in fresh.study.trials[:3]}


def test_interrupted_trial_finishing_after_resume_gets_a_new_record(tmp_path):
    space = make_space(tmp_path, parameters={"quant.act.threshold": {"type": "float", "low": 0, "high": 1}})
    s = searcher_for(tmp_path, space)
    s.suggest("a")
    s.save(str(tmp_path / "state.json"))
    # end of an interrupted search: nothing may stay RUNNING
    assert close_running_trials(str(tmp_path / "optuna.journal"), "s") == 1
    study, _ = open_study(space, str(tmp_path / "optuna.journal"), "s")
    assert study.trials[0].state == TrialState.FAIL
    assert study.trials[0].user_attrs["failure_reason"] == INTERRUPTED_REASON
    resumed = searcher_for(tmp_path, space)
    resumed.restore(str(tmp_path / "state.json"))
    resumed.on_trial_complete("a", final(0.3, 1e7))
    trials = resumed.study.trials
    assert len(trials) == 2 and trials[1].state == TrialState.COMPLETE
    assert trials[1].user_attrs["resumed_from"] == 0 and trials[1].params == trials[0].params
    assert [t.number for t in resumed.study.best_trials] == [1]
    # an interrupted configuration may be proposed and trained again: it is not a known result
    assert resumed._finished_twin(params_key(trials[0].params), exclude=-1) == 1


def test_initial_points_are_enqueued_once(tmp_path):
    space = make_space(tmp_path, initial_points=[{"quant.act.bits": 3, "quant.weight.bits": 3},
                                                 {"quant.act.bits": 4, "quant.weight.bits": 4}])
    open_study(space, str(tmp_path / "optuna.journal"), "s", create=True)
    open_study(space, str(tmp_path / "optuna.journal"), "s", create=True)  # reopening enqueues nothing
    s = searcher_for(tmp_path, space)
    assert s.suggest("a") == {"quant.act.bits": 3, "quant.weight.bits": 3}
    assert s.suggest("b") == {"quant.act.bits": 4, "quant.weight.bits": 4}
    assert sum(1 for t in s.study.trials if t.user_attrs.get("initial_point")) == 2


def _journal_study(journal, name="s"):
    """The study as an outside reader (optuna-dashboard, a notebook) opens it: the journal file alone."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal))))


def test_study_carries_its_objective_names(tmp_path):
    journal = tmp_path / "optuna.journal"
    space = make_space(tmp_path)
    s = searcher_for(tmp_path, space)
    s.suggest("a")
    s.on_trial_complete("a", final(0.5, 2e7))
    study = _journal_study(journal)
    assert study.metric_names == ["val_drop", "bitops"] == space.metrics
    frame = study.trials_dataframe(multi_index=True)
    assert list(frame["values"].columns) == ["val_drop", "bitops"]  # what Optuna's tables and plots show
    size = journal.stat().st_size
    open_study(space, str(journal), "s")  # reopened (the driver, --resume): nothing written again
    assert journal.stat().st_size == size


def test_study_of_an_older_version_gets_its_names_on_resume(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "optuna.journal"
    space = make_space(tmp_path, objectives=[{"metric": "val_top1", "mode": "max"},
                                             {"metric": "size_bits", "mode": "min"}])
    optuna.create_study(storage=JournalStorage(JournalFileBackend(str(journal))), study_name="s",
                        directions=space.directions)
    assert _journal_study(journal).metric_names is None
    open_study(space, str(journal), "s")
    assert _journal_study(journal).metric_names == ["val_top1", "size_bits"]


def test_directions_mismatch_is_refused(tmp_path):
    space = make_space(tmp_path)
    open_study(space, str(tmp_path / "optuna.journal"), "s", create=True)
    other = make_space(tmp_path, objectives=[{"metric": "val_top1", "mode": "max"}])
    with pytest.raises(Exception, match="optimises"):
        open_study(other, str(tmp_path / "optuna.journal"), "s")


def test_invalid_combination_and_budget_are_told_before_training(tmp_path):
    space = make_space(
        tmp_path,
        parameters={"loss.lambda_l": {"type": "categorical", "choices": [0.1, 0.6]},
                    "loss.lambda_u": {"type": "categorical", "choices": [0.5, 0.8]},
                    "quant.act.bits": {"type": "categorical", "choices": [3, 8]}},
        constraints={"bitops": 3.0e7},
        initial_points=[{"loss.lambda_l": 0.1, "loss.lambda_u": 0.8, "quant.act.bits": 8}],  # over budget
    )
    calls = []

    def cost(cfg):
        calls.append(cfg.quant.act.bits)
        return {"bitops": 1.0e7 * cfg.quant.act.bits, "size_bits": 1.0}

    s = searcher_for(tmp_path, space, cost_fn=cost, max_retries=40)
    trained = []
    for i in range(10):
        cfg = s.suggest(f"t{i}")
        if cfg == Searcher.FINISHED:
            break
        trained.append(params_key(cfg))
        s.on_trial_complete(f"t{i}", final(0.1 * i, 1.0e7 * cfg["quant.act.bits"]))
    valid_and_cheap = {params_key({"loss.lambda_l": a, "loss.lambda_u": b, "quant.act.bits": 3})
                       for a, b in ((0.1, 0.5), (0.1, 0.8), (0.6, 0.8))}
    assert set(trained) == valid_and_cheap and len(trained) == 3
    trials = s.study.trials
    assert trials[0].state == TrialState.PRUNED and "bitops" in trials[0].user_attrs["infeasible"]
    assert trials[0].constraints == {"bitops": pytest.approx(8 / 3 - 1)}
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["failure_reason"].startswith("invalid config") or "duplicate_of" in t.user_attrs
        if t.state == TrialState.COMPLETE:
            assert t.constraints["bitops"] <= 0
    assert s.events["invalid"] >= 1 and s.events["infeasible"] >= 1
    assert {t.number for t in s.study.best_trials} <= {t.number for t in trials if t.constraints.get("bitops", 1) <= 0}


def test_replayable_results_are_trials_ended_for_good(tmp_path):
    space = make_space(tmp_path, parameters={"quant.act.threshold": {"type": "float", "low": 0, "high": 1}})
    s = searcher_for(tmp_path, space)
    for i in range(5):
        s.suggest(f"t{i}")
    ray_noise = {"trial_id": "t0", "training_iteration": 4, "time_total_s": 1.0, "config": {"a": 1},
                 "sites_json": "[]", "node_ip": "1.2.3.4"}
    s.on_trial_complete("t0", {**final(0.1, 1e7), **ray_noise})
    s.on_trial_complete("t1", {"epoch": 2, "val_top1": 50.0})                     # pruned
    s.on_trial_complete("t2", {"final": 1.0, "failure_reason": "training diverged", "val_top1": 10.0})
    s.on_trial_complete("t3", None, error=True)                                   # may succeed next time
    s.save(str(tmp_path / "state.json"))
    close_running_trials(str(tmp_path / "optuna.journal"), "s")                   # t4: interrupted
    replay = replayable_results(space, str(tmp_path / "optuna.journal"), "s")
    assert set(replay) == {"t0", "t1", "t2"}
    assert replay["t0"] == {"final": 1.0, "val_drop": 0.1, "bitops": 1e7, "epoch": 4}  # no Ray keys
    assert replay["t1"] == {"epoch": 2, "val_top1": 50.0}
    assert replay["t2"]["failure_reason"] == "training diverged"
