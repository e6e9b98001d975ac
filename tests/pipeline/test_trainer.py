import json
import math

import pytest
import torch

from granq_search.cli.main import main
from granq_search.config import load_config, with_overrides
from granq_search.pipeline.reporter import Reporter
from granq_search.pipeline.schedule import lr_factor
from granq_search.pipeline.trainer import TrainingDiverged, build_setup, run_training

TINY = {
    "train.epochs": 3, "train.warmup_epochs": 1, "train.iters_per_epoch": 3, "train.batch_size": 16,
    "data.max_samples": 200, "generator.channels": 16,
}


@pytest.fixture(scope="module")
def setup():
    cfg = with_overrides(load_config("digits"), TINY)
    return build_setup(cfg, "cpu")


def test_training_runs_and_selects_on_validation(setup):
    result = run_training(setup.cfg, setup=setup)
    m = result.metrics
    assert m["epochs_run"] == 3 and len(m["history"]) == 3
    assert m["best_val_top1"] == max(h["val_top1"] for h in m["history"])
    assert m["best_epoch"] == 1 + max(range(3), key=lambda i: (m["history"][i]["val_top1"], -i))
    assert m["teacher_val_top1"] > 90
    assert math.isclose(m["val_drop"], m["teacher_val_top1"] - m["best_val_top1"])
    assert m["bitops"] < m["bitops_fp"] and m["size_bits"] < m["size_bits_fp"]
    assert m["history"][0]["warmup"] == 1.0 and m["history"][0]["s_loss"] == 0.0
    assert m["history"][1]["warmup"] == 0.0


class _Crash(Reporter):
    class Boom(Exception):
        pass

    def __init__(self, after_epoch):
        self.after = after_epoch

    def on_epoch_end(self, epoch, metrics, checkpoint):
        if epoch == self.after:
            raise self.Boom()


def test_resume_reaches_same_metrics(setup, tmp_path):
    ref = run_training(setup.cfg, setup=setup, checkpoint_dir=tmp_path / "a")
    with pytest.raises(_Crash.Boom):
        run_training(setup.cfg, setup=setup, checkpoint_dir=tmp_path / "b", reporter=_Crash(1))
    resumed = run_training(setup.cfg, setup=setup, checkpoint_dir=tmp_path / "b", resume=True)
    for key in ("val_top1", "test_top1", "best_val_top1", "best_test_top1", "best_epoch"):
        assert resumed.metrics[key] == ref.metrics[key], key
    a, b = ref.student.state_dict(), resumed.student.state_dict()
    for k in a:  # bit-identical, NaN placeholders (unused ratios) included
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)
    assert [h["val_top1"] for h in resumed.metrics["history"]] == [h["val_top1"] for h in ref.metrics["history"]]


def test_diverging_config_raises(setup):
    cfg = with_overrides(setup.cfg, {"optim.student.lr": 1e30, "optim.student.nesterov": False,
                                     "optim.student.momentum": 0.0, "loss.student_loss": "kl"})
    with pytest.raises(TrainingDiverged, match="diverged"):
        run_training(cfg, setup=setup)


def test_schedules():
    cfg = load_config("digits")
    cos = with_overrides(cfg, {"optim.schedule": "cosine"})
    assert lr_factor(cos.optim, cos.train, 0, 0, student=False) == 1.0
    assert lr_factor(cos.optim, cos.train, cos.train.warmup_epochs, 0, student=True) == 1.0
    assert lr_factor(cos.optim, cos.train, cos.train.epochs - 1, cos.train.iters_per_epoch, student=True) < 1e-9
    ms = with_overrides(cfg, {"optim.schedule": "multistep", "optim.milestones": [2, 4], "optim.lr_decay": 0.1})
    assert [round(lr_factor(ms.optim, ms.train, e, 0, student=True), 6) for e in (0, 1, 2, 3, 4, 5)] == \
        [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_train_command_writes_run(tmp_path, capsys):
    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    rc = main(["train", "--config", "digits", *sets, "--output-dir", str(out), "--no-progress", "--format", "json",
               "--no-tracking"])  # the MLflow record has its own tests (tests/tracking/test_tracking_train_run.py)
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["epochs_run"] == 3
    for name in ("config.yaml", "metrics.jsonl", "final.json", "student_best.pt", "student_final.pt",
                 "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert load_config(str(out / "config.yaml")).model.mean is not None  # resolved normalisation recorded
    rc = main(["train", "--config", "digits", "--output-dir", str(out)])
    assert rc == 2 and "not empty" in capsys.readouterr().err


def test_train_bad_config_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    rc = main(["train", "--set", "quant.act.bits=9", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "quant.act.bits" in err
    assert not out.exists()


# ---------------------------------------------------------------------------- evaluation cost


class _Stop(Reporter):
    def __init__(self, after_epoch):
        self.after = after_epoch

    def on_epoch_end(self, epoch, metrics, checkpoint):
        if epoch == self.after:
            from granq_search.pipeline.reporter import StopTraining

            raise StopTraining()


def test_eval_epochs_validate_only_where_asked(setup):
    cfg = with_overrides(setup.cfg, {"train.epochs": 4})
    full = run_training(cfg, setup=setup).metrics
    sparse = run_training(cfg, setup=setup, eval_epochs=[2], measure_ptq=False).metrics
    assert [("val_top1" in h) for h in sparse["history"]] == [False, True, False, True]  # + the last epoch
    # same training either way: the evaluated epochs agree with the every-epoch run
    assert [full["history"][i]["val_top1"] for i in (1, 3)] == [sparse["history"][i]["val_top1"] for i in (1, 3)]
    assert sparse["best_epoch"] in (2, 4) and sparse["best_val_top1"] == max(full["history"][i]["val_top1"]
                                                                             for i in (1, 3))
    assert sparse["val_top1"] == full["val_top1"] and sparse["test_top1"] == full["test_top1"]
    assert "ptq_val_top1" in full and "ptq_val_top1" not in sparse
    assert sparse["eval_time_s"] > 0 and all(h["epoch_train_time_s"] <= h["epoch_time_s"] for h in sparse["history"])


def test_stopped_run_is_not_tested(setup):
    m = run_training(setup.cfg, setup=setup, reporter=_Stop(1)).metrics
    assert m["stopped_early"] is True and m["epochs_run"] == 2
    assert "best_test_top1" not in m and "test_top1" not in m and "test_drop" not in m
    assert math.isfinite(m["val_drop"])


def test_teacher_metrics_from_the_caller_are_used():
    from granq_search.pipeline.trainer import TeacherMetrics

    cfg = with_overrides(load_config("digits"), TINY)
    given = TeacherMetrics({"top1": 12.5, "top5": 50.0, "loss": 1.0}, {"top1": 25.0, "top5": 60.0, "loss": 1.0},
                           latency_ms=3.25)
    s = build_setup(cfg, "cpu", teacher_metrics=TeacherMetrics.from_dict(given.to_dict()))
    assert s.teacher_val["top1"] == 12.5 and s.teacher_test["top1"] == 25.0  # not evaluated again
    m = run_training(s.cfg, setup=s, eval_epochs=[]).metrics
    assert m["teacher_val_top1"] == 12.5 and m["latency_fp_ms"] == 3.25
    assert m["val_drop"] == pytest.approx(12.5 - m["best_val_top1"])
