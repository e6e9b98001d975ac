"""Calibration: threshold decisions (tau = 0, 1, monotone), static ranges, modes, report."""

from __future__ import annotations

import pytest
import torch

from granq_search.config import QuantConfig, from_dict
from granq_search.errors import DataError
from granq_search.quant import (
    ActQuantizer,
    act_quantizers,
    calibrate,
    needs_calibration,
    prepare,
    site_report,
)
from quant_helpers import calib_batches


def cfg(**act) -> QuantConfig:
    return from_dict({"act": act}, QuantConfig)


def fine_sites(model, tau: float, range_mode: str = "dynamic") -> tuple[list[bool], list[float]]:
    student = prepare(model, cfg(granularity="threshold", threshold=tau, range_mode=range_mode, bits=3))
    report = calibrate(student, calib_batches())
    return [r["fine"] for r in report], [r["ratio"] for r in report]


@pytest.mark.parametrize("range_mode", ["dynamic", "static"])
def test_threshold_extremes_and_monotone(many_sites, range_mode):
    fine0, ratios = fine_sites(many_sites, 0.0, range_mode)
    assert len(fine0) == 8 and all(fine0)
    assert all(0.0 <= r <= 1.0 for r in ratios)
    fine1, _ = fine_sites(many_sites, 1.0, range_mode)
    assert not any(fine1)
    mid = sorted(ratios)[len(ratios) // 2]
    taus = sorted({0.0, 0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0, mid})
    counts = []
    for tau in taus:
        fine, r = fine_sites(many_sites, tau, range_mode)
        assert r == ratios  # r does not depend on tau
        assert fine == [tau < 1.0 and x >= tau for x in r]
        counts.append(sum(fine))
    assert counts == sorted(counts, reverse=True)  # non-increasing in tau
    assert 0 < sum(x >= mid for x in ratios) < len(ratios) or len(set(ratios)) == 1


def test_threshold_decision_is_used_and_stored(many_sites):
    student = prepare(many_sites, cfg(granularity="threshold", threshold=0.0, bits=3))
    with pytest.raises(RuntimeError, match="calibrate"):
        student(torch.randn(1, 3, 8, 8))
    report = calibrate(student, calib_batches())
    assert all(r["effective"] == "per_sample_channel" and r["calibrated"] for r in report)
    q = dict(act_quantizers(student))["relu"]
    assert bool(q.fine) and float(q.ratio) == report[0]["ratio"] and bool(q.calibrated)
    assert {"act_quantizers.relu.fine", "act_quantizers.relu.ratio", "act_quantizers.relu.calibrated"} <= set(
        student.state_dict())
    student(torch.randn(1, 3, 8, 8))  # calibrated: runs


def test_ratio_is_zero_when_per_tensor_error_is_zero():
    q = ActQuantizer(4, "threshold", threshold=0.0)
    q.begin_calibration()
    q(torch.zeros(2, 3, 4, 4))
    q.finalize()
    assert float(q.ratio) == 0.0 and q.uses_fine  # r = 0 >= tau = 0
    q = ActQuantizer(4, "threshold", threshold=0.5)
    q.begin_calibration()
    q(torch.zeros(2, 3, 4, 4))
    q.finalize()
    assert not q.uses_fine and q.effective_granularity == "per_tensor"


def test_static_sites_need_calibration_and_freeze_ranges(many_sites):
    student = prepare(many_sites, cfg(range_mode="static", granularity="per_sample_channel"))
    assert needs_calibration(student)
    with pytest.raises(RuntimeError, match="calibrate"):
        student(torch.randn(1, 3, 8, 8))
    student.train()
    student.bn1.eval()  # a mixed state must come back as it was
    report = calibrate(student, [(b, torch.zeros(len(b))) for b in calib_batches()])
    assert student.training and not student.bn1.training and student.conv1.training
    assert all(r["effective"] == "per_channel (static)" for r in report)
    q = dict(act_quantizers(student))["relu"]
    assert q.lo.shape == (1, 6, 1, 1) and q.hi.shape == (1, 6, 1, 1)
    x = torch.randn(2, 3, 8, 8)
    student.eval()
    y1 = student(x)
    assert torch.equal(student(x), y1)
    assert needs_calibration(student)  # it still takes its ranges from calibration (re-calibratable)


def test_dynamic_calibrate_is_a_noop_that_reports(many_sites):
    student = prepare(many_sites, cfg(granularity="per_channel"))
    assert not needs_calibration(student)
    report = calibrate(student, [])
    assert report == site_report(student) and len(report) == 8
    assert all(r["ratio"] is None and r["fine"] and r["range_mode"] == "dynamic" for r in report)
    expected_keys = {"name", "granularity", "effective", "bits", "range_mode", "ratio", "fine"}
    assert expected_keys <= set(report[0])


def test_calibration_without_batches_is_a_data_error(many_sites):
    student = prepare(many_sites, cfg(range_mode="static"))
    with pytest.raises(DataError):
        calibrate(student, [])
    assert not any(q._observing for _, q in act_quantizers(student))


def test_calibrate_moves_batches_to_device(many_sites):
    student = prepare(many_sites, cfg(granularity="threshold"))
    report = calibrate(student, calib_batches(1), device="cpu")
    assert all(r["calibrated"] for r in report)
