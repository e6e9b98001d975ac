"""Malformed input across every entry point: exit 2, one line naming the problem, no traceback,
nothing written (no output directory, no MLflow store, no Ray session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from granq_search.cli.main import main

SPACE_OK = """
base: digits
fidelity: {train.epochs: 2, train.warmup_epochs: 1, train.iters_per_epoch: 2}
objectives: [{metric: val_drop, mode: min}]
parameters:
  optim.student.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture()
def inputs(tmp_path):
    """Malformed files a user could pass; made once per test in an inputs folder."""
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "bad_syntax.yaml").write_text("model: [unclosed\n")
    (d / "unknown_key.yaml").write_text("model: {name: digits_cnn}\ntrain: {epochz: 3}\n")
    (d / "empty.yaml").write_text("")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "garbage.pt").write_bytes(os.urandom(256))
    other = torch.nn.Linear(3, 2)
    torch.save({"state_dict": other.state_dict()}, d / "other_arch.pt")
    (d / "empty_dir").mkdir()
    (d / "space_unknown_key.yaml").write_text(SPACE_OK + "colour: blue\n")
    (d / "space_bad_path.yaml").write_text(SPACE_OK.replace("optim.student.lr", "optim.student.learning_rate"))
    (d / "space_low_high.yaml").write_text(SPACE_OK.replace("low: 1.0e-4, high: 1.0e-2", "low: 1.0e-2, high: 1.0e-4"))
    (d / "space_test_objective.yaml").write_text(SPACE_OK.replace("metric: val_drop", "metric: test_top1"))
    (d / "space_bad_choice.yaml").write_text(
        SPACE_OK + "  quant.act.bits: {type: categorical, choices: [4, 12]}\n")
    (d / "space_bad_yaml.yaml").write_text("parameters: {a: [\n")
    return d


CASES = {
    # train: flags, --set overrides, config files, checkpoints, data directories
    "set out of range": (["train", "--set", "quant.act.bits=9"], "quant.act.bits"),
    "set unknown path": (["train", "--set", "quant.actt.bits=3"], "not a config field"),
    "set without =": (["train", "--set", "quant.act.bits"], "KEY=VALUE"),
    "set wrong type": (["train", "--set", "train.epochs=many"], "train.epochs"),
    "set bad granularity": (["train", "--set", "quant.act.granularity=per_pixel"], "per_sample_channel"),
    "set threshold > 1": (["train", "--set", "quant.act.threshold=1.5"], "quant.act.threshold"),
    "config missing": (["train", "--config", "{in}/missing.yaml"], "does not exist"),
    "config bad yaml": (["train", "--config", "{in}/bad_syntax.yaml"], "not valid YAML"),
    "config unknown key": (["train", "--config", "{in}/unknown_key.yaml"], "did you mean 'train.epochs'"),
    "config empty": (["train", "--config", "{in}/empty.yaml"], "empty"),
    "config not a mapping": (["train", "--config", "{in}/list.yaml"], "mapping"),
    "unknown preset": (["train", "--config", "digitz"], "did you mean 'digits'"),
    "unknown model": (["train", "--set", "model.name=resnet2"], "resnet20"),
    "garbage checkpoint": (["train", "--set", "model.checkpoint={in}/garbage.pt"], "garbage.pt"),
    "missing checkpoint": (["train", "--set", "model.checkpoint={in}/none.pt"], "none.pt"),
    "checkpoint of another architecture": (["train", "--set", "model.checkpoint={in}/other_arch.pt"], "missing"),
    "missing data dir": (["train", "--set", "data.dataset=imagefolder", "--set", "data.root={in}/nowhere"],
                         "nowhere"),
    "empty data dir": (["train", "--set", "data.dataset=imagefolder", "--set", "data.root={in}/empty_dir"],
                       "empty_dir"),
    "unknown flag": (["train", "--epochs", "3"], "unrecognized arguments"),
    "bad threads": (["train", "--threads", "0"], "--threads"),
    "no cuda": (["train", "--device", "cuda:3"], "CUDA"),
    "resume without checkpoint": (["train", "--resume", "--output-dir", "{out}/r"], "nothing to resume"),
    "unknown command": (["fly"], "invalid choice"),
    # evaluate
    "evaluate unknown model": (["evaluate", "--model", "resnet2"], "resnet20"),
    "evaluate missing data": (["evaluate", "--data", "imagefolder", "--data-root", "{in}/nowhere"], "nowhere"),
    # search: space files and flags, checked before Ray starts
    "space missing": (["search", "--space", "{in}/none.yaml", "--output-dir", "{out}"], "none.yaml"),
    "space unknown key": (["search", "--space", "{in}/space_unknown_key.yaml", "--output-dir", "{out}"], "colour"),
    "space bad path": (["search", "--space", "{in}/space_bad_path.yaml", "--output-dir", "{out}"], "learning_rate"),
    "space low > high": (["search", "--space", "{in}/space_low_high.yaml", "--output-dir", "{out}"], "low"),
    "space test objective": (["search", "--space", "{in}/space_test_objective.yaml", "--output-dir", "{out}"],
                             "test"),
    "space invalid choice": (["search", "--space", "{in}/space_bad_choice.yaml", "--output-dir", "{out}"], "12"),
    "space bad yaml": (["search", "--space", "{in}/space_bad_yaml.yaml", "--output-dir", "{out}"], "YAML"),
    "search zero samples": (["search", "--num-samples", "0", "--output-dir", "{out}"], "--num-samples"),
    "search bad concurrency": (["search", "--max-concurrent", "0", "--output-dir", "{out}"], "--max-concurrent"),
    "search set unknown": (["search", "--set", "quant.act.bitz=3", "--output-dir", "{out}"], "quant.act.bitz"),
    "search file store": (["search", "--tracking-uri", "file:///{out}/mlruns", "--output-dir", "{out}"], "sqlite"),
    "search unreachable server": (["search", "--tracking-uri", "http://127.0.0.1:9", "--output-dir", "{out}"],
                                  "127.0.0.1:9"),
    "search resume unknown": (["search", "--resume", "--name", "nope", "--output-dir", "{out}"], "nope"),
    # leaderboard / export of unknown or empty searches
    "leaderboard empty store": (["leaderboard", "--output-dir", "{out}"], "no searches"),
    "export empty store": (["export", "--best", "--output-dir", "{out}"], "no searches"),
    "export bad max-drop": (["export", "--max-drop", "abc", "--output-dir", "{out}"], "max-drop"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line(name, inputs, tmp_path, capsys, monkeypatch):
    argv, needle = CASES[name]
    out = tmp_path / "out"
    argv = [a.replace("{in}", str(inputs)).replace("{out}", str(out)) for a in argv]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # default output folders (runs/...) would appear here
    before_inputs = _files(inputs)
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, f"{name}: exit {rc}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"{name}: expected one line, got {err!r}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert needle.lower() in lines[0].lower(), f"{name}: {needle!r} not in {lines[0]!r}"
    assert captured.out == ""
    assert not out.exists(), f"{name}: wrote {out}"
    assert _files(work) == set(), f"{name}: wrote {_files(work)}"
    assert _files(inputs) == before_inputs
    import sys

    if "ray" in sys.modules:
        import ray

        assert not ray.is_initialized(), f"{name}: left a Ray session"


def test_debug_shows_the_traceback():
    with pytest.raises(Exception, match="quant.act.bits"):
        main(["--debug", "train", "--set", "quant.act.bits=9"])


def test_help_for_every_command(capsys):
    for cmd in ("search", "train", "evaluate", "leaderboard", "export"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0
        assert "usage" in capsys.readouterr().out.lower()
