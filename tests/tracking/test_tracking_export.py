"""Export rules on the hand-made search, the written YAML, and the CLI's error paths."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import yaml

from granq_search.cli import main as cli_main
from granq_search.config import ConfigError, load_config
from granq_search.errors import TrackingError
from granq_search.export import export_config, select_trial
from granq_search.tracking import load_runs
from tracking_helpers import OBJECTIVES, make_hand_made_search


@pytest.fixture(scope="module")
def hand(_template_db, tmp_path_factory):
    """(output dir, uri) of a store holding the hand-made search 'hand' and an empty one."""
    d = tmp_path_factory.mktemp("export_store")
    shutil.copy(_template_db, d / "mlflow.db")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    make_hand_made_search(uri, "hand")
    make_hand_made_search(uri, "noconf", with_configs=False, start_offset_ms=-60_000)
    make_hand_made_search(uri, "empty", trials={}, start_offset_ms=-120_000)
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
    assert prov["config_source"] == "artifact config.yaml"


def test_export_search_budget_and_overrides(hand, tmp_path):
    out = tmp_path / "b.yaml"
    export_config(hand[1], "hand", "best", output=out, production=False, overrides={"train.seed": 7})
    cfg = load_config(out)
    assert cfg.train.epochs == 3 and cfg.train.iters_per_epoch == 5 and cfg.train.seed == 7
    assert cfg.quant.weight.bits == 8


def test_export_from_params_when_the_artifact_is_missing(hand, tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    export_config(hand[1], "hand", "trial", trial="t2", output=a)
    export_config(hand[1], "noconf", "trial", trial="t2", output=b)
    assert load_config(a) == load_config(b)
    assert yaml.safe_load(b.read_text())["provenance"]["config_source"].startswith("params")


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
