"""Conventions of the record: the store and experiment from flags or the environment, readable trial
run names that survive --resume, the space's parameters as leaderboard columns."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import pickle
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from granq_search.cli import main as cli_main
from granq_search.config import with_overrides
from granq_search.search.space import load_space
from granq_search.tracking import format_leaderboard, load_runs
from granq_search.tracking.callback import SearchRecorder
from granq_search.tracking.names import run_name, short_labels, short_value, trial_label
from granq_search.tracking.schema import TAG
from tracking_helpers import OBJECTIVES, FakeTrial, epoch_result, make_hand_made_search, runs_of

REPO = Path(__file__).resolve().parents[2]
DIGITS_SPACE = REPO / "search_spaces" / "digits.yaml"


def cli(argv, monkeypatch):
    available = {k: v for k, v in cli_main.COMMANDS.items() if importlib.util.find_spec(v) is not None}
    monkeypatch.setattr(cli_main, "COMMANDS", available)
    monkeypatch.delenv("GRANQ_DEBUG", raising=False)
    return cli_main.main(argv)


# ----------------------------------------------------------------------------- store and experiment


@pytest.fixture
def env_store(tmp_path, _template_db, monkeypatch):
    """A store holding search 'hand' in experiment 'team_x', named only by the environment."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    shutil.copy(_template_db, d / "team.db")
    uri = f"sqlite:///{d / 'team.db'}"
    make_hand_made_search(uri, "hand", experiment="team_x", with_space=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team_x")
    return uri


def test_leaderboard_and_export_read_the_environment_store_without_flags(env_store, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "runs" / "search"  # no store here: the environment names the one to read
    assert cli(["leaderboard", "--output-dir", str(out_dir), "--format", "json"], monkeypatch) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["search"] == "hand" and doc["experiment"] == "team_x" and doc["tracking_uri"] == env_store
    assert captured.err == f"read MLflow {env_store} (MLFLOW_TRACKING_URI), experiment 'team_x' " \
        "(MLFLOW_EXPERIMENT_NAME)\n"

    target = tmp_path / "chosen.yaml"
    assert cli(["export", "--output-dir", str(out_dir), "--best", "--output", str(target)], monkeypatch) == 0
    prov = yaml.safe_load(target.read_text())["provenance"]
    assert prov["search"] == "hand" and prov["trial"] == "t1"
    assert prov["tracking_uri"] == env_store and prov["experiment"] == "team_x"
    assert not out_dir.exists()  # nothing created where the flags would have pointed


def test_the_environment_hint_is_only_on_errors_reading_the_store(env_store, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "runs" / "search"
    # a selection error is not the store's doing: no hint about the environment
    assert cli(["export", "--output-dir", str(out_dir), "--max-drop", "0.01"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "no finished trial has val_drop <= 0.01" in err and "chosen by" not in err
    # reading the store is: an unknown search names the variables that chose the store
    assert cli(["export", "--output-dir", str(out_dir), "--search", "nope"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "no search named 'nope'" in err and "(chosen by $MLFLOW_TRACKING_URI and $MLFLOW_EXPERIMENT_NAME;" in err


def test_flags_beat_the_environment(env_store, tmp_path, monkeypatch, capsys, _template_db):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(_template_db, other / "mlflow.db")
    flag_uri = f"sqlite:///{other / 'mlflow.db'}"
    make_hand_made_search(flag_uri, "flagged")  # experiment granq_search
    assert cli(["leaderboard", "--tracking-uri", flag_uri, "--experiment", "granq_search", "--format", "json"],
               monkeypatch) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["search"] == "flagged" and captured.err == ""
    # --experiment alone beats MLFLOW_EXPERIMENT_NAME (the store still comes from the environment)
    assert cli(["leaderboard", "--experiment", "granq_search"], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no searches recorded in") and err.count("\n") == 1
    assert "(chosen by $MLFLOW_TRACKING_URI;" in err
    # --output-dir's default store only when the environment says nothing
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    assert cli(["leaderboard", "--output-dir", str(other), "--format", "json"], monkeypatch) == 0
    assert json.loads(capsys.readouterr().out)["search"] == "flagged"


def test_an_environment_store_that_does_not_exist_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'gone' / 'mlflow.db'}")
    assert cli(["export", "--output-dir", str(tmp_path)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no searches recorded") and err.count("\n") == 1
    assert "chosen by $MLFLOW_TRACKING_URI;" in err
    assert not (tmp_path / "gone").exists()


def test_recorder_experiment_names_where_runs_land(store):
    rec = SearchRecorder(tracking_uri=store, experiment_name="team_y", search_name="s", objectives=OBJECTIVES,
                         retry_interval_s=0.0)
    rec.setup()
    t = FakeTrial("a1", {"quant.act.bits": 3}, experiment_tag="1_x")
    rec.on_trial_start(0, [t], t)
    rec.on_trial_result(0, [t], t, epoch_result(1, 80.0, final=True))
    rec.on_trial_complete(0, [t], t)
    rec.finish()
    assert runs_of(store) == []  # nothing in the default experiment
    assert {r.data.tags[TAG.KIND] for r in runs_of(store, experiment="team_y")} == {"search", "trial"}
    assert load_runs(store, "s", experiment="team_y").experiment == "team_y"


# ----------------------------------------------------------------------------- the space's parameters


def _proposal(tau: float, wb: int, ab: int, alpha: float) -> dict:
    return {"quant.act.threshold": tau, "quant.act.bits": ab, "quant.weight.bits": wb, "optim.student.lr": 1e-3,
            "optim.generator.lr": 2e-3, "loss.alpha_ds": alpha}


def _space_recorder(uri: str, space, name: str = "sp") -> SearchRecorder:
    return SearchRecorder(tracking_uri=uri, search_name=name, objectives=OBJECTIVES, trial_config=space.trial_config,
                          searched=list(space.parameters), retry_interval_s=0.0)


def _run(rec, trial, epochs: int, final: bool) -> None:
    rec.on_trial_start(0, [trial], trial)
    for e in range(1, epochs + 1):
        r = epoch_result(e, 80.0 + e + trial.config["loss.alpha_ds"], final=final and e == epochs,
                         bitops=1e6 * trial.config["quant.act.bits"])
        trial.last_result = r
        rec.on_trial_result(0, [trial], trial, r)


@pytest.fixture
def space():
    return load_space(DIGITS_SPACE)


def test_leaderboard_columns_are_every_searched_parameter(store, space, capsys):
    assert "loss.alpha_ds" in space.parameters
    rec = _space_recorder(store, space)
    rec.setup()
    trials = [FakeTrial("a1", _proposal(0.4, 3, 4, 0.25), experiment_tag="1_x"),
              FakeTrial("b2", _proposal(0.7, 5, 5, 0.75), experiment_tag="2_x"),
              FakeTrial("c3", _proposal(0.1, 3, 3, 0.5), experiment_tag="3_x")]
    for t, final in zip(trials, (True, True, False)):
        _run(rec, t, epochs=2, final=final)
        t.status = "TERMINATED"
        rec.on_trial_complete(0, [t], t)
    rec.on_experiment_end(trials)
    rec.finish()

    board = load_runs(store, "sp")
    assert board.searched == list(space.parameters)
    assert board.params == ["quant.weight.bits", "quant.act.bits", "quant.act.threshold", "optim.student.lr",
                            "optim.generator.lr", "loss.alpha_ds"]
    df = board.df.set_index("trial")
    assert df.loc["a1", "loss.alpha_ds"] == pytest.approx(0.25) and df.loc["b2", "loss.alpha_ds"] == pytest.approx(0.75)
    assert df.loc["a1", "quant.act.threshold"] == pytest.approx(0.4) and df.loc["b2", "quant.weight.bits"] == 5
    for old in ("weight_bits", "act_bits", "threshold", "student_lr"):
        assert old not in board.df.columns

    rows = list(csv.DictReader(io.StringIO(format_leaderboard(board, "csv", all_trials=True))))
    assert {"loss.alpha_ds", "quant.act.threshold", "optim.generator.lr"} <= set(rows[0])
    doc = json.loads(format_leaderboard(board, "json", all_trials=True))
    assert doc["searched"] == list(space.parameters)
    assert {t["trial"]: t["loss.alpha_ds"] for t in doc["trials"]} == {"a1": 0.25, "b2": 0.75, "c3": 0.5}
    assert {t["trial"]: t["run_name"] for t in doc["trials"]}["b2"].startswith("t02 W5A5 ")

    table = format_leaderboard(board, "table")
    header = next(line for line in table.splitlines() if line.startswith("rank"))
    for label in ("W/A", "tau", "lr_S", "lr_G", "alpha_ds"):
        assert label in header.split()
    assert "loss.alpha_ds" not in header  # short labels in the table, explained by the legend
    assert "alpha_ds = loss.alpha_ds" in table and "tau = quant.act.threshold" in table
    row = next(line for line in table.splitlines() if " a1 " in line)
    assert "3/4" in row and "0.25" in row and "0.40" in row

    parent = runs_of(store, kind="search")[0]
    assert json.loads(parent.data.tags[TAG.SEARCHED]) == list(space.parameters)
    for child in runs_of(store, kind="trial"):
        assert json.loads(child.data.tags[TAG.SEARCHED]) == list(space.parameters)


def test_searched_parameters_of_a_record_without_the_tag(store):
    """Searches recorded before granq.searched existed: their proposals say what was searched."""
    rec = SearchRecorder(tracking_uri=store, search_name="old", objectives=OBJECTIVES, retry_interval_s=0.0)
    rec.setup()
    t = FakeTrial("a1", {"loss.alpha_ds": 0.3, "quant.act.bits": 4, "mode": "x"})
    _run(rec, t, epochs=1, final=True)
    rec.on_trial_complete(0, [t], t)
    rec.finish()
    client = MlflowClient(store)
    for run in runs_of(store):
        client.delete_tag(run.info.run_id, TAG.SEARCHED)
    board = load_runs(store, "old")
    assert board.searched == ["loss.alpha_ds", "quant.act.bits"]
    assert "loss.alpha_ds" in board.df.columns


# ----------------------------------------------------------------------------- run names


def test_name_helpers():
    assert trial_label(FakeTrial("abc", experiment_tag="7_quant.act.bits=3")) == "t07"
    assert trial_label(FakeTrial("abc", experiment_tag="112_x")) == "t112"
    assert trial_label(FakeTrial("a1b2c3d4")) == "a1b2c3d4"  # no Ray counter: the trial id
    assert [short_value(v) for v in (0.4, 1e-3, 3.2e-4, 20.0, 0.0, 3, "relu_output", "per_kernel", True)] == \
        ["0.40", "1e-3", "3.2e-4", "20", "0", "3", "relu", "kernel", "true"]
    assert short_labels(["optim.student.lr", "optim.generator.lr", "a.x.lr", "b.x.lr"]) == \
        {"optim.student.lr": "lr_S", "optim.generator.lr": "lr_G", "a.x.lr": "a.x.lr", "b.x.lr": "b.x.lr"}
    cifar = {"quant.act.bits": 3, "quant.weight.bits": 4, "quant.act.placement": "relu_output",
             "quant.act.threshold": 0.4, "quant.weight.granularity": "per_kernel", "loss.alpha_ds": 0.2,
             "train.batch_size": 32}
    assert run_name(FakeTrial("x", cifar, experiment_tag="7_y")) == "t07 W4A3 tau=0.40 relu kernel"
    space = load_space(DIGITS_SPACE)
    trial = FakeTrial("x", _proposal(0.4, 3, 4, 0.25), experiment_tag="1_y")
    assert run_name(trial, space.trial_config(trial.config), list(space.parameters)) == \
        "t01 W3A4 tau=0.40 lr_S=1e-3 lr_G=2e-3"
    # tau only names a trial whose granularity it chooses
    cfg = with_overrides(space.trial_config(trial.config), {"quant.act.granularity": "per_channel"})
    assert run_name(trial, cfg, list(space.parameters)) == "t01 W3A4 lr_S=1e-3 lr_G=2e-3 alpha_ds=0.25"


def test_run_names_survive_resume(store, space):
    rec = _space_recorder(store, space, "res")
    rec.setup()
    done = FakeTrial("a1", _proposal(0.4, 3, 4, 0.25), experiment_tag="1_x")
    running = FakeTrial("b2", _proposal(0.9, 5, 3, 0.5), experiment_tag="2_x")
    _run(rec, done, epochs=2, final=True)
    done.status = "TERMINATED"
    rec.on_trial_complete(0, [done], done)
    _run(rec, running, epochs=1, final=False)  # the driver is killed here
    # a third trial Ray finished while the store was unreachable: no child yet, Ray has its result
    lost = FakeTrial("c3", _proposal(0.2, 4, 4, 0.75), experiment_tag="3_x", status="TERMINATED",
                     last_result=epoch_result(2, 85.0, final=True))
    first_names = {r.data.tags[TAG.TRIAL_ID]: r.info.run_name for r in runs_of(store, kind="trial")}

    resumed = pickle.loads(pickle.dumps(rec))  # Ray's tuner.pkl
    resumed.setup()
    resumed.on_step_begin(0, [done, running, lost])
    _run(resumed, running, epochs=2, final=True)
    running.status = "TERMINATED"
    resumed.on_trial_complete(0, [done, running, lost], running)
    resumed.on_experiment_end([done, running, lost])
    resumed.finish()

    names = {r.data.tags[TAG.TRIAL_ID]: r.info.run_name for r in runs_of(store, kind="trial")}
    assert len(runs_of(store, kind="trial")) == 3
    assert {k: names[k] for k in first_names} == first_names
    assert names == {"a1": "t01 W3A4 tau=0.40 lr_S=1e-3 lr_G=2e-3", "b2": "t02 W5A3 tau=0.90 lr_S=1e-3 lr_G=2e-3",
                     "c3": "t03 W4A4 tau=0.20 lr_S=1e-3 lr_G=2e-3"}
    # the replayed child is named as a fresh recorder names it
    assert names["c3"] == run_name(lost, space.trial_config(lost.config), list(space.parameters))


# ----------------------------------------------------------------------------- the whole search


@pytest.mark.slow
def test_search_records_where_the_environment_says(tmp_path, monkeypatch, capsys):
    """`search` with MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME set and no flags: the runs land in
    that store and experiment (search.json says so), and leaderboard reads them without flags."""
    pytest.importorskip("ray")
    from granq_search.search.runner import run_search

    def tiny_trial(config, *, base_cfg, **_driver_facts):  # local: Ray ships it by value
        from ray import tune

        bits = int(config["quant.act.bits"])
        tune.report({"epoch": 1, "val_top1": 80.0 + bits, "best_val_top1": 80.0 + bits, "val_drop": 10.0 - bits,
                     "bitops": 1e6 * bits, "final": 1.0, "teacher_val_top1": 90.0, "epochs_run": 1.0})

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": {"train.epochs": 1, "train.warmup_epochs": 0, "train.iters_per_epoch": 1},
        "objectives": [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}],
        "parameters": {"quant.act.bits": {"type": "categorical", "choices": [3, 4]},
                       "loss.alpha_ds": {"type": "float", "low": 0.0, "high": 1.0}},
        "initial_points": [{"quant.act.bits": 3, "loss.alpha_ds": 0.2}, {"quant.act.bits": 4, "loss.alpha_ds": 0.6}],
        "scheduler": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}}))
    env_db = tmp_path / "team" / "store.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "team_z")
    out = tmp_path / "runs"
    outcome = run_search(space, name="envs", output_dir=out, num_samples=2, max_concurrent=1, progress=False,
                         trainable=tiny_trial)
    assert outcome.status == "finished" and outcome.experiment == "team_z"
    assert outcome.tracking_uri == f"sqlite:///{env_db}" and not (out / "mlflow.db").exists()
    record = json.loads((out / "envs" / "search.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{env_db}" and record["experiment"] == "team_z"
    trials = runs_of(f"sqlite:///{env_db}", kind="trial", experiment="team_z")
    assert sorted(r.info.run_name for r in trials) == ["t01 W4A3 alpha_ds=0.20", "t02 W4A4 alpha_ds=0.60"]

    capsys.readouterr()
    assert cli(["leaderboard", "--output-dir", str(out), "--format", "json"], monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"] == "envs" and doc["experiment"] == "team_z"
    assert sorted(t["loss.alpha_ds"] for t in doc["trials"]) == [0.2, 0.6]
