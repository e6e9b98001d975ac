"""Export rules on the hand-made search, the written YAML, the CLI's error paths, and on a real
search: the config.yaml a trial's run holds is the config it ran, export is the space's
production_config of the trial's values."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml

from granq_search.cli import main as cli_main
from granq_search.config import ConfigError, from_dict, load_config, split_document, with_overrides
from granq_search.errors import TrackingError
from granq_search.export import export_config, plan_export, select_trial
from granq_search.pipeline.build import resolve_config
from granq_search.search.space import space_from_record, space_from_text
from granq_search.tracking import load_runs
from granq_search.tracking.schema import TAG
from tracking_helpers import OBJECTIVES, hand_space, make_hand_made_search, runs_of


@pytest.fixture(scope="module")
def hand(_template_db, tmp_path_factory):
    """(output dir, uri) of a store holding the hand-made search 'hand' and an empty one."""
    d = tmp_path_factory.mktemp("export_store")
    shutil.copy(_template_db, d / "mlflow.db")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    make_hand_made_search(uri, "hand", with_space=True)
    make_hand_made_search(uri, "noconf", with_configs=False, start_offset_ms=-60_000, with_space=True)
    make_hand_made_search(uri, "empty", trials={}, start_offset_ms=-120_000, with_space=True)
    return d, uri


@pytest.fixture(scope="module")
def df(hand):
    return load_runs(hand[1], "hand").df


def cli(argv, monkeypatch):
    """Run the real entry point, with only the commands that exist in this checkout."""
    available = {k: v for k, v in cli_main.COMMANDS.items() if importlib.util.find_spec(v) is not None}
    monkeypatch.setattr(cli_main, "COMMANDS", available)
    monkeypatch.delenv("GRANQ_DEBUG", raising=False)
    return cli_main.main(argv)


@pytest.mark.parametrize("rule, kw, expected", [
    ("best", {}, "t1"),
    ("knee", {}, "t3"),
    ("max_drop", {"max_drop": 1.0}, "t2"),
    ("max_drop", {"max_drop": 2.0}, "t3"),
    ("max_drop", {"max_drop": 100.0}, "t4"),
    ("trial", {"trial": "t5"}, "t5"),
    ("trial", {"trial": "p1"}, "p1"),  # a named pruned trial may be exported
])
def test_selection_rules(df, rule, kw, expected):
    assert select_trial(df, rule, objectives=OBJECTIVES, **kw)["trial"] == expected


def test_selection_errors(df):
    with pytest.raises(TrackingError, match=r"no finished trial has val_drop <= 0.1 points; the smallest drop "
                                            r"is 0.50 \(trial t1\)"):
        select_trial(df, "max_drop", max_drop=0.1)
    with pytest.raises(TrackingError, match=r"trial f1 failed \(TrainingDiverged"):
        select_trial(df, "trial", trial="f1")
    with pytest.raises(TrackingError, match="no trial 'zz'"):
        select_trial(df, "trial", trial="zz")
    pruned_only = df[df["status"] != "finished"]
    with pytest.raises(TrackingError, match=r"no finished trial to export \(1 pruned, 1 failed\)"):
        select_trial(pruned_only, "best")


def test_knee_with_fewer_than_three_front_points_is_the_best(df):
    two = df[df["trial"].isin(["t1", "t4", "p1"])].drop(columns=["pareto"])
    assert select_trial(two, "knee", objectives=OBJECTIVES)["trial"] == "t1"


def test_export_writes_production_config_with_provenance(hand, tmp_path):
    out = tmp_path / "deep" / "best.yaml"
    path = export_config(hand[1], "hand", "knee", output=out)
    assert path == out and out.is_file() and not list(out.parent.glob("*.tmp"))
    cfg = load_config(out)
    assert cfg.train.epochs == 8 and cfg.train.iters_per_epoch == 40  # production budget
    assert cfg.quant.weight.bits == 4 and cfg.quant.act.bits == 4  # t3's searched values
    prov = yaml.safe_load(out.read_text())["provenance"]
    assert prov["search"] == "hand" and prov["trial"] == "t3" and prov["budget"] == "production"
    assert prov["metrics"] == {"val_top1": 88.0, "val_drop": 2.0, "test_top1": 87.5, "bitops": 2e6,
                               "size_bits": 2e5}
    assert prov["budget_changes"]["train.epochs"] == {"search": 3, "production": 8}
    assert prov["package_version"] == "0.1.0" and prov["git_commit"] == "abc123"
    assert prov["exported_with"]["package_version"] == "0.1.0"
    assert prov["exported_at"] and prov["tracking_uri"].startswith("sqlite:///")
    assert prov["config_source"] == "search space (parent run tag granq.space)"


def test_export_search_budget_and_overrides(hand, tmp_path):
    out = tmp_path / "b.yaml"
    export_config(hand[1], "hand", "best", output=out, production=False, overrides={"train.seed": 7})
    cfg = load_config(out)
    assert cfg.train.epochs == 3 and cfg.train.iters_per_epoch == 5 and cfg.train.seed == 7
    assert cfg.quant.weight.bits == 8


def test_export_leaves_machine_settings_out(hand, tmp_path):
    """data.num_workers belongs to the machine that trains, not to the experiment an export carries."""
    out = tmp_path / "m.yaml"
    export_config(hand[1], "hand", "best", output=out, overrides={"data.num_workers": 3})
    doc = yaml.safe_load(out.read_text())
    assert "num_workers" not in doc["data"] and "batch_size" in doc["data"]
    assert load_config(out).data.num_workers == 0  # the training machine's default, or its own --set


def test_export_is_the_spaces_production_config_of_the_trials_values(hand):
    space = hand_space()
    for budget, build in ((True, space.production_config), (False, space.trial_config)):
        plan = plan_export(hand[1], "hand", "trial", trial="t5", production=budget)
        assert plan.cfg == build({"quant.weight.bits": 6, "quant.act.bits": 5})
    assert plan.cfg.train.epochs == 3 and plan.provenance["budget"] == "search"


def test_export_reads_no_config_artifact(hand, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    export_config(hand[1], "hand", "trial", trial="t2", output=a)
    export_config(hand[1], "noconf", "trial", trial="t2", output=b)  # its trials logged no config.yaml
    assert load_config(a) == load_config(b)
    for out in (a, b):
        assert yaml.safe_load(out.read_text())["provenance"]["config_source"] == \
            "search space (parent run tag granq.space)"


def test_a_search_recorded_before_the_space_tag_is_exported_from_its_search_json(store, tmp_path):
    parent = make_hand_made_search(store, "old")  # no granq.space tag, no proposals: neither can be exported
    with pytest.raises(TrackingError, match=r"search 'old' recorded no search space \(no parent tag granq.space, "
                                            r"nor its search folder\); it cannot be exported"):
        plan_export(store, "old", "best")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text(json.dumps({"name": "old", "space": hand_space().to_record()}))
    client.set_tag(parent, TAG.SEARCH_DIR, str(folder))
    with pytest.raises(TrackingError, match=r"trial t1 \(run \w+\) recorded no readable proposal \(tag "
                                            r"granq.proposal\); it cannot be exported"):
        plan_export(store, "old", "best")
    for run in runs_of(store, parent, kind="trial"):
        client.set_tag(run.info.run_id, TAG.PROPOSAL, json.dumps(
            {k: int(run.data.params[k]) for k in ("quant.act.bits", "quant.weight.bits")}))
    plan = plan_export(store, "old", "best")
    assert plan.cfg == hand_space().production_config({"quant.weight.bits": 8, "quant.act.bits": 8})
    assert plan.provenance["config_source"] == f"search space ({folder / 'search.json'})"
    assert plan.replaced == {"train.epochs": {"search": 3, "production": 8},
                             "train.iters_per_epoch": {"search": 5, "production": 40}}
    (folder / "search.json").write_text("{}")
    with pytest.raises(TrackingError, match=f"nor a readable search.json at {folder / 'search.json'}"):
        plan_export(store, "old", "best")


def test_nothing_written_on_error(hand, tmp_path):
    out = tmp_path / "x" / "best.yaml"
    with pytest.raises(ConfigError, match="quant.act.bits"):
        export_config(hand[1], "hand", "best", output=out, overrides={"quant.act.bits": 9})
    with pytest.raises(TrackingError):
        export_config(hand[1], "hand", "max_drop", max_drop=0.01, output=out)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- CLI


def test_cli_export_default_output_and_json(hand, monkeypatch, capsys):
    d, _ = hand
    assert cli(["export", "--output-dir", str(d), "--search", "hand", "--max-drop", "1", "--format", "json"],
               monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["trial"] == "t2" and doc["output"] == str(d / "hand" / "best.yaml")
    assert load_config(d / "hand" / "best.yaml").train.epochs == 8
    assert cli(["export", "--output-dir", str(d), "--search", "hand", "--trial", "t4", "--set", "train.seed=3",
                "--output", str(d / "t4.yaml")], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "exported trial t4" in out and "train --config" in out
    assert load_config(d / "t4.yaml").train.seed == 3


def test_cli_leaderboard_formats(hand, monkeypatch, capsys, tmp_path):
    d, _ = hand
    assert cli(["leaderboard", "--output-dir", str(d), "--search", "hand", "--format", "json", "--all"],
               monkeypatch) == 0
    doc = json.loads(capsys.readouterr().out)  # exactly one document
    assert len(doc["trials"]) == 8
    png = tmp_path / "front.png"
    assert cli(["leaderboard", "--output-dir", str(d), "--top", "3", "--plot", str(png)], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "search 'hand'" in out and png.is_file()  # the latest search by default


@pytest.mark.parametrize("argv, message", [
    (["leaderboard", "--search", "nope"], "no search named 'nope'"),
    (["export", "--search", "nope"], "no search named 'nope'"),
    (["leaderboard", "--search", "empty"], "search 'empty' has no trials recorded yet"),
    (["export", "--search", "empty", "--best"], "search 'empty' has no trials recorded yet"),
    (["export", "--search", "hand", "--max-drop", "0.01"], "no finished trial has val_drop <= 0.01"),
    (["export", "--search", "hand", "--set", "quant.act.bits=12"], "quant.act.bits"),
    (["leaderboard", "--tracking-uri", "/some/folder"], "MLflow file stores are not supported"),
])
def test_cli_errors_are_one_line_exit_2(hand, monkeypatch, capsys, argv, message):
    d, _ = hand
    before = sorted(p.name for p in d.rglob("*"))
    assert cli(argv[:1] + ["--output-dir", str(d)] + argv[1:], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert sorted(p.name for p in d.rglob("*")) == before


@pytest.mark.parametrize("command", ["leaderboard", "export"])
def test_cli_missing_store_is_not_created(tmp_path, monkeypatch, capsys, command):
    d = tmp_path / "runs" / "search"
    assert cli([command, "--output-dir", str(d)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no searches recorded in {d}") and "run `granq-search` first" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- a real search


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_trials_config_artifact_is_what_it_ran_and_export_is_production_config(tmp_path, monkeypatch):
    """A real 2-trial search (Ray, the product's trainable and recorder, the pipeline's own config
    resolution; training itself replaced by a report): each child's config.yaml is the config its
    trial built, relative paths made absolute as the trial used them, and resolving it (the model's
    registry defaults, as ``build_setup`` does) gives exactly the config the trainer ran; the space recorded on the parent run is the one search.json
    holds; export is the space's production_config (or trial_config) of the trial's values."""
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    from granq_search.search.runner import run_search

    ran = tmp_path / "ran"
    ran.mkdir()
    seen = str(ran)

    def recording_trial(config, *, base_cfg, **driver_facts):  # local: Ray ships it by value
        import types
        from pathlib import Path

        from ray import tune

        import granq_search.pipeline.trainer as trainer
        from granq_search.config import dump_config
        from granq_search.pipeline.build import resolve_config
        from granq_search.search.trainable import train_trial

        def build_setup(cfg, device, **_):  # the real resolution; no teacher, no data
            return types.SimpleNamespace(cfg=resolve_config(cfg))

        def run_training(cfg, **_):
            Path(seen, f"{tune.get_context().get_trial_id()}.yaml").write_text(dump_config(cfg))
            bits = cfg.quant.act.bits
            tune.report({"epoch": 1, "val_top1": 80.0 + bits, "best_val_top1": 80.0 + bits, "val_drop": 10.0 - bits,
                         "bitops": 1e6 * bits, "final": 1.0, "teacher_val_top1": 90.0, "epochs_run": 1.0})

        real = trainer.build_setup, trainer.run_training
        trainer.build_setup, trainer.run_training = build_setup, run_training  # this worker only; restored
        try:
            train_trial(config, base_cfg=base_cfg, **driver_facts)
        finally:
            trainer.build_setup, trainer.run_training = real

    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "base": "digits", "fidelity": {"train.epochs": 1, "train.warmup_epochs": 0, "train.iters_per_epoch": 1},
        "objectives": OBJECTIVES,
        "parameters": {"quant.act.bits": {"type": "categorical", "choices": [3, 4]},
                       "loss.alpha_ds": {"type": "float", "low": 0.0, "high": 1.0}},
        "initial_points": [{"quant.act.bits": 3, "loss.alpha_ds": 0.2}, {"quant.act.bits": 4, "loss.alpha_ds": 0.6}],
        "scheduler": {"type": "none"}, "sampler": {"type": "tpe", "seed": 0, "n_startup_trials": 2}}))
    monkeypatch.chdir(tmp_path)  # data.root below is relative to the driver's working directory
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "runs"
    outcome = run_search(space_file, name="exact", output_dir=out, num_samples=2, max_concurrent=1, progress=False,
                         trainable=recording_trial, set_overrides={"data.root": "rel/data"})
    assert outcome.status == "finished" and outcome.counts["complete"] == 2

    uri = f"sqlite:///{out / 'mlflow.db'}"
    record = json.loads((out / "exact" / "search.json").read_text())
    space = space_from_record(record["space"])
    board = load_runs(uri, "exact")
    assert space_from_text(board.tags[TAG.SPACE_RECORD], origin="tag").to_record() == record["space"]
    assert TAG.SPACE_RECORD in board.tags and "granq.fidelity" not in board.tags

    client = MlflowClient(uri)
    children = runs_of(uri, board.parent_run_id, kind="trial")
    assert len(children) == 2
    for child in children:
        tid = child.data.tags[TAG.TRIAL_ID]
        artifact = client.download_artifacts(child.info.run_id, "config.yaml", str(tmp_path / tid))
        logged = from_dict(split_document(yaml.safe_load(open(artifact)), "config.yaml")[0])
        trained = load_config(ran / f"{tid}.yaml")
        assert logged != trained and trained.model.mean is not None  # the trainer ran the resolved config
        assert resolve_config(logged) == trained  # ... which the record's config.yaml determines exactly
        assert trained.data.root == str(tmp_path / "rel" / "data")  # made absolute for the trials

        values = json.loads(child.data.tags[TAG.PROPOSAL])
        production = plan_export(uri, "exact", "trial", trial=tid)
        assert production.cfg == space.production_config(values)
        assert production.cfg.data.root == "rel/data"  # exported as the space wrote it
        assert production.cfg.train.epochs == 8 and production.cfg.quant.act.bits == values["quant.act.bits"]
        searched = plan_export(uri, "exact", "trial", trial=tid, production=False)
        assert searched.cfg == space.trial_config(values)
        assert resolve_config(with_overrides(searched.cfg, {"data.root": trained.data.root})) == trained
    best = yaml.safe_load(Path(outcome.best_config).read_text())
    assert best["data"]["root"] == "rel/data" and best["train"]["epochs"] == 8
