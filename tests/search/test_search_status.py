"""The live status table's text (granq_search/search/status.py); the callback in a real search:
test_search_ray.py::test_status_table_replaces_ray_output."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from granq_search.search.status import TrialRow, render_status, short_param_names  # noqa: E402

OBJ = [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]
PARAMS = ["quant.act.threshold", "quant.act.bits", "quant.weight.bits", "optim.student.lr", "loss.alpha_ds"]


def rows() -> list[TrialRow]:
    p = {"quant.act.threshold": 0.4361, "quant.act.bits": 4, "quant.weight.bits": 3, "optim.student.lr": 0.0017,
         "loss.alpha_ds": 0.2668}
    return [
        TrialRow("c3e8590e", "finished", 6, {"val_drop": 0.0, "bitops": 24813568.0}, p),
        TrialRow("e95c5eb2", "pruned", 2, {"val_drop": 7.2222, "bitops": 17725440.0}, p),
        TrialRow("3733a939", "running", 3, {"bitops": 18610176.0}, p),
        TrialRow("bef842fc", "pending", None, {}, p),
    ]


def test_short_names_keep_columns_apart():
    assert short_param_names(PARAMS + ["optim.generator.lr"]) == {
        "quant.act.threshold": "threshold", "quant.act.bits": "act.bits", "quant.weight.bits": "weight.bits",
        "optim.student.lr": "student.lr", "optim.generator.lr": "generator.lr", "loss.alpha_ds": "alpha_ds"}


def test_table_shows_objectives_epochs_and_params():
    text = render_status(rows(), title="search s", objectives=OBJ, params=PARAMS, epochs=6)
    lines = text.splitlines()
    assert lines[0] == "search s"
    assert lines[1].split() == ["trial", "state", "epoch", "val_drop", "bitops", "threshold", "act.bits",
                                "weight.bits", "student.lr", "alpha_ds"]
    assert lines[2].split() == ["c3e8590e", "finished", "6/6", "0.00", "24.8M", "0.436", "4", "3", "0.0017", "0.267"]
    assert lines[3].split()[:5] == ["e95c5eb2", "pruned", "2/6", "7.22", "17.7M"]
    assert lines[4].split()[:5] == ["3733a939", "running", "3/6", "-", "18.6M"]  # no validation yet
    assert lines[5].split()[:5] == ["bef842fc", "pending", "-", "-", "-"]
    assert "val_top5" not in text
    assert len({len(line) for line in lines[1:3]}) == 1  # aligned columns


def test_narrow_terminal_and_many_trials():
    many = rows() * 10
    text = render_status(many, title="t", objectives=OBJ, params=PARAMS, epochs=6, max_rows=5, width=60)
    lines = text.splitlines()
    assert "(35 earlier trial(s) not shown)" in lines
    assert sum(1 for line in lines if line.startswith(("c3e8", "e95c", "3733", "bef8"))) == 5
    assert all(len(line) <= 60 for line in lines[1:] if not line.startswith("("))
    assert lines[-1].startswith("(columns left out for the terminal width:") and "alpha_ds" in lines[-1]
    assert "val_drop" in lines[1] and "bitops" in lines[1]  # objectives are never left out


def test_a_trial_that_ended_before_resume_keeps_its_last_result():
    """After --resume the table is new: a trial Ray had already ended reports nothing more, and
    is shown from Ray's ``trial.last_result`` (finished, with its epoch and objectives), not as pruned."""
    from types import SimpleNamespace

    from granq_search.search.status import StatusTable

    table = StatusTable(name="s", objectives=OBJ, params=["quant.act.bits"], num_samples=2, epochs=6)
    done = SimpleNamespace(trial_id="c3e8590e_1", status="TERMINATED", config={"quant.act.bits": 4},
                           last_result={"epoch": 6, "final": 1.0, "val_drop": 0.5, "bitops": 2.0e7,
                                        "val_top1": 90.0, "failure_reason": None})
    stopped = SimpleNamespace(trial_id="e95c5eb2_2", status="TERMINATED", config={"quant.act.bits": 3},
                              last_result={"epoch": 2, "val_drop": 7.0})
    finished, pruned = table.rows([done, stopped])
    assert (finished.state, finished.epoch, finished.values) == ("finished", 6, {"val_drop": 0.5, "bitops": 2.0e7})
    assert (pruned.state, pruned.epoch, pruned.values) == ("pruned", 2, {"val_drop": 7.0})
    # what the table saw itself wins over Ray's last result
    table.on_trial_result(0, [], done, {"epoch": 5, "val_drop": 1.5})
    assert table.rows([done])[0].epoch == 5


def test_the_dashboard_line_names_the_address_ray_reports():
    """The success path of ``--dashboard`` (not run here: ray[default] is not installed): the
    address Ray's context reports becomes a URL; none reported means no URL."""
    from types import SimpleNamespace

    from granq_search.search.launch import _dashboard_url

    assert _dashboard_url(SimpleNamespace(dashboard_url="127.0.0.1:8265")) == "http://127.0.0.1:8265"
    assert _dashboard_url(SimpleNamespace(dashboard_url="https://head:8443")) == "https://head:8443"
    assert _dashboard_url(SimpleNamespace(dashboard_url="")) is None
    assert _dashboard_url(SimpleNamespace()) is None
