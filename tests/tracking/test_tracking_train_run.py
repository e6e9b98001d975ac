"""The MLflow record of ``train``: one run (also after ``--resume``), the student as an MLflow
model in the Model Registry, and ``load_student`` from a run folder or a model URI.

The CLI runs in-process on digits with a tiny budget (2 epochs x 5 iterations, 1 thread).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import granq_search
from granq_search.cli.main import main
from granq_search.config import dump_config, flatten, load_config
from granq_search.errors import GranqError, TrackingError
from granq_search.pipeline.evaluation import evaluate
from granq_search.tracking.schema import TAG
from granq_search.tracking.mlflow_io import fluent_store
from granq_search.tracking.train_target import DEFAULT_TRAIN_EXPERIMENT, RUN_FILE, resolve_target
from test_tracking_integration import mlflow_server  # noqa: F401 - the real `mlflow server` fixture

TINY = ["--set", "train.epochs=2", "--set", "train.warmup_epochs=1", "--set", "train.iters_per_epoch=5",
        "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No store or experiment from the environment; torch threads put back after `train --threads 1`."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trained(monkeypatch):
    """What `train` trained in this process: the result (in-memory students) and the setup."""
    import granq_search.pipeline.trainer as trainer

    real, seen = trainer.run_training, {}

    def spy(cfg, **kw):
        seen["result"] = real(cfg, **kw)
        seen["setup"] = kw["setup"]
        return seen["result"]

    monkeypatch.setattr(trainer, "run_training", spy)
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    rc = main(["train", *argv, *TINY, "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    return json.loads(out)  # stdout holds exactly one JSON document


def _exported(tmp_path: Path, store: str, name: str = "chosen.yaml") -> Path:
    """A config as `export` writes it: provenance naming the search, trial and store."""
    path = tmp_path / name
    dump_config(load_config("digits"), path, provenance={
        "search": "s1", "trial": "t3", "run_id": "0123abcd", "rule": "best", "budget": "production",
        "tracking_uri": store})
    return path


def _runs(client, experiment: str = DEFAULT_TRAIN_EXPERIMENT):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], run_view_type=3) if exp else []  # ALL: deleted ones too


def _check_predictions(model_uri: str, uri: str, student: torch.nn.Module, images: torch.Tensor) -> None:
    import mlflow.pyfunc

    batch = images[:32].numpy().astype(np.float32)
    with fluent_store(uri):
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    logits = np.asarray(pyfunc.predict(batch))
    with torch.no_grad():
        ref = student.cpu().eval()(torch.from_numpy(batch)).numpy()
    assert logits.shape == ref.shape == (len(batch), 10)
    np.testing.assert_array_equal(logits.argmax(1), ref.argmax(1))
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- SQLite store


def test_train_records_one_run_resumes_it_and_registers_the_student(tmp_path, store, capsys, monkeypatch,
                                                                    trained):
    from mlflow.tracking import MlflowClient

    from granq_search.pipeline import terminal

    config, out = _exported(tmp_path, store), tmp_path / "run"
    # stopped (Ctrl+C) after epoch 1 was checkpointed and shown, before MLflow saw it
    real_epoch_end = terminal.TerminalReporter.on_epoch_end

    def interrupt(self, epoch, metrics, checkpoint):
        real_epoch_end(self, epoch, metrics, checkpoint)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(terminal.TerminalReporter, "on_epoch_end", interrupt)
        assert main(["train", "--config", str(config), "--output-dir", str(out), *TINY]) == 130
    client = MlflowClient(store)  # the search's store, named by the config's provenance
    (run,) = _runs(client)
    assert run.info.status == "KILLED" and run.data.tags[TAG.STATUS] == "interrupted"
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == run.info.run_id

    final = _train(capsys, ["--config", str(config), "--output-dir", str(out), "--resume",
                            "--register-as", "granq_digits"])
    (run,) = _runs(client)  # the same run, continued
    run_id = run.info.run_id
    assert final["mlflow"]["run_id"] == run_id and final["epochs_run"] == 2
    assert run.info.status == "FINISHED" and run.data.tags[TAG.STATUS] == "finished"
    tags = run.data.tags
    assert tags[TAG.KIND] == "train" and tags["granq.resumed"] == "1"
    assert (tags[TAG.SEARCH], tags[TAG.TRIAL_ID], tags["granq.source_run_id"]) == ("s1", "t3", "0123abcd")
    assert tags["granq.source_tracking_uri"] == store and tags["granq.config_source"] == str(config)
    assert tags["mlflow.source.git.commit"] == tags[TAG.GIT_COMMIT] and len(tags[TAG.GIT_COMMIT]) >= 7
    assert run.info.run_name.startswith("train W4A4 digits_cnn ")
    cfg = load_config(str(out / "config.yaml"))
    flat = flatten(cfg)
    assert set(run.data.params) == set(flat)
    assert run.data.params["quant.act.bits"] == "4" and run.data.params["model.name"] == "digits_cnn"
    # every epoch once (epoch 1 from metrics.jsonl: the interruption came before MLflow saw it)
    assert [int(m.step) for m in client.get_metric_history(run_id, "epoch")] == [1, 2]
    assert [int(m.step) for m in client.get_metric_history(run_id, "lr_generator")] == [1, 2]
    metrics = run.data.metrics
    assert metrics["final"] == 1.0 and metrics["best_val_top1"] == pytest.approx(final["best_val_top1"])
    assert metrics["test_top1"] == pytest.approx(final["test_top1"]) and metrics["bitops"] > 0
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.yaml", "final.json"}
    assert json.loads((out / "final.json").read_text())["mlflow"]["registered_uri"] == "models:/granq_digits/1"

    # the registered student: tags, and the same predictions as the trained student in memory
    version = client.get_model_version("granq_digits", "1")
    assert version.run_id == run_id
    assert float(version.tags["best_val_top1"]) == pytest.approx(final["best_val_top1"])
    assert float(version.tags["best_test_top1"]) == pytest.approx(final["best_test_top1"])
    assert version.tags[TAG.SEARCH] == "s1"
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run_id and logged.name == "student"
    setup, result = trained["setup"], trained["result"]
    images, _ = next(iter(setup.val))
    _check_predictions("models:/granq_digits/1", store, result.best_student, images)

    # load_student: the run folder, the registry and the run's model give the reported accuracy
    for source in (out, "models:/granq_digits/1", f"runs:/{run_id}/student"):
        student = granq_search.load_student(source, tracking_uri=store)
        assert isinstance(student, torch.nn.Module) and not student.training
        assert evaluate(student, setup.val, "cpu")["top1"] == pytest.approx(final["best_val_top1"]), source

    # resumed once more (nothing left to train): still one run, one model, one version
    _train(capsys, ["--config", str(config), "--output-dir", str(out), "--resume", "--register-as", "granq_digits"])
    assert len(_runs(client)) == 1 and len(client.search_logged_models([run.info.experiment_id])) == 1
    assert [str(v.version) for v in client.search_model_versions("name = 'granq_digits'")] == ["1"]
    with pytest.raises(GranqError, match="not_there"):
        granq_search.load_student("models:/not_there/1", tracking_uri=store)


# ----------------------------------------------------------------------------- where it records


def test_store_and_experiment_resolution(tmp_path, store, monkeypatch):
    out = tmp_path / "train" / "r1"
    target = resolve_target(None, None, "digits", out)
    assert target.tracking_uri == f"sqlite:///{(tmp_path / 'train' / 'mlflow.db').as_posix()}"
    assert target.experiment == DEFAULT_TRAIN_EXPERIMENT and target.lineage == {} and target.run_id is None
    assert not (tmp_path / "train").exists()  # resolving creates nothing

    config = _exported(tmp_path, store)
    target = resolve_target(None, None, str(config), out)
    assert target.tracking_uri == store and target.lineage[TAG.SEARCH] == "s1"
    gone = _exported(tmp_path, f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}", "moved.yaml")
    assert resolve_target(None, None, str(gone), out).uri_source == "default"  # that store is not here

    env_db = f"sqlite:///{(tmp_path / 'env.db').as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_db)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from_env")
    target = resolve_target(None, None, str(config), out)
    assert (target.tracking_uri, target.experiment) == (env_db, "from_env")
    flag_db = f"sqlite:///{(tmp_path / 'flag.db').as_posix()}"
    target = resolve_target(flag_db, "mine", str(config), out)
    assert (target.tracking_uri, target.experiment) == (flag_db, "mine")

    # --resume: the recorded run keeps its store and experiment
    out.mkdir(parents=True)
    (out / RUN_FILE).write_text(json.dumps({"tracking_uri": store, "experiment": "x", "run_id": "r"}))
    target = resolve_target(None, None, str(config), out, resume=True)
    assert (target.tracking_uri, target.experiment, target.run_id) == (store, "x", "r")
    with pytest.raises(TrackingError, match="keeps its store"):
        resolve_target(flag_db, None, str(config), out, resume=True)
    with pytest.raises(TrackingError, match="keeps its experiment"):
        resolve_target(None, "other", str(config), out, resume=True)
    with pytest.raises(TrackingError, match="file stores"):
        resolve_target(str(tmp_path), None, "digits", tmp_path / "r2")


def test_unreachable_store_fails_before_anything_is_created(tmp_path, capsys):
    out = tmp_path / "never" / "run"
    rc = main(["train", "--tracking-uri", f"http://127.0.0.1:{_free_port()}", "--output-dir", str(out), *TINY])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cannot reach MLflow tracking server" in err, err
    assert not (tmp_path / "never").exists()
    rc = main(["train", "--no-tracking", "--register-as", "x", "--output-dir", str(out), *TINY])
    assert rc == 2 and "--no-tracking" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_no_tracking_records_nothing(tmp_path, capsys):
    final = _train(capsys, ["--no-tracking", "--output-dir", str(tmp_path / "run")])
    assert "mlflow" not in final and not (tmp_path / "run" / RUN_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no default store next to it


# ----------------------------------------------------------------------------- a real MLflow server


@pytest.mark.slow
def test_train_against_a_real_server(mlflow_server, tmp_path, capsys, trained):  # noqa: F811 - the fixture
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    final = _train(capsys, ["--tracking-uri", mlflow_server, "--experiment", "prod", "--output-dir", str(out),
                            "--register-as", "srv_student"])
    client = MlflowClient(mlflow_server)
    (run,) = _runs(client, "prod")
    assert run.info.status == "FINISHED" and run.info.run_id == final["mlflow"]["run_id"]
    assert [int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")] == [1, 2]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "final.json"}
    assert float(client.get_model_version("srv_student", "1").tags["best_val_top1"]) == \
        pytest.approx(final["best_val_top1"])
    setup, result = trained["setup"], trained["result"]
    images, _ = next(iter(setup.val))
    _check_predictions("models:/srv_student/1", mlflow_server, result.best_student, images)
    student = granq_search.load_student("models:/srv_student/1", tracking_uri=mlflow_server)
    assert evaluate(student, setup.val, "cpu")["top1"] == pytest.approx(final["best_val_top1"])
