"""Helpers for the tracking tests: fake Ray trials, results, a hand-made search with known
(val_drop, bitops)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granq_search.config import dump_config, flatten, load_config, with_overrides
from granq_search.tracking.schema import TAG, param_value

SEARCH_FIDELITY = {"train.epochs": 3, "train.iters_per_epoch": 5}
TEACHER_VAL, TEACHER_TEST = 90.0, 89.0
OBJECTIVES = [{"metric": "val_drop", "mode": "min"}, {"metric": "bitops", "mode": "min"}]

# trial -> (status, val_drop, bitops, weight bits, act bits)
HAND_MADE = {
    "t1": ("finished", 0.5, 8e6, 8, 8),
    "t2": ("finished", 1.0, 4e6, 6, 6),
    "t3": ("finished", 2.0, 2e6, 4, 4),
    "t4": ("finished", 6.0, 1e6, 3, 3),
    "t5": ("finished", 1.5, 5e6, 6, 5),   # dominated by t2
    "t6": ("finished", 2.0, 2e6, 4, 4),   # equal to t3: both on the front
    "p1": ("pruned", 0.1, 0.5e6, 2, 2),   # would dominate everything: never on the front
    "f1": ("failed", None, None, 2, 3),
}


def hand_space():
    """The space of the hand-made search: the digits preset (production budget 8 epochs x 40
    iterations) searched at SEARCH_FIDELITY over both bit-widths."""
    from granq_search.search.space import parse_space

    bits = {"type": "categorical", "choices": [2, 3, 4, 5, 6, 7, 8]}
    return parse_space({"base": "digits", "fidelity": dict(SEARCH_FIDELITY), "objectives": OBJECTIVES,
                        "parameters": {"quant.weight.bits": bits, "quant.act.bits": bits},
                        "scheduler": {"type": "none"}}, "hand-made")


def trial_config(proposal: dict) -> Any:
    """Module level so the recorder pickles (Ray pickles callbacks into tuner.pkl); keys
    without a dot (test switches) are not config paths."""
    base = with_overrides(load_config("digits"), SEARCH_FIDELITY)
    return with_overrides(base, {k: v for k, v in proposal.items() if "." in k})


@dataclass
class FakeTrial:
    """What the recorder reads from a ray.tune.experiment.Trial."""

    trial_id: str
    config: dict = field(default_factory=dict)
    status: str = "RUNNING"
    error_file: str | None = None
    last_result: dict = field(default_factory=dict)
    local_path: str | None = None
    experiment_tag: str = ""
    """Ray's ``<counter>_<params>`` (1-based counter of the trials the search created)."""


def epoch_result(epoch: int, val: float, *, final: bool = False, bitops: float = 1e6, **extra) -> dict:
    r = {"epoch": epoch, "val_top1": val, "best_val_top1": val, "val_drop": TEACHER_VAL - val,
         "val_loss": 0.5, "warmup": 0.0, "lr_student": 1e-3, "time_this_iter_s": 0.1, "pid": 1234,
         "timestamp": 1700000000, "done": False, "training_iteration": epoch, "trial_id": "x",
         "config": {"a": 1}, "hostname": "h"}
    if final:
        r.update(final=1.0, test_top1=val - 1, best_test_top1=val - 1, teacher_val_top1=TEACHER_VAL,
                 teacher_test_top1=TEACHER_TEST, test_drop=TEACHER_TEST - val + 1, bitops=bitops,
                 size_bits=bitops / 10, compression=7.5, act_scale_factors=100.0, fine_fraction=1.0,
                 epochs_run=float(epoch), sites_json=json.dumps([{"site": "relu1", "granularity": "psc"}]))
    r.update(extra)
    return r


def make_recorder(uri: str, name: str = "s1", **kw):
    from granq_search.tracking.callback import SearchRecorder

    kw.setdefault("retry_interval_s", 0.0)
    return SearchRecorder(tracking_uri=uri, search_name=name, objectives=OBJECTIVES, trial_config=trial_config,
                          parent_tags={TAG.SPACE: "search_spaces/digits.yaml"},
                          command_line=["tune_main.py", "--name", name, "--tracking-uri",
                                        "https://alice:s3cret@mlflow.example:5000"], **kw)


def runs_of(uri: str, parent_id: str | None = None, kind: str | None = None, experiment: str = "granq_search"):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    flt = []
    if parent_id:
        flt.append(f"tags.`mlflow.parentRunId` = '{parent_id}'")
    if kind:
        flt.append(f"tags.`granq.kind` = '{kind}'")
    return list(c.search_runs([exp.experiment_id], " and ".join(flt), max_results=1000))


def make_hand_made_search(uri: str, name: str = "hand", trials: dict | None = None, with_configs: bool = True,
                          start_offset_ms: int = 0, experiment: str = "granq_search", with_space: bool = False) -> str:
    """A search written straight with MlflowClient, following the tag contract; ``with_space``:
    with what export reads (the space on the parent, each trial's proposal)."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    trials = HAND_MADE if trials is None else trials
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(
        experiment, artifact_location=(Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri())
    now = int(time.time() * 1000) + start_offset_ms
    parent = c.create_run(exp_id, start_time=now, run_name=name, tags={
        TAG.KIND: "search", TAG.SEARCH: name, TAG.OBJECTIVES: json.dumps(OBJECTIVES),
        TAG.TEACHER: "digits_cnn", TAG.TEACHER_VAL: str(TEACHER_VAL), TAG.TEACHER_TEST: str(TEACHER_TEST),
        TAG.VERSION: "0.1.0", TAG.GIT_COMMIT: "abc123"}).info.run_id
    if with_space:
        from granq_search.search.space import space_record_text

        c.set_tag(parent, TAG.SPACE_RECORD, space_record_text(hand_space()))
    for i, (tid, (status, drop, bitops, wb, ab)) in enumerate(trials.items()):
        run = c.create_run(exp_id, start_time=now + i + 1, run_name=tid, tags={
            TAG.KIND: "trial", TAG.SEARCH: name, TAG.TRIAL_ID: tid, TAG.PARENT: parent, TAG.STATUS: status})
        rid = run.info.run_id
        proposal = {"quant.weight.bits": wb, "quant.act.bits": ab}
        if with_space:
            c.set_tag(rid, TAG.PROPOSAL, json.dumps(proposal, sort_keys=True))
        cfg = trial_config(proposal)
        params = [Param(k, param_value(v)) for k, v in flatten(cfg).items()]
        for j in range(0, len(params), 100):
            c.log_batch(rid, params=params[j:j + 100])
        metrics = []
        if drop is not None:
            val = TEACHER_VAL - drop
            metrics += [Metric("epoch", 2.0, now, 2), Metric("best_val_top1", val, now, 2),
                        Metric("val_drop", drop, now, 2), Metric("bitops", bitops, now, 2),
                        Metric("size_bits", bitops / 10, now, 2)]
            if status == "finished":
                metrics += [Metric("final", 1.0, now, 3), Metric("val_drop", drop, now, 3),
                            Metric("best_test_top1", val - 0.5, now, 3), Metric("epochs_run", 3.0, now, 3),
                            Metric("compression", 32 / wb, now, 3)]
        if metrics:
            c.log_batch(rid, metrics=metrics)
        if status == "failed":
            c.log_batch(rid, tags=[RunTag(TAG.FAILURE, "TrainingDiverged: loss is NaN at epoch 2")])
        if with_configs:
            c.log_text(rid, dump_config(cfg), "config.yaml")
        c.set_terminated(rid, {"finished": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}[status])
    c.set_terminated(parent, "FINISHED")
    return parent
