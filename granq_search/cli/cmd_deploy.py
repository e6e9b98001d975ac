"""``deploy``: a trained student -> a deployable ONNX file, checked against PyTorch.

    granq-search deploy --run runs/train/digits-... --output student.onnx
    granq-search deploy --run RUN_DIR --output s.onnx --which final --fp-output teacher_fp.onnx

The student of a ``train`` run (``config.yaml`` + ``student_<which>.pt``; with an MLflow build
that has MLflow model loading in ``student_io``, also a model URI such as ``models:/NAME/1``) is written as
ONNX with integer weights (uint8/int8 codes + ``DequantizeLinear``) and its activation
quantizers at run time (see :mod:`granq_search.export.onnx_export`). By default the file is
then run with ONNX Runtime next to the PyTorch student on the run's validation split (built
from the run's config), and the top-1 agreement, both accuracies and the largest logit
difference are reported; an agreement below ``--min-agreement`` is an error. The float teacher
is exported as well (``--fp-output``, or a temporary file) to compare the sizes.

Nothing is half-written: the files are written under temporary names and moved into place
only after export and verification succeeded.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from granq_search import metrics as M
from granq_search.cli.cmd_export import fmt_num as _fmt
from granq_search.cli.common import add_format_flag, emit_json, set_threads
from granq_search.errors import GranqError

__all__ = ["add_parser", "run", "load_bundle"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="export a trained student to ONNX (integer weights) and verify it",
                       description="Write the quantized student of a train run as ONNX: weights as 8-bit integer "
                       "codes with their scales (DequantizeLinear), activations quantized at run time with the "
                       "trained bits, granularity (GranQ per sample and channel, per channel, per tensor, "
                       "threshold decisions) and placement; then check it with ONNX Runtime against the PyTorch "
                       "student on the run's validation split. Needs: pip install 'granq_search[deploy]'.")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="output directory of a finished `train` run (or an MLflow model URI such as "
                   "models:/NAME/1 where supported)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store of a model URI given as --run (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--output", required=True, metavar="FILE.onnx", help="where to write the quantized student")
    p.add_argument("--which", choices=("best", "final"), default="best",
                   help="the best-validation student (default) or the last epoch's")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="compare ONNX Runtime with the PyTorch student on the validation split (default: on)")
    p.add_argument("--min-agreement", type=float, default=95.0, metavar="PCT",
                   help="with --verify: fail (and write nothing) below this top-1 agreement in %% (default 95, "
                   "which catches a broken export; deep 3-4 bit students agree on about 98-100%% of the images, "
                   "their sensitivity to float rounding, see docs/benchmarks.md)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="with --verify: compare on the first N validation batches only")
    p.add_argument("--fp-output", default=None, metavar="FILE.onnx",
                   help="also write the float teacher as ONNX here (otherwise it is exported to a temporary "
                   "file, for the size comparison only)")
    p.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default 17; 13..20)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch and ONNX Runtime (default: their own)")
    add_format_flag(p)


def load_bundle(source: str, which: str, tracking_uri: str | None = None):
    """The :class:`StudentBundle` (model, config, source, input shape) of ``source``: a run
    folder (``load_student_dir``) or, when this build of ``student_io`` has MLflow support
    (``is_model_uri`` / ``load_student_uri``), a model URI such as ``models:/NAME/1``."""
    from granq_search.pipeline import student_io

    is_uri = getattr(student_io, "is_model_uri", None)
    by_uri = getattr(student_io, "load_student_uri", None)
    if is_uri is not None and by_uri is not None and is_uri(source):
        if which != "best":
            raise GranqError(f"--which {which}: an MLflow model holds the best-validation student only; "
                             "use --which best or give the run folder")
        kwargs: dict[str, Any] = {}
        if tracking_uri is not None:
            try:
                accepts = "tracking_uri" in inspect.signature(by_uri).parameters
            except (TypeError, ValueError):
                accepts = False
            if not accepts:
                raise GranqError("--tracking-uri is not supported by this build; set MLFLOW_TRACKING_URI")
            kwargs["tracking_uri"] = tracking_uri
        return by_uri(str(source), **kwargs)
    if tracking_uri is not None:
        raise GranqError("--tracking-uri only applies to an MLflow model URI given as --run")
    return student_io.load_student_dir(source, which=which)


def _check_target(path: Path, flag: str) -> None:
    if path.is_dir():
        raise GranqError(f"{flag} '{path}' is a directory; give a file name such as student.onnx")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise GranqError(f"{flag} '{path}': '{parent}' is not a directory")


def _make_parents(paths: list[Path]) -> list[Path]:
    """Create the missing parent folders of ``paths``; returns those created, outermost first."""
    created: list[Path] = []
    for path in paths:
        missing = [p for p in reversed(path.absolute().parents) if not p.exists()]
        for d in missing:
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise GranqError(f"cannot create the folder '{d}' for '{path}' ({e.strerror or e})") from None
            created.append(d)
    return created


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    from granq_search.export.onnx_export import DEFAULT_OPSET, require_onnx

    require_onnx()  # before anything is loaded: one line telling how to install
    set_threads(args.threads)
    if args.max_batches is not None and args.max_batches < 1:
        raise GranqError(f"--max-batches must be >= 1, got {args.max_batches}")
    if not (math.isfinite(args.min_agreement) and 0.0 <= args.min_agreement <= 100.0):
        raise GranqError(f"--min-agreement must be a percentage in [0, 100], got {args.min_agreement}")
    output = Path(args.output)
    fp_output = Path(args.fp_output) if args.fp_output else None
    _check_target(output, "--output")
    if fp_output is not None:
        _check_target(fp_output, "--fp-output")
        if fp_output.resolve() == output.resolve():
            raise GranqError("--fp-output and --output name the same file; give two different files")
    opset = DEFAULT_OPSET if args.opset is None else args.opset

    bundle = load_bundle(args.run, args.which, args.tracking_uri)
    pending: list[tuple[Path, Path]] = []  # (temporary, final)
    tmp_dir = tempfile.TemporaryDirectory(prefix="granq_deploy_")
    created = _make_parents([output] + ([fp_output] if fp_output is not None else []))
    done = False
    try:
        doc = _deploy(args, bundle, output, fp_output, opset, pending, Path(tmp_dir.name))
        for tmp, final in pending:
            os.replace(tmp, final)
        pending.clear()
        done = True
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        tmp_dir.cleanup()
        if not done:
            for d in reversed(created):  # folders this command made for its outputs, if still empty
                try:
                    d.rmdir()
                except OSError:
                    pass
    doc["mlflow"] = _log_to_run(args.run, args.tracking_uri, output, doc)

    if args.format == "json":
        emit_json(doc)
        return 0
    _print_table(doc)
    return 0


def _deploy(args: argparse.Namespace, bundle, output: Path, fp_output: Path | None, opset: int,
            pending: list[tuple[Path, Path]], scratch: Path) -> dict[str, Any]:
    from granq_search.export.onnx_export import export_float_onnx, export_onnx, onnx_summary, tmp_path
    from granq_search.export.onnx_verify import verify_onnx

    q_tmp = tmp_path(output)
    pending.append((q_tmp, output))
    export_onnx(bundle.model, bundle.in_shape, q_tmp, opset=opset)
    summary = onnx_summary(q_tmp)  # once: the file is only renamed from here on
    meta = summary.pop("metadata")

    setup = None
    if args.verify or fp_output is not None:
        from granq_search.pipeline.trainer import build_setup

        setup = build_setup(bundle.cfg, "cpu")  # the run's teacher and its validation / test split
    verify = None
    if args.verify:
        assert setup is not None
        verify = verify_onnx(q_tmp, bundle.model, setup.val, max_batches=args.max_batches, threads=args.threads)
        if verify["agreement"] < args.min_agreement:
            raise GranqError(f"ONNX Runtime and the PyTorch student agree on only {verify['agreement']:.2f}% of "
                             f"the top-1 predictions (< --min-agreement {args.min_agreement}); nothing written")

    # the float model: the real teacher when it is built anyway, else the same architecture (its file
    # size does not depend on the weight values)
    if setup is not None:
        float_model = setup.teacher
    else:
        from granq_search.models import create_model

        float_model = create_model(bundle.cfg.model.name, num_classes=bundle.cfg.model.num_classes)
    if fp_output is not None:
        fp_path = tmp_path(fp_output)
        pending.append((fp_path, fp_output))
    else:
        fp_path = scratch / "teacher_fp.onnx"
    export_float_onnx(float_model, bundle.in_shape, fp_path, opset=opset)

    q_bytes, fp_bytes = os.path.getsize(q_tmp), os.path.getsize(fp_path)

    return {
        "output": str(output),
        "run": str(bundle.source),
        "which": args.which,
        "model": bundle.cfg.model.name,
        "in_shape": list(bundle.in_shape),
        "opset": opset,
        "bytes": q_bytes,
        "fp_bytes": fp_bytes,
        "fp_output": str(fp_output) if fp_output is not None else None,
        "size_ratio": fp_bytes / q_bytes if q_bytes else None,
        "verify": verify,
        M.TEACHER_VAL_TOP1: setup.teacher_val.get("top1") if setup is not None else None,
        "sites": json.loads(meta.get("granq.sites", "[]")),
        "layers": json.loads(meta.get("granq.layers", "[]")),
        "summary": summary,
    }


def _source_run(source: str, tracking_uri: str | None) -> tuple[str, str] | None:
    """(tracking URI, run id) of the MLflow run a student came from: a train folder's
    ``mlflow_run.json``, ``runs:/ID/...``, or the run of ``models:/NAME/VERSION``; None if unknown."""
    from granq_search.tracking.train_target import read_run_file

    if Path(source).is_dir():
        rec = read_run_file(source)
        return (rec["tracking_uri"], rec["run_id"]) if rec else None
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None
    if source.startswith("runs:/"):
        return uri, source[len("runs:/"):].split("/", 1)[0]
    if source.startswith("models:/"):
        from mlflow.tracking import MlflowClient

        name, _, version = source[len("models:/"):].partition("/")
        if version.isdigit():
            return uri, MlflowClient(uri, registry_uri=uri).get_model_version(name, version).run_id
    return None


def _log_to_run(source: str, tracking_uri: str | None, output: Path, doc: dict[str, Any]) -> dict[str, Any] | None:
    """Log the ONNX file and its verification to the student's MLflow run (artifact folder
    ``onnx/``). Never fails the command: the file is written; a problem is a warning."""
    try:
        found = _source_run(source, tracking_uri)
        if found is None:
            return None
        uri, run_id = found
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.log_artifact(run_id, str(output), "onnx")
        report = {k: v for k, v in doc.items() if k not in ("sites", "layers")}
        client.log_text(run_id, json.dumps(report, indent=2, default=str), f"onnx/{output.stem}.json")
        if doc.get("verify"):
            client.log_metric(run_id, M.ONNX_AGREEMENT, float(doc["verify"]["agreement"]))
        client.log_metric(run_id, M.ONNX_BYTES, float(doc["bytes"]))
        return {"run_id": run_id, "artifact": f"onnx/{output.name}"}
    except Exception as e:  # noqa: BLE001 - the ONNX file is written; recording it is secondary
        from granq_search.tracking.mlflow_io import one_line

        print(f"warning: the ONNX file was not logged to the student's MLflow run ({type(e).__name__}: "
              f"{one_line(e)[:200]})", file=sys.stderr)
        return None


def _print_table(doc: dict[str, Any]) -> None:
    print(f"exported the {doc['which']} student of {doc['run']} ({doc['model']}) to {doc['output']}")
    print(f"  size: {_fmt_bytes(doc['bytes'])} ({doc['bytes']} bytes) vs FP ONNX {_fmt_bytes(doc['fp_bytes'])} "
          f"({doc['fp_bytes']} bytes): {_fmt(doc['size_ratio'], '.2f')}x smaller"
          + (f"; FP model written to {doc['fp_output']}" if doc["fp_output"] else ""))
    layers, sites = doc["layers"], doc["sites"]
    if layers:
        kinds = sorted({f"{x['dtype']} {x['granularity']} {x['bits']}-bit" for x in layers})
        print(f"  weights: {len(layers)} layers as integer codes + DequantizeLinear ({', '.join(kinds)})")
    active = [s for s in sites if s["bits"] != 32]
    if sites:
        kinds = sorted({f"{s['role']} {s['bits']}-bit {s['granularity']}" for s in active})
        print(f"  activations: {len(active)} of {len(sites)} sites quantized at run time ({'; '.join(kinds)})")
    v = doc["verify"]
    if v is None:
        print("  not verified (--no-verify)")
        return
    print(f"  verified with ONNX Runtime on {v['n']} validation images: top-1 agreement {v['agreement']:.2f}%, "
          f"top-1 ONNX {_fmt(v['onnx_top1'], '.2f')}% vs PyTorch {_fmt(v['torch_top1'], '.2f')}% "
          f"(diff {_fmt(v['top1_diff'], '+.2f')}), max |logit diff| {v['max_abs_diff']:.3g}")
    if doc.get(M.TEACHER_VAL_TOP1) is not None:
        print(f"  FP teacher val top-1: {doc[M.TEACHER_VAL_TOP1]:.2f}%")
    if doc.get("mlflow"):
        print(f"  logged to MLflow run {doc['mlflow']['run_id']} as {doc['mlflow']['artifact']}")
