"""``train``: run the generator + QAT pipeline on one config (a preset or an exported one)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from granq_search.cli.common import (
    add_config_flags,
    add_format_flag,
    add_runtime_flags,
    config_from_args,
    emit_json,
    set_threads,
)
from granq_search.config import dump_config, read_yaml, split_document
from granq_search.errors import GranqError
from granq_search.jsonutil import json_safe
from granq_search.pipeline.checkpoint import has_checkpoint
from granq_search.pipeline.reporter import CompositeReporter, Reporter
from granq_search.pipeline.terminal import TerminalReporter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one configuration at full budget (production)",
                       description="Run the GranQ generator + QAT pipeline. Writes the resolved config, "
                       "per-epoch metrics (metrics.jsonl), final metrics (final.json), the final and "
                       "best-validation students, and an epoch checkpoint for --resume.")
    add_config_flags(p)
    add_runtime_flags(p)
    p.add_argument("--output-dir", default=None, help="run directory (default: runs/train/NAME-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else the search's store named in an exported "
                   "config's provenance, else sqlite:///<parent of the run folder>/mlflow.db)")
    p.add_argument("--experiment", default=None, metavar="NAME",
                   help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else granq_train)")
    p.add_argument("--register-as", default=None, metavar="NAME",
                   help="register the best-validation student as a new version of this Model Registry name")
    p.add_argument("--no-tracking", action="store_true", help="record nothing in MLflow")
    add_format_flag(p)
    p.epilog = ("A config exported with --search-budget trains with the torch CPU threads its trial ran with "
                "(provenance.threads), so that the run reproduces the trial; --threads overrides it. "
                "The run is recorded as one MLflow run (params, per-epoch and final metrics, config.yaml, "
                "final.json, the student as the MLflow model 'student'); --resume continues that run.")


class _FileReporter(Reporter):
    """Appends one JSON line per epoch to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, epoch, metrics, checkpoint):
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(json_safe(dict(metrics))) + "\n")


def trial_threads(config: str) -> int | None:
    """``provenance.threads`` of a config exported with ``--search-budget`` (None otherwise).

    On CPU the float summation order, and so the trained network, depends on the number of
    torch threads: reproducing a searched trial needs the count it ran with (one per CPU of
    the trial, 1 by default), not torch's default. A production-budget export does not
    reproduce a trial anyway and keeps torch's default.
    """
    if not config.endswith((".yaml", ".yml")) or not Path(config).is_file():
        return None
    try:
        _, provenance = split_document(read_yaml(config), config)
    except GranqError:
        return None  # load_config reports the problem
    if not isinstance(provenance, dict) or provenance.get("budget") != "search":
        return None
    threads = provenance.get("threads")
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 else None


def _default_dir(config: str) -> Path:
    stem = Path(config).stem if config.endswith((".yaml", ".yml")) else config
    return Path("runs") / "train" / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run(args: argparse.Namespace) -> int:
    from granq_search.pipeline.trainer import build_setup, check_checkpoint_dir, run_training

    threads = args.threads
    if threads is None:
        threads = trial_threads(args.config)
        if threads is not None:
            print(f"train: {threads} torch CPU thread(s), as the searched trial ran (provenance.threads of "
                  f"{args.config}); pass --threads N to change", file=sys.stderr)
    set_threads(threads)
    cfg = config_from_args(args)
    out = Path(args.output_dir) if args.output_dir else _default_dir(args.config)
    ckpt_dir = out / "checkpoints"
    if not args.resume and out.exists() and any(out.iterdir()):
        raise GranqError(f"output directory '{out}' is not empty; pass --resume to continue it or "
                         "choose another --output-dir")
    check_checkpoint_dir(ckpt_dir, args.resume)  # before anything is recorded or created
    target = None
    if not args.no_tracking:  # an unusable store fails here, before anything is trained or created
        from granq_search.tracking.train_target import resolve_target

        target = resolve_target(args.tracking_uri, args.experiment, args.config, out, resume=args.resume)
    elif args.register_as:
        raise GranqError("--register-as needs the MLflow record; drop --no-tracking")
    setup = build_setup(cfg, args.device)  # validates model, checkpoint and data before writing anything
    tracker = None
    if target is not None:
        from granq_search.tracking.train_run import TrainRun

        tracker = TrainRun.open(target, setup.cfg, config_source=args.config, output_dir=out, command=sys.argv)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if tracker is not None:
            tracker.write_run_file(out)
        dump_config(setup.cfg, out / "config.yaml")
        reporters: list[Reporter] = [
            _FileReporter(out / "metrics.jsonl"),
            TerminalReporter(progress=not args.no_progress, epochs=setup.cfg.train.epochs,
                             iters_per_epoch=setup.cfg.train.iters_per_epoch),
        ]
        if tracker is not None:
            reporters.append(tracker)
        result = run_training(setup.cfg, reporter=CompositeReporter(reporters), checkpoint_dir=ckpt_dir,
                              resume=args.resume, setup=setup)
    except BaseException as err:
        if tracker is not None:
            tracker.abort(err)
        if created and not has_checkpoint(ckpt_dir):
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping was written
        raise
    torch.save(result.student.state_dict(), out / "student_final.pt")
    torch.save(result.best_student.state_dict(), out / "student_best.pt")
    final = {k: v for k, v in result.metrics.items() if k != "history"}
    final["output_dir"] = str(out)
    final["checkpoint_sha256"] = setup.checkpoint_sha256
    final["threads"] = torch.get_num_threads()
    final["data"] = setup.data_meta
    if tracker is not None:
        _record(tracker, final, result.best_student, setup, out, args.register_as)
    else:
        _write_final(out, final)
    if args.format == "json":
        emit_json(final)
    else:
        print(f"run written to {out}")
        if tracker is not None:
            m = final["mlflow"]
            print(f"MLflow run {m['run_id']} (experiment {m['experiment']}, {m['tracking_uri']}); model "
                  f"{m.get('registered_uri') or m['model_uri']}")
    return 0


def _write_final(out: Path, final: dict) -> None:
    (out / "final.json").write_text(json.dumps(json_safe(final), indent=2) + "\n", encoding="utf-8")


def _record(tracker, final: dict, student, setup, out: Path, register_as: str | None) -> None:
    """Final metrics, the student model and its registry version, final.json (with the MLflow
    references), the artifacts; the run FINISHED. The run folder is complete whatever happens."""
    final["mlflow"] = tracker.describe()
    try:
        example = next(iter(setup.val))[0]  # validation images: the model's signature and input example
        final["mlflow"] = tracker.log_results(dict(final), student=student, example=example, output_dir=out,
                                              register_as=register_as)
        _write_final(out, final)
        tracker.close(out)
    except BaseException as err:
        _write_final(out, final)
        tracker.abort(err)
        if isinstance(err, GranqError):
            raise GranqError(f"{err}; the trained run is complete in {out}: rerun with --resume --output-dir {out} "
                             "to record it again") from None
        raise
