"""ONNX export of quantized students: integer weights, run-time activation quantization, the
round trip through ONNX Runtime, and the ``deploy`` command."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto  # noqa: E402

from granq_search.cli.main import main  # noqa: E402
from granq_search.config import load_config  # noqa: E402
from granq_search.errors import GranqError  # noqa: E402
from granq_search.export import onnx_export, onnx_verify  # noqa: E402
from granq_search.export.onnx_export import export_float_onnx, export_onnx, onnx_summary  # noqa: E402
from granq_search.export.onnx_verify import verify_onnx  # noqa: E402
from granq_search.pipeline.trainer import build_setup  # noqa: E402
from granq_search.quant import (  # noqa: E402
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    calibrate,
    compute_range,
    fake_quantize,
    needs_calibration,
    prepare,
    resolve,
    site_report,
)
from granq_search.quant.granularity import act_granularity  # noqa: E402

IN_SHAPE = (1, 1, 8, 8)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    """The trained digits teacher and its validation split (materialised once)."""
    setup = build_setup(load_config("digits"), "cpu")
    return setup, list(setup.val)


@pytest.fixture(scope="module")
def fp_bytes(digits, tmp_path_factory):
    setup, _ = digits
    path = export_float_onnx(setup.teacher, IN_SHAPE, tmp_path_factory.mktemp("fp") / "fp.onnx")
    return path.stat().st_size


def _student(setup, val, overrides):
    cfg = load_config("digits", overrides)
    student = prepare(setup.teacher, cfg.quant, example_input=torch.zeros(IN_SHAPE)).eval()
    if needs_calibration(student):
        calibrate(student, [x[:128] for x, _ in val][: cfg.quant.calib_batches])
    return student


def _layers(student):
    return [(n, m) for n, m in student.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]


# (id, config overrides, expected effective granularities of the sites)
CASES = [
    ("granq-w4-perchannel", {}, {"per_sample_channel"}),
    ("granq-w3-perkernel", {"quant.weight.bits": 3, "quant.act.bits": 3, "quant.weight.granularity": "per_kernel"},
     {"per_sample_channel"}),
    ("threshold-mixed", {"quant.act.granularity": "threshold", "quant.act.threshold": 0.8},
     {"per_sample_channel", "per_tensor"}),
    ("static-granq", {"quant.act.range_mode": "static", "quant.weight.granularity": "per_kernel"},
     {"per_channel (static)"}),
    ("static-per-tensor-3bit", {"quant.act.range_mode": "static", "quant.act.granularity": "per_tensor",
                                "quant.act.bits": 3, "quant.weight.bits": 3}, {"per_tensor"}),
    ("per-tensor", {"quant.act.granularity": "per_tensor"}, {"per_tensor"}),
    ("per-channel-w3", {"quant.act.granularity": "per_channel", "quant.act.bits": 3, "quant.weight.bits": 3,
                        "quant.weight.granularity": "per_kernel"}, {"per_channel"}),
    ("layer-input", {"quant.act.placement": "layer_input", "quant.weight.granularity": "per_kernel"},
     {"per_sample_channel", "per_channel (single-value fallback)"}),
    ("layer-input-residual8-w3", {"quant.act.placement": "layer_input", "quant.act.residual_bits": 8,
                                  "quant.act.bits": 3, "quant.weight.bits": 3},
     {"per_sample_channel", "per_channel (single-value fallback)"}),
    ("layer-input-residual8-static-threshold", {"quant.act.placement": "layer_input", "quant.act.residual_bits": 8,
                                                "quant.act.range_mode": "static", "quant.act.granularity": "threshold",
                                                "quant.act.threshold": 0.5},
     {"per_channel (static)", "per_tensor"}),
    ("symmetric-perkernel", {"quant.weight.symmetric": True, "quant.weight.granularity": "per_kernel"},
     {"per_sample_channel"}),
]


@pytest.mark.parametrize("overrides,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_round_trip_matches_student(digits, fp_bytes, tmp_path, overrides, expected):
    setup, val = digits
    student = _student(setup, val, overrides)
    report = site_report(student)
    assert {r["effective"] for r in report} == expected
    before = {k: v.clone() for k, v in student.state_dict().items()}

    path = export_onnx(student, IN_SHAPE, tmp_path / "student.onnx")
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    for k, v in student.state_dict().items():  # the student is left alone
        assert torch.equal(v, before[k]) or (v.isnan().all() and before[k].isnan().all()), k

    r = verify_onnx(path, student, val, threads=1)
    assert r["n"] == sum(len(y) for _, y in val)
    assert r["agreement"] >= 99.5, r
    assert abs(r["top1_diff"]) <= 0.1, r
    assert r["torch_top1"] > 85

    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    dq_inputs = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    layers = _layers(student)
    symmetric = overrides.get("quant.weight.symmetric", False)
    weight_numels = set()
    for name, m in layers:
        t = inits[f"{name}.weight_int"]
        assert t.data_type == (TensorProto.INT8 if symmetric else TensorProto.UINT8)
        assert f"{name}.weight_int" in dq_inputs
        weight_numels.add(m.weight.numel())
    # no float copy of any weight (BN parameters and activation constants are per channel)
    float_numels = {math.prod(t.dims) for t in inits.values() if t.data_type == TensorProto.FLOAT}
    assert not float_numels & weight_numels
    total = sum(m.weight.numel() for _, m in layers)
    assert path.stat().st_size < 4 * total < fp_bytes  # smaller than the float32 weights alone

    dynamic = [r for r in report if r["enabled"] and r["range_mode"] == "dynamic"]
    assert ops.count("ReduceMin") == ops.count("ReduceMax") == len(dynamic)
    static_tensor = [r for r in report if r["range_mode"] == "static" and r["effective"] == "per_tensor"]
    assert ops.count("QuantizeLinear") == len(static_tensor)
    if overrides.get("quant.weight.granularity") == "per_kernel":
        assert "Reshape" in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert len(json.loads(meta["granq.sites"])) == len(report)
    assert len(json.loads(meta["granq.layers"])) == len(layers)


def test_static_per_tensor_clips_to_k_bits(digits, tmp_path):
    setup, val = digits
    student = _student(setup, val, {"quant.act.range_mode": "static", "quant.act.granularity": "per_tensor",
                                    "quant.act.bits": 3})
    path = export_onnx(student, IN_SHAPE, tmp_path / "s.onnx")
    proto = onnx.load(str(path))
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    q_out = {n.output[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    clips = [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] in q_out]
    assert len(clips) == len(q_out) == 3
    for c in clips:
        hi = onnx.numpy_helper.to_array(consts[c.input[2]].attribute[0].t)
        assert hi.dtype.name == "uint8" and int(hi) == 7


@pytest.mark.parametrize("gran,mode", [("per_sample_channel", "dynamic"), ("per_channel", "dynamic"),
                                       ("per_tensor", "dynamic"), ("per_sample_channel", "static"),
                                       ("per_tensor", "static")])
def test_activation_site_is_bit_exact(tmp_path, gran, mode):
    """One site alone: ONNX Runtime gives exactly fake_quant's values (same IEEE ops)."""
    torch.manual_seed(0)
    site = ActQuantizer(bits=3, granularity=gran, range_mode=mode, site="s")
    model = nn.Sequential(nn.Identity(), site).eval()
    x = torch.randn(6, 5, 7, 7) * torch.rand(1, 5, 1, 1) * 3 + 0.5
    if mode == "static":
        calibrate(model, [x[:3], x[3:]])
    path = export_onnx(model, (1, 5, 7, 7), tmp_path / "site.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    if mode == "static":
        expected = fake_quantize(x, site.lo, site.hi, 3)
    else:
        g, _ = resolve(act_granularity(gran), tuple(x.shape))
        expected = fake_quantize(x, *compute_range(g, x), 3)
    assert torch.equal(out, expected)
    assert torch.equal(model(x), expected)


def test_dynamic_batch_axis(digits, tmp_path):
    setup, val = digits
    student = _student(setup, val, {})
    path = export_onnx(student, IN_SHAPE, tmp_path / "s.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = val[0][0]
    for n in (1, 7):
        out = sess.run(None, {"input": x[:n].numpy()})[0]
        assert out.shape == (n, 10)
        assert torch.allclose(torch.from_numpy(out), student(x[:n]).detach(), atol=1e-3)


def test_export_refuses_uncalibrated_and_float(digits, tmp_path):
    setup, _ = digits
    cfg = load_config("digits", {"quant.act.granularity": "threshold"})
    student = prepare(setup.teacher, cfg.quant, example_input=torch.zeros(IN_SHAPE)).eval()
    with pytest.raises(GranqError, match="calibrat"):
        export_onnx(student, IN_SHAPE, tmp_path / "s.onnx")
    with pytest.raises(GranqError, match="export_float_onnx"):
        export_onnx(setup.teacher, IN_SHAPE, tmp_path / "s.onnx")
    assert not list(tmp_path.iterdir())


def test_missing_onnx_is_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(GranqError, match=r"pip install 'granq_search\[deploy\]'"):
        onnx_export.require_onnx()


# --------------------------------------------------------------------------- the deploy command


@pytest.fixture(scope="module")
def train_run(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    rc = main(["train", "--config", "digits", "--set", "train.epochs=2", "--set", "train.warmup_epochs=1",
               "--set", "train.iters_per_epoch=5", "--output-dir", str(run), "--no-progress", "--threads", "1",
               "--format", "json", "--no-tracking"])
    assert rc == 0
    return run


def test_deploy_command(train_run, tmp_path, capsys):
    capsys.readouterr()
    out, fp = tmp_path / "out" / "student.onnx", tmp_path / "teacher_fp.onnx"
    rc = main(["deploy", "--run", str(train_run), "--output", str(out), "--fp-output", str(fp),
               "--which", "final", "--threads", "1", "--format", "json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert out.is_file() and fp.is_file()
    assert doc["bytes"] == out.stat().st_size and doc["fp_bytes"] == fp.stat().st_size
    assert doc["bytes"] < doc["fp_bytes"]
    v = doc["verify"]
    assert v["agreement"] >= 99.5 and abs(v["top1_diff"]) <= 0.1
    assert doc["which"] == "final" and doc["sites"] and doc["layers"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "student.onnx", "teacher_fp.onnx"]

    rc = main(["deploy", "--run", str(train_run), "--output", str(tmp_path / "t.onnx"), "--no-verify"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "smaller" in text and "not verified" in text


def test_deploy_errors_write_nothing(train_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "student.onnx"
    assert main(["deploy", "--run", str(tmp_path / "missing"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err

    def bad_verify(*args, **kwargs):
        return {"n": 10, "batches": 1, "agreement": 50.0, "onnx_top1": 0.0, "torch_top1": 0.0, "top1_diff": 0.0,
                "max_abs_diff": 1.0, "mean_abs_diff": 1.0}

    monkeypatch.setattr(onnx_verify, "verify_onnx", bad_verify)
    assert main(["deploy", "--run", str(train_run), "--output", str(tmp_path / "new" / "student.onnx"),
                 "--fp-output", str(tmp_path / "fp" / "fp.onnx")]) == 2
    assert "agree" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_deploy_logs_the_onnx_file_to_the_students_mlflow_run(digits, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    assert main(["train", "--config", "digits", "--set", "train.epochs=2", "--set", "train.warmup_epochs=1",
                 "--set", "train.iters_per_epoch=3", "--output-dir", str(run), "--no-progress", "--threads", "1",
                 "--tracking-uri", uri, "--format", "json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["mlflow"]["run_id"]
    assert main(["deploy", "--run", str(run), "--output", str(tmp_path / "s.onnx"), "--threads", "1",
                 "--max-batches", "2", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mlflow"]["run_id"] == run_id
    client = MlflowClient(uri)
    assert {a.path for a in client.list_artifacts(run_id, "onnx")} == {"onnx/s.onnx", "onnx/s.json"}
    assert client.get_run(run_id).data.metrics["onnx_agreement"] >= 99.5
