"""Persistent ASHA (rung records survive a restart) and the Ray reporter's contract."""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.tune.schedulers import TrialScheduler

from granq_search.search.report import RayReporter, scalar_metrics
from granq_search.search.scheduler import PersistentASHA, asha_for
from granq_search.search.space import load_space


def trial(tid: str):
    return SimpleNamespace(trial_id=tid)


def asha(path: Path) -> PersistentASHA:
    return PersistentASHA(path, time_attr="epoch", metric="val_top1", mode="max", max_t=8, grace_period=2,
                          reduction_factor=2)


def test_restored_scheduler_decides_like_the_original(tmp_path):
    state = tmp_path / "scheduler_state.json"
    original = asha(state)
    stale = pickle.dumps(original)  # what Tuner.restore unpickles from tuner.pkl: the state before any trial
    for i, acc in enumerate([50.0, 60.0, 70.0, 80.0]):
        original.on_trial_add(None, trial(f"t{i}"))
        original.on_trial_result(None, trial(f"t{i}"), {"epoch": 2, "val_top1": acc})
    saved = json.loads(state.read_text())
    assert saved["brackets"][0][-1][0] == 2 and len(saved["brackets"][0][-1][1]) == 4
    text = state.read_text()

    for result, want in (({"epoch": 2, "val_top1": 55.0}, TrialScheduler.STOP),
                         ({"epoch": 2, "val_top1": 79.0}, TrialScheduler.CONTINUE)):
        ref = copy.deepcopy(original)
        ref.on_trial_add(None, trial("new"))
        assert ref.on_trial_result(None, trial("new"), dict(result)) == want
        for restored in (pickle.loads(stale), asha(state)):  # unpickled stale copy, or built anew
            state.write_text(text)
            restored.on_trial_add(None, trial("new"))
            assert restored.on_trial_result(None, trial("new"), dict(result)) == want
    # without the file (all Ray restores by itself) the weak trial would have passed the rung
    empty = asha(tmp_path / "elsewhere.json")
    empty.on_trial_add(None, trial("new"))
    assert empty.on_trial_result(None, trial("new"), {"epoch": 2, "val_top1": 55.0}) == TrialScheduler.CONTINUE


def test_failure_report_without_epoch_takes_no_decision(tmp_path):
    s = asha(tmp_path / "s.json")
    s.on_trial_add(None, trial("a"))
    assert s.on_trial_result(None, trial("a"), {"final": 1.0, "failure_reason": "x", "val_top1": math.nan}) == \
        TrialScheduler.CONTINUE
    s.on_trial_complete(None, trial("a"), {"final": 1.0, "val_top1": math.nan})
    s.on_trial_error(None, trial("b"))  # unknown trial: no error


def test_asha_for_space(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": {"train.epochs": 6, "train.warmup_epochs": 2},
        "objectives": [{"metric": "val_drop", "mode": "min"}],
        "parameters": {"quant.act.threshold": {"type": "float", "low": 0, "high": 1}},
        "scheduler": {"type": "asha", "reduction_factor": 3, "grace_period": 1}}))
    sched = asha_for(load_space(p), tmp_path / "state.json")
    assert sched._time_attr == "epoch" and sched._metric == "val_top1" and sched._mode == "max"
    assert sched._max_t == 6 and sched._brackets[0]._rungs[-1][0] == 3  # warm-up 2 + grace 1
    p.write_text(p.read_text().replace("type: asha", "type: none").replace("reduction_factor: 3\n", "")
                 .replace("grace_period: 1", ""))
    assert asha_for(load_space(p), tmp_path / "state.json") is None


# --------------------------------------------------------------------------- reporter


def test_reporter_holds_back_the_last_epoch(tmp_path):
    sent = []
    r = RayReporter(3, extra={"node_id": "n1"}, report=lambda m, c: sent.append((m, c)))
    ckpt = tmp_path / "last.pt"
    for epoch in range(3):
        r.on_epoch_end(epoch, {"epoch": epoch + 1, "val_top1": 90.0 + epoch, "val_drop": 8.0 - epoch,
                               "warmup": epoch == 0}, ckpt)
    assert len(sent) == 2 and all(c == tmp_path for _, c in sent)
    assert sent[0][0]["warmup"] == 1.0 and "final" not in sent[0][0]
    r.on_end({"val_top1": 92.0, "val_drop": 5.5, "test_top1": 91.0, "bitops": 1e7, "history": [{}],
              "granularity_sites": [{"site": "relu", "granularity": "per_tensor"}], "stopped_early": False,
              "efficiency": {"x": 1}})
    last, ckpt_dir = sent[-1]
    assert len(sent) == 3 and ckpt_dir == tmp_path
    assert last["epoch"] == 3 and last["final"] == 1.0 and last["val_drop"] == 5.5  # best-based drop wins
    assert last["node_id"] == "n1" and last["stopped_early"] == 0.0
    assert json.loads(last["sites_json"])[0]["site"] == "relu"
    assert "history" not in last and "granularity_sites" not in last and "efficiency" not in last


def test_reporter_failure_and_resume_after_last_epoch():
    sent = []
    r = RayReporter(2, report=lambda m, c: sent.append(m))
    r.on_epoch_end(0, {"epoch": 1, "val_top1": 80.0}, None)
    r.report_failure("training diverged:\n  the loss is nan")
    assert sent[-1] == {"final": 1.0, "failure_reason": "training diverged: the loss is nan", "val_top1": 80.0}
    sent.clear()
    r = RayReporter(2, report=lambda m, c: sent.append(m))
    r.on_end({"val_drop": 1.0, "history": [{"epoch": 2, "val_top1": 97.0}]})  # nothing left to train
    assert sent == [{"epoch": 2, "val_top1": 97.0, "val_drop": 1.0, "final": 1.0}]


def test_scalar_metrics_filter():
    import torch

    out = scalar_metrics({"a": 1, "b": True, "c": torch.tensor(2.5), "d": [1], "e": {"x": 1}, "f": "s" * 600,
                          "g": "short", "history": 1.0})
    assert out == {"a": 1, "b": 1.0, "c": 2.5, "g": "short"}
    assert pytest.approx(out["c"]) == 2.5


# --------------------------------------------------------------------------- replay after a killed driver


def test_replay_finished(monkeypatch):
    from ray import tune

    from granq_search.search.trainable import replay_finished

    found = {"aaa": {"epoch": 4, "val_top1": 91.0, "val_drop": 1.0, "final": 1.0}}
    sent = []
    monkeypatch.setattr(tune, "report", lambda metrics, **kw: sent.append(metrics))
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "aaa"))
    assert replay_finished(found) is True
    assert sent == [{"epoch": 4, "val_top1": 91.0, "val_drop": 1.0, "final": 1.0, "replayed": 1.0}]
    monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "bbb"))
    assert replay_finished(found) is False and replay_finished({}) is False and len(sent) == 1


# ---------------------------------------------------------------------------- validation epochs

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"


def test_rungs_match_rays_asha_and_trials_validate_only_there(tmp_path):
    from granq_search.search.scheduler import eval_epochs, rung_epochs

    for name, rungs in (("digits", [2, 4]), ("cifar10_resnet20_cpu", [2, 4])):
        space = load_space(SPACES_DIR / f"{name}.yaml")
        assert rung_epochs(space) == rungs, name
        sched = asha_for(space, tmp_path / f"{name}.json")
        assert sorted(int(m) for m, _ in sched._brackets[0]._rungs) == rungs  # Ray's own milestones
        assert eval_epochs(space) == sorted(set(rungs) | {space.asha_max_t})
    cpu = load_space(SPACES_DIR / "cifar10_resnet20_cpu.yaml")
    assert eval_epochs(cpu) == [2, 4, 6]
    # a pinned warm-up moves the grace period, and so the rungs
    pinned = load_space(SPACES_DIR / "cifar10_resnet20_cpu.yaml", {"train.warmup_epochs": 0})
    assert rung_epochs(pinned) == [1, 2, 4]


def test_no_scheduler_validates_every_epoch(tmp_path):
    from granq_search.search.scheduler import eval_epochs

    doc = yaml.safe_load((SPACES_DIR / "digits.yaml").read_text())
    doc["scheduler"] = {"type": "none"}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert eval_epochs(load_space(p)) is None


def test_reports_without_validation_leave_asha_undecided(tmp_path):
    space = load_space(SPACES_DIR / "digits.yaml")
    sched = asha_for(space, tmp_path / "state.json")
    trial = SimpleNamespace(trial_id="t1")
    sched.on_trial_add(None, trial)
    # epoch 2 is a rung, but a report without val_top1 cannot be judged: ASHA continues
    assert sched.on_trial_result(None, trial, {"epoch": 2, "bitops": 1.0}) == TrialScheduler.CONTINUE
    assert all("t1" not in rec for _, rec in sched._brackets[0]._rungs)


# ---------------------------------------------------------------------------- Pareto rungs


def test_pareto_order_fronts_then_crowding():
    from granq_search.search.scheduler import pareto_order

    # (val_top1, -bitops): a, b, c, d form the front; e is dominated by b; f by everyone
    pts = {"a": (80.0, -9.0), "b": (78.0, -6.0), "c": (77.0, -5.0), "d": (70.0, -3.0), "e": (77.5, -6.0),
           "f": (60.0, -9.0)}
    order = pareto_order(pts)
    assert set(order[:4]) == {"a", "b", "c", "d"} and order[:2] == ["a", "d"]  # the extremes first
    assert order[4:] == ["e", "f"]


def test_pareto_continues_keeps_cheap_points_that_accuracy_alone_would_stop():
    from granq_search.search.scheduler import pareto_continues

    recorded = {"w4": (80.0, -7.0e8), "w4b": (79.5, -7.0e8), "w5": (80.5, -9.0e8)}
    cheap = (78.0, -4.0e8)  # below the accuracy median, but the only 3-bit point: on the front
    assert pareto_continues(recorded, "w3", cheap, 2.0)
    assert not pareto_continues(recorded, "w4c", (79.0, -7.0e8), 2.0)  # dominated at its own cost
    # one cost level: the same decision as classic ASHA (top half by accuracy)
    same = {"t1": (80.0, -1.0), "t2": (70.0, -1.0), "t3": (75.0, -1.0)}
    assert pareto_continues(same, "t4", (76.0, -1.0), 2.0) and not pareto_continues(same, "t4", (72.0, -1.0), 2.0)


def test_pareto_asha_in_a_search_space(tmp_path):
    space = load_space(SPACES_DIR / "cifar10_resnet20_cpu.yaml")
    assert space.scheduler.rank_by == "pareto" and space.scheduler.costs == (("bitops", "min"),)
    sched = asha_for(space, tmp_path / "state.json")
    trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
    for t in trials:
        sched.on_trial_add(None, t)
    res = lambda val, bitops: {"epoch": 2, "val_top1": val, "bitops": bitops}  # noqa: E731
    assert sched.on_trial_result(None, trials[0], res(80.0, 7e8)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[1], res(81.0, 9e8)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, trials[2], res(77.0, 4e8)) == TrialScheduler.CONTINUE  # cheapest
    assert sched.on_trial_result(None, trials[3], res(76.0, 9e8)) == TrialScheduler.STOP  # dominated
    # the rung records survive a restart (points, not scalars)
    again = asha_for(space, tmp_path / "state.json")
    again.on_trial_add(None, SimpleNamespace(trial_id="t9"))
    assert again.on_trial_result(None, SimpleNamespace(trial_id="t9"), res(75.0, 9.5e8)) == TrialScheduler.STOP
    # the digits space keeps classic ASHA unless asked: its objectives are val_drop and bitops
    assert load_space(SPACES_DIR / "digits.yaml").scheduler.rank_by == "pareto"
