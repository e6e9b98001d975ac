"""The Python API: ``granq_search.quantize`` on a user's module, config arguments, and the lazy
package exports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granq_search
from granq_search.api import experiment_config
from granq_search.config import ExperimentConfig, QuantConfig, dump_config, load_config
from granq_search.errors import ConfigError
from granq_search.quant import ActQuantizer, QuantConv2d, QuantLinear, site_report


class UserNet(nn.Module):
    """A user's network: ReLU modules, an F.relu call, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x) + x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = UserNet().eval()
    with torch.no_grad():  # non-trivial BN statistics
        m.bn1.running_mean.uniform_(-0.5, 0.5)
        m.bn1.running_var.uniform_(0.5, 2.0)
    return m


def _batches(n: int, counter: list[int] | None = None):
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        if counter is not None:
            counter.append(1)
        yield torch.randn(16, 3, 10, 10, generator=gen), torch.zeros(16, dtype=torch.long)


def test_quantize_returns_a_new_student_and_leaves_the_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 10, 10)
    student = granq_search.quantize(model, {"weight": {"bits": 4}, "act": {"bits": 4}}, example_input=x)
    assert student is not model
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert not any(isinstance(m, (ActQuantizer, QuantConv2d, QuantLinear)) for m in model.modules())
    assert isinstance(student.conv1, QuantConv2d) and isinstance(student.fc, QuantLinear)
    rows = site_report(student)
    assert len(rows) == 2 and {r["bits"] for r in rows} == {4}
    assert {r["granularity"] for r in rows} == {"per_sample_channel"}  # the GranQ default
    with torch.no_grad():
        assert not torch.allclose(student(x), model(x))  # 4 bits changes the logits


def test_eight_bits_agree_with_the_float_model(model):
    x = torch.randn(64, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    student = granq_search.quantize(model, {"weight": {"bits": 8}, "act": {"bits": 8}})
    with torch.no_grad():
        ref, out = model(x), student(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_calibration_is_required_where_the_config_needs_it(model):
    static = {"act": {"range_mode": "static"}, "calib_batches": 3}
    with pytest.raises(ConfigError) as e:
        granq_search.quantize(model, static)
    assert "\n" not in str(e.value) and "pass calibration_data" in str(e.value)
    read: list[int] = []
    student = granq_search.quantize(model, static, calibration_data=_batches(10, read))
    assert len(read) == 3  # at most calib_batches batches are read
    assert all(r["calibrated"] and r["range_mode"] == "static" for r in site_report(student))
    # dynamic ranges take nothing from calibration: the data is not read
    untouched: list[int] = []
    granq_search.quantize(model, None, calibration_data=_batches(5, untouched))
    assert untouched == []


def test_quant_config_forms(model):
    cfg = load_config("digits", {"quant.weight.bits": 3, "quant.act.bits": 5})
    student = granq_search.quantize(model, cfg)  # an exported experiment config: its quant section
    assert {r["bits"] for r in site_report(student)} == {5} and student.conv1.w_bits == 3
    student = granq_search.quantize(model, QuantConfig())
    assert {r["bits"] for r in site_report(student)} == {4}
    with pytest.raises(ConfigError, match=r"unknown key 'quant\.act\.bitz'; did you mean 'quant\.act\.bits'\?"):
        granq_search.quantize(model, {"act": {"bitz": 3}})
    with pytest.raises(ConfigError, match=r"quant\.weight\.bits: 9 bits is out of range"):
        granq_search.quantize(model, {"weight": {"bits": 9}})
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        granq_search.quantize("not a model")  # type: ignore[arg-type]


def test_experiment_config_accepts_every_form(tmp_path):
    cfg = load_config("digits")
    path = tmp_path / "c.yaml"
    dump_config(cfg, path, provenance={"from": "a test"})
    doc = {"config_version": 1, "provenance": {"x": 1}, "train": {"epochs": 9}}
    assert experiment_config(cfg) is cfg
    assert experiment_config(path, {"train.epochs": 2}).train.epochs == 2
    assert experiment_config("digits", {"train.epochs": 2}) == experiment_config(path, {"train.epochs": 2})
    assert experiment_config(doc).train.epochs == 9 and experiment_config(doc, {"train.epochs": 7}).train.epochs == 7
    assert isinstance(experiment_config({}), ExperimentConfig)
    with pytest.raises(ConfigError, match="unknown key 'trian'"):
        experiment_config({"trian": {}})
    with pytest.raises(TypeError):
        experiment_config(3)  # type: ignore[arg-type]


def test_package_exports_are_lazy_and_stay_functions():
    code = (
        "import sys, json, granq_search\n"
        "light = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]\n"
        "names = {n: callable(getattr(granq_search, n)) for n in granq_search.__all__ if n != '__version__'}\n"
        "import granq_search.search.runner\n"  # binds the attribute 'search' to the sub-package
        "after = callable(granq_search.run_search) and granq_search.run_search.__module__ == 'granq_search.api'\n"
        "after = after and callable(granq_search.search) and hasattr(granq_search.search, 'load_space')\n"
        "print(json.dumps({'light': light, 'names': names, 'after': after}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["light"] == []  # `import granq_search` imports none of the heavy libraries
    assert doc["names"] == {n: True for n in ("GranqError", "quantize", "train", "search", "run_search", "load_student",
                                              "model_factory")}
    assert doc["after"] is True
    with pytest.raises(AttributeError):
        granq_search.no_such_name  # noqa: B018


def test_the_search_package_runs_a_search_when_called(tmp_path):
    """``granq_search.search(space, ...)`` is the API's search: a bad space fails the way the command does."""
    from granq_search.errors import GranqError

    with pytest.raises(GranqError, match="no search space named 'no_such_space'"):
        granq_search.search("no_such_space", output_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_the_api_search_passes_every_argument_to_the_driver(tmp_path, monkeypatch):
    """``granq_search.search`` forwards its arguments (also ``experiment`` and ``dashboard``) to
    ``run_search``, as the command does."""
    import granq_search.search.runner as runner

    seen = {}

    def fake_run_search(space, **kwargs):
        seen.update(kwargs, space=space)
        return "outcome"

    monkeypatch.setattr(runner, "run_search", fake_run_search)
    assert granq_search.search("digits", overrides={"train.epochs": 2}, name="n", output_dir=str(tmp_path),
                               num_samples=3, max_concurrent=1, tracking_uri="sqlite:///x.db", experiment="team",
                               resume=False, progress=False, dashboard=True) == "outcome"
    assert seen["space"] == "digits" and seen["name"] == "n" and seen["output_dir"] == str(tmp_path)
    assert (seen["num_samples"], seen["max_concurrent"]) == (3, 1)
    assert seen["set_overrides"] == {"train.epochs": 2} and seen["tracking_uri"] == "sqlite:///x.db"
    assert (seen["experiment"], seen["dashboard"], seen["progress"]) == ("team", True, False)


def test_code_roots_are_the_folders_the_workers_need(tmp_path, monkeypatch):
    from granq_search.user_code import code_roots, worker_pythonpath

    pkg = tmp_path / "proj" / "granq_userpkg_roots"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "nets.py").write_text("def build(num_classes=2):\n    return None\n")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "granq_userflat_roots.py").write_text("def data():\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path / "proj"))
    monkeypatch.syspath_prepend(str(tmp_path / "flat"))
    try:
        roots = code_roots(["granq_userpkg_roots.sub.nets:build", "digits", "granq_userflat_roots:data",
                            "yaml:safe_load", "granq_userflat_roots:data"])
    finally:
        for name in ("granq_userpkg_roots", "granq_userpkg_roots.sub", "granq_userpkg_roots.sub.nets",
                     "granq_userflat_roots"):
            sys.modules.pop(name, None)
    # the folder above the package, the module's folder; not site-packages (yaml), no duplicates
    assert roots == [str((tmp_path / "proj").resolve()), str((tmp_path / "flat").resolve())]
    monkeypatch.chdir(tmp_path)
    assert worker_pythonpath(["/x", "/y"], current="rel:/y::/z") == f"/x:/y:{tmp_path / 'rel'}:/z"
    with pytest.raises(ConfigError, match="cannot import 'granq_nothing_xyz'"):
        code_roots(["granq_nothing_xyz:build"])


_TINY_TRAIN = {"train.epochs": 3, "train.warmup_epochs": 1, "train.iters_per_epoch": 2, "train.batch_size": 16,
               "data.max_samples": 120, "generator.channels": 16}


def test_train_stopped_by_a_reporter_with_progress_shows_the_stopped_run(capsys):
    """A reporter's StopTraining with ``progress=True``: no test figures, no KeyError in the
    summary, and the terminal still shows the epoch after which training stopped."""
    from granq_search.pipeline.reporter import Reporter, StopTraining

    class StopAfterFirst(Reporter):
        def on_epoch_end(self, epoch, metrics, checkpoint):
            raise StopTraining

    result = granq_search.train("digits", overrides=_TINY_TRAIN, device="cpu", progress=True,
                                reporter=StopAfterFirst())
    err = capsys.readouterr().err
    assert result.metrics["stopped_early"] is True and result.metrics["epochs_run"] == 1
    assert "test_top1" not in result.metrics
    assert "epoch   1/3" in err and "summary (selection by validation" in err
    assert "final student val " in err and "drop vs FP (val)" in err


def test_train_resume_without_a_checkpoint_is_an_error(tmp_path):
    from granq_search.errors import GranqError

    missing = tmp_path / "nowhere"
    with pytest.raises(GranqError, match=r"nothing to resume: '.*nowhere/last\.pt' does not exist"):
        granq_search.train("digits", overrides=_TINY_TRAIN, device="cpu", checkpoint_dir=missing, resume=True)
    assert not missing.exists()


def test_experiment_config_mapping_errors_do_not_call_it_a_file():
    with pytest.raises(ConfigError, match="the config mapping has config_version 99") as e:
        experiment_config({"config_version": 99})
    assert "file" not in str(e.value)
