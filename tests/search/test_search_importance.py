"""What the search learned: parameter importance per objective from a real Optuna journal, its
formats and plot, ``leaderboard --importance`` and the MLflow artifacts (no Ray search: the
journal and search.json are written here the way the driver writes them)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from granq_search.errors import GranqError
from granq_search.search.importance import (
    format_importance,
    log_importance_artifacts,
    plot_importance,
    search_importance,
    study_importance,
)

OBJECTIVES = [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]
PNG = b"\x89PNG\r\n\x1a\n"


def make_search(output_dir: Path, name: str = "imp", n: int = 20, *, complete: bool = True,
                same_params: bool = False) -> Path:
    """DIR/NAME/optuna.journal and search.json. val_drop depends on quant.weight.bits, bitops on
    quant.act.bits; train.lr is noise; quant.method is fixed. Every 5th trial is pruned, one
    fails, and a duplicate proposal repeats trial 0's outcome (``duplicate_of``)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    root = output_dir / name
    root.mkdir(parents=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(root / "optuna.journal"))),
                                study_name=name, directions=["minimize", "minimize"],
                                sampler=optuna.samplers.RandomSampler(seed=0))
    rng = random.Random(0)
    for i in range(n):
        if same_params:
            study.enqueue_trial({"quant.weight.bits": 4, "quant.act.bits": 4, "train.lr": 1e-3,
                                 "quant.method": "granq"})
        t = study.ask()
        wb = t.suggest_categorical("quant.weight.bits", [2, 3, 4, 6, 8])
        ab = t.suggest_int("quant.act.bits", 2, 8)
        t.suggest_float("train.lr", 1e-4, 1e-2, log=True)
        t.suggest_categorical("quant.method", ["granq"])
        if i % 5 == 4 or not complete and i:
            study.tell(t, state=TrialState.PRUNED)
        else:
            study.tell(t, [12.0 / wb + rng.uniform(0, 0.05), 1e6 * ab + rng.uniform(0, 1e3)])
    bad = study.ask()
    study.tell(bad, state=TrialState.FAIL)
    first = study.trials[0]
    if first.state == TrialState.COMPLETE:  # what the searcher tells a duplicate proposal
        study.add_trial(optuna.trial.create_trial(params=first.params, distributions=first.distributions,
                                                  values=first.values, user_attrs={"duplicate_of": 0}))
    record = {"name": name, "created": time.time(), "objectives": OBJECTIVES, "study_name": name,
              "journal": str(root / "optuna.journal"), "status": "finished"}
    (root / "search.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def searches(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("searches")
    make_search(d, "imp")
    return d


@pytest.fixture(scope="module")
def result(searches):
    return search_importance(searches, "imp")


def test_the_parameter_that_drives_an_objective_ranks_first(searches, result):
    r = result
    assert list(r.importances["val_drop"])[0] == "quant.weight.bits"
    assert list(r.importances["bitops"])[0] == "quant.act.bits"
    assert r.importances["val_drop"]["quant.weight.bits"] > 0.8
    for scores in r.importances.values():
        assert sum(scores.values()) == pytest.approx(1.0)
        assert list(scores.values()) == sorted(scores.values(), reverse=True)
    assert r.trials_used == 16 and r.left_out == {"pruned": 4, "failed": 1, "duplicate": 1}
    assert r.constant == {"quant.method": "granq"} and "quant.method" not in r.importances["val_drop"]
    assert search_importance(searches).to_dict() == r.to_dict()  # latest search; seeded: same numbers


def test_ped_anova_option(searches):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    r = search_importance(searches, "imp", evaluator="ped-anova")  # 16 trials: runs, with a caveat
    assert r.evaluator == "ped-anova" and sum(r.importances["val_drop"].values()) == pytest.approx(1.0)
    assert any("PED-ANOVA on 16 trials" in n for n in r.notes)
    rng = random.Random(1)
    study = optuna.create_study(directions=["minimize", "maximize"])
    dist = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    for _ in range(60):  # PED-ANOVA wants >= 5 trials in its top 10 %
        x, y = rng.random(), rng.random()
        study.add_trial(create_trial(params={"x": x, "y": y}, distributions=dist, values=[x, y]))
    r = study_importance(study, [{"metric": "a", "mode": "min"}, {"metric": "b", "mode": "max"}],
                         evaluator="ped-anova")
    assert list(r.importances["a"])[0] == "x" and list(r.importances["b"])[0] == "y" and not r.notes
    with pytest.raises(GranqError, match="unknown importance evaluator 'nope'"):
        search_importance(searches, "imp", evaluator="nope")


def test_formats(result):
    r = result
    table = format_importance(r)
    assert "What the search learned" in table and "fANOVA, seed 0" in table
    assert "from 16 finished trials only (pruned trials are under-trained); left out: 4 pruned, 1 failed, " \
           "1 duplicate" in table
    assert "val_drop (min)" in table and "quant.method=granq" in table
    md = format_importance(r, "markdown")
    assert "| parameter | val_drop (min) | bitops (min) |" in md and "|:---|---:|---:|" in md
    doc = json.loads(format_importance(r, "json"))
    assert doc["importances"]["val_drop"] == r.importances["val_drop"] and doc["left_out"]["pruned"] == 4
    assert "pruned trials are under-trained" in doc["basis"]


def test_plot_is_a_png(result, tmp_path):
    path = plot_importance(result, tmp_path / "sub" / "importance.png")
    assert path.read_bytes()[:8] == PNG


def test_too_few_finished_trials_or_nothing_varies(tmp_path):
    make_search(tmp_path, "few", n=6, complete=False)  # one finished trial, the rest pruned
    with pytest.raises(GranqError, match=r"search 'few' has 1 finished trial\(s\) \(5 pruned, under-trained and "
                                         r"not used\); parameter importance needs at least 2") as e:
        search_importance(tmp_path, "few")
    assert "\n" not in str(e.value)
    make_search(tmp_path, "same", n=4, same_params=True)
    with pytest.raises(GranqError, match="all have the same parameters; parameter importance needs finished "
                                         "trials that differ in at least one parameter"):
        search_importance(tmp_path, "same")
    with pytest.raises(GranqError, match="no search folder"):
        search_importance(tmp_path, "missing")


def test_a_constant_objective_is_reported_not_ranked(searches):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    study = optuna.create_study(directions=["minimize", "maximize"], study_name="flat")
    for i in range(5):
        study.add_trial(create_trial(params={"x": i / 10}, distributions={"x": FloatDistribution(0, 1)},
                                     values=[float(i), 3.0]))
    r = study_importance(study, [{"metric": "a", "mode": "min"}, {"metric": "b", "mode": "max"}])
    assert r.importances == {"a": {"x": 1.0}, "b": {}}
    assert "b is the same in every finished trial" in format_importance(r)


# ------------------------------------------------------------------ CLI and MLflow (one real store)


@pytest.fixture(scope="module")
def store(searches) -> str:
    """A SQLite MLflow store in the searches' folder with a minimal record of search 'imp'."""
    from mlflow.tracking import MlflowClient

    from granq_search.tracking.schema import TAG

    uri = f"sqlite:///{searches / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("granq_search", artifact_location=(searches / "mlartifacts").as_uri())
    parent = c.create_run(exp, run_name="imp", tags={TAG.KIND: "search", TAG.SEARCH: "imp",
                                                      TAG.OBJECTIVES: json.dumps(OBJECTIVES)}).info.run_id
    child = c.create_run(exp, run_name="t1", tags={TAG.KIND: "trial", TAG.SEARCH: "imp", TAG.TRIAL_ID: "t1",
                                                    TAG.PARENT: parent, TAG.STATUS: "finished"}).info.run_id
    for key, value in (("val_drop", 1.0), ("bitops", 4e6), ("final", 1.0)):
        c.log_metric(child, key, value)
    c.set_terminated(child, "FINISHED")
    c.set_terminated(parent, "FINISHED")
    return uri


def cli(argv, monkeypatch) -> int:
    from granq_search.cli import main as cli_main

    monkeypatch.delenv("GRANQ_DEBUG", raising=False)
    return cli_main.main(argv)


def test_cli_leaderboard_importance(store, searches, monkeypatch, capsys, tmp_path):
    d = str(searches)
    png = tmp_path / "imp.png"
    assert cli(["leaderboard", "--output-dir", d, "--importance", "--format", "json", "--importance-plot",
                str(png)], monkeypatch) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)  # exactly one document
    assert doc["search"] == "imp" and len(doc["trials"]) == 1
    assert list(doc["importance"]["importances"]["val_drop"])[0] == "quant.weight.bits"
    assert png.read_bytes()[:8] == PNG and "importance plot written" in out.err
    assert cli(["leaderboard", "--output-dir", d, "--search", "imp", "--importance"], monkeypatch) == 0
    out = capsys.readouterr().out
    assert "search 'imp'" in out and "What the search learned" in out and "quant.act.bits" in out
    assert cli(["leaderboard", "--output-dir", d, "--importance", "--format", "csv"], monkeypatch) == 0
    out = capsys.readouterr()
    assert "What the search learned" not in out.out and "What the search learned" in out.err


def test_cli_importance_errors_are_one_line_exit_2(store, searches, tmp_path, monkeypatch, capsys):
    assert cli(["leaderboard", "--output-dir", str(searches), "--importance-plot", "x.jpg"], monkeypatch) == 2
    assert "--importance-plot x.jpg: give a .png file name" in capsys.readouterr().err
    # the MLflow store of another folder: the search folder is not there
    assert cli(["leaderboard", "--output-dir", str(tmp_path), "--tracking-uri", store, "--importance"],
               monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no search folder" in err


def test_log_importance_artifacts(store, searches, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from granq_search.tracking.store import find_parent

    assert log_importance_artifacts(store, "imp", searches / "imp" / "optuna.journal", OBJECTIVES) is True
    c = MlflowClient(store)
    parent = find_parent(c, c.get_experiment_by_name("granq_search").experiment_id, "imp")
    assert {a.path for a in c.list_artifacts(parent.info.run_id)} >= {"importance.json", "importance.png"}
    # derived data: a failure warns and returns False, never raises
    make_search(tmp_path, "few", n=3, complete=False)
    assert log_importance_artifacts(store, "few", tmp_path / "few" / "optuna.journal", OBJECTIVES) is False
    assert log_importance_artifacts(store, "imp", tmp_path / "nope.journal", OBJECTIVES) is False
    assert "importance.json/png not stored in MLflow" in caplog.text
