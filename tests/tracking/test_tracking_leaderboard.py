"""Leaderboard ranking, Pareto flags, formats and plot on a hand-made set of runs."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil

import pandas as pd
import pytest

from granq_search.errors import TrackingError
from granq_search.tracking import format_leaderboard, load_runs, pareto_mask, plot_pareto, rank
from tracking_helpers import HAND_MADE, OBJECTIVES, make_hand_made_search


@pytest.fixture(scope="module")
def board(_template_db, tmp_path_factory):
    d = tmp_path_factory.mktemp("hand")
    shutil.copy(_template_db, d / "mlflow.db")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    make_hand_made_search(uri)
    return load_runs(uri, "hand")


def test_rows_statuses_and_columns(board):
    df = board.df.set_index("trial")
    assert set(df.index) == set(HAND_MADE)
    for tid, (status, drop, bitops, wb, ab) in HAND_MADE.items():
        assert df.loc[tid, "status"] == status
        assert df.loc[tid, "quant.weight.bits"] == wb and df.loc[tid, "quant.act.bits"] == ab
        if drop is not None:
            assert df.loc[tid, "val_drop"] == pytest.approx(drop)
            assert df.loc[tid, "val_top1"] == pytest.approx(90.0 - drop)
            assert df.loc[tid, "bitops"] == bitops
    assert df.loc["f1", "failure_reason"].startswith("TrainingDiverged")
    assert df.loc["t1", "size_kib"] == pytest.approx(8e5 / 8192)
    assert df.loc["t1", "test_top1"] == pytest.approx(89.0)
    assert df.loc["t1", "test_drop"] == pytest.approx(0.0)
    # nothing recorded what the hand-made search searched: the params that differ between its trials
    assert sorted(board.searched) == ["quant.act.bits", "quant.weight.bits"]
    assert board.params[:2] == ["quant.weight.bits", "quant.act.bits"]
    assert df["quant.act.bits"].dtype == "Int64" and df.loc["t1", "run_name"] == "t1"
    assert board.teacher == {"name": "digits_cnn", "val_top1": 90.0, "test_top1": 89.0}
    assert board.objectives == OBJECTIVES and board.search == "hand"


def test_ranking_puts_finished_first_by_first_objective(board):
    df = board.df
    assert list(df["trial"][:6]) == ["t1", "t2", "t5", "t3", "t6", "t4"]
    assert list(df["rank"][:6]) == [1, 2, 3, 4, 5, 6]
    assert df["rank"][6:].isna().all()
    assert list(df["status"][6:]) == ["pruned", "failed"]


def test_pareto_front_excludes_pruned_and_keeps_ties(board):
    front = set(board.df.loc[board.df["pareto"], "trial"])
    assert front == {"t1", "t2", "t3", "t6", "t4"}  # t5 dominated; p1 pruned; f1 failed


def test_pareto_mask_modes_and_ties():
    df = pd.DataFrame({"status": ["finished"] * 4 + ["pruned"],
                       "acc": [70.0, 80.0, 80.0, 60.0, 99.0], "cost": [1.0, 2.0, 2.0, 3.0, 0.1]})
    objs = [{"metric": "acc", "mode": "max"}, {"metric": "cost", "mode": "min"}]
    assert list(pareto_mask(df, objs)) == [True, True, True, False, False]
    ranked = rank(df, objs)
    assert list(ranked["acc"][:4]) == [80.0, 80.0, 70.0, 60.0]


def test_formats(board):
    table = format_leaderboard(board, "table")
    lines = table.splitlines()
    assert lines[0].startswith("search 'hand': 6 finished, 1 pruned, 1 failed")
    assert not re.search(r"\bp1\b", table) and "2 unfinished trial(s)" in table
    header = next(ln for ln in lines if ln.startswith("rank"))
    assert "val top1" in header and "BitOPs" in header
    assert len({len(ln) for ln in lines if ln.startswith(("   1 ", "   2 "))}) >= 1
    full = format_leaderboard(board, "table", all_trials=True)
    assert re.search(r"\bp1\b", full) and "TrainingDiverged" in full
    top = format_leaderboard(board, "table", top=2)
    assert "t1" in top and "t2" in top and "t5" not in top

    rows = list(csv.DictReader(io.StringIO(format_leaderboard(board, "csv", all_trials=True))))
    assert len(rows) == 8 and rows[0]["trial"] == "t1" and rows[0]["pareto"] == "True"

    doc = json.loads(format_leaderboard(board, "json", all_trials=True))
    assert doc["search"] == "hand" and doc["counts"] == {"finished": 6, "pruned": 1, "failed": 1}
    assert len(doc["trials"]) == 8 and doc["trials"][0]["rank"] == 1
    assert doc["trials"][-1]["val_top1"] is None  # NaN -> null: valid JSON

    md = format_leaderboard(board, "markdown")
    assert "| rank | trial |" in md and "|---:|:---|" in md


def test_plot_is_written(board, tmp_path):
    path = plot_pareto(board.df, board.objectives, tmp_path / "pareto.png", search=board.search,
                       teacher=board.teacher)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_latest_search_by_default_and_unknown_or_empty_searches(store):
    make_hand_made_search(store, "older")
    make_hand_made_search(store, "newer", start_offset_ms=60_000)
    assert load_runs(store).search == "newer"
    with pytest.raises(TrackingError, match=r"no search named 'nope' .* known searches \(newest first\): newer, older"):
        load_runs(store, "nope")
    make_hand_made_search(store, "empty", trials={}, start_offset_ms=120_000)
    with pytest.raises(TrackingError, match="search 'empty' has no trials recorded yet"):
        load_runs(store, "empty")


def test_reading_a_missing_store_creates_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'nothing' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="no searches recorded in"):
        load_runs(uri)
    assert not (tmp_path / "nothing").exists()
