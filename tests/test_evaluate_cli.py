"""``tune_main.py evaluate`` through ``granq_search.cli.main.main``: output and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import granq_search.cli.main as cli_main
from granq_search.models import create_model


@pytest.fixture(autouse=True)
def _only_evaluate(monkeypatch):
    # Build only this command's parser: these tests must not depend on the other commands.
    monkeypatch.setattr(cli_main, "COMMANDS", {"evaluate": "granq_search.cli.cmd_evaluate"})


def _run(capsys, *argv):
    rc = cli_main.main(["evaluate", "--threads", "2", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(capsys, *argv) -> str:
    rc, out, err = _run(capsys, *argv)
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _quant_available() -> bool:
    try:
        from granq_search.quant import calibrate, efficiency, needs_calibration, prepare  # noqa: F401
    except ImportError:
        return False
    return True


def test_list_models(capsys):
    rc, out, _ = _run(capsys, "--list-models")
    assert rc == 0 and "resnet20 " in out and "digits_cnn" in out and "mobilenet_v2" in out
    rc, out, _ = _run(capsys, "--list-models", "--format", "json")
    assert rc == 0 and {m["name"] for m in json.loads(out)} >= {"resnet20", "tiny_test"}


def test_digits_teacher_json(capsys):
    rc, out, err = _run(capsys, "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["model"]["name"] == "digits_cnn" and doc["quant"] is None
    assert set(doc["splits"]) == {"val", "test", "all"}
    s = doc["splits"]
    assert s["all"]["n"] == s["val"]["n"] + s["test"]["n"] == 719
    assert s["test"]["fp"]["top1"] >= 97.0
    assert doc["data"]["dataset"] == "digits" and doc["model"]["checkpoint_sha256"]


def test_table_single_split(capsys):
    rc, out, err = _run(capsys, "--model", "tiny_test", "--set", "model.pretrained=false", "--split", "test",
                        "--max-samples", "40")
    assert rc == 0, err
    rows = [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["val"], ["test"], ["all"])]
    assert rows == ["test"] and "val 20 / test 20" in out


@pytest.mark.skipif(not _quant_available(), reason="granq_search.quant is not available yet")
@pytest.mark.parametrize("extra", [[], ["--range-mode", "static"], ["--act-granularity", "threshold"]])
def test_quantized_student(capsys, extra):
    rc, out, err = _run(capsys, "--model", "tiny_test", "--set", "model.pretrained=false", "--max-samples", "64",
                        "--quant", "--w-bits", "8", "--a-bits", "8", "--format", "json", *extra)
    assert rc == 0, err
    doc = json.loads(out)
    q = doc["quant"]
    assert q["config"]["weight"]["bits"] == 8 and q["config"]["act"]["bits"] == 8
    for key in ("bitops", "size_bits", "compression"):
        assert key in q["efficiency"]
    if extra:
        assert q["calibrated_on"]["split"] == "val"
    for s in doc["splits"].values():
        assert "quant" in s and abs(s["drop_top1"]) <= 100


def test_unknown_model(capsys):
    line = _one_line_error(capsys, "--model", "resnet2")
    assert "unknown model 'resnet2'; did you mean 'resnet20'?" in line and "--list-models" in line


def test_missing_data_dir(capsys, tmp_path):
    line = _one_line_error(capsys, "--data", "imagefolder", "--data-root", str(tmp_path / "nope"))
    assert "does not exist" in line


def test_empty_data_dir(capsys, tmp_path):
    line = _one_line_error(capsys, "--data", "imagefolder", "--data-root", str(tmp_path))
    assert "no class sub-folders" in line


def test_class_count_mismatch(capsys, tmp_path):
    for c in ("a", "b", "c"):
        (tmp_path / c).mkdir()
        Image.new("L", (8, 8), color=100).save(tmp_path / c / "0.png")
        Image.new("L", (8, 8), color=50).save(tmp_path / c / "1.png")
    line = _one_line_error(capsys, "--data", "imagefolder", "--data-root", str(tmp_path))
    assert "3 classes but the model head has 10" in line


def test_not_a_checkpoint(capsys, tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("definitely not a checkpoint")
    line = _one_line_error(capsys, "--model", "tiny_test", "--checkpoint", str(p))
    assert "not a readable PyTorch checkpoint" in line


def test_checkpoint_from_another_architecture(capsys, tmp_path):
    p = tmp_path / "digits.pt"
    torch.save({"state_dict": create_model("digits_cnn").state_dict()}, p)
    line = _one_line_error(capsys, "--model", "tiny_test", "--checkpoint", str(p))
    assert "does not fit model 'tiny_test'" in line and "check model.name" in line


@pytest.mark.slow
@pytest.mark.shared
def test_shared_resnet20_full_precision(capsys, shared):
    rc, out, err = _run(capsys, "--model", "resnet20", "--checkpoint",
                        str(shared / "models" / "resnet20_cifar10_optionA.th"), "--data", "imagefolder",
                        "--data-root", str(shared / "data" / "cifar10" / "test"), "--split", "all",
                        "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["splits"]["all"]["n"] == 10000
    assert round(doc["splits"]["all"]["fp"]["top1"], 2) == 81.03
    assert doc["model"]["checkpoint_sha256"] == "12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8"


def test_data_flag_takes_builtin_names_and_import_paths(capsys):
    """``--data`` is checked by the config (one line), so MODULE:FACTORY is accepted like in a config."""
    from granq_search.cli import cmd_evaluate
    from granq_search.config import BUILTIN_DATASETS

    line = _one_line_error(capsys, "--data", "cifar11")
    assert "data.dataset: 'cifar11' is not allowed" in line and "'digits'" in line and "MODULE:FACTORY" in line
    parser = cli_main.build_parser()
    args = parser.parse_args(["evaluate", "--data", "mydata:build"])
    assert cmd_evaluate.build_config(args).data.dataset == "mydata:build"
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in BUILTIN_DATASETS) and "MODULE:FACTORY" in help_text
