"""Soak: one long search of many short trials; does the driver grow, does anything outlive it?

    .venv/bin/python bench/soak.py [--trials 50] [--concurrent 2] [--no-write]

Runs ``python tune_main.py search`` (the embedded digits default, 2 trials at a time, tiny
fidelity: ``train.epochs=2 train.iters_per_epoch=3 data.max_samples=300``) as a subprocess,
samples the driver's resident memory (``/proc/PID/status`` VmRSS) and its process tree every
second, and notes the driver's RSS each time another tenth of the trials has ended (from the
Optuna journal). After the driver exits it waits a grace period and lists every process of the
recorded tree (pid and start time, so a reused pid is never counted) still alive: Ray's GCS,
raylet, workers, agents, an MLflow process. Those are reported as leaked and then killed (by
pid, only those). The record is checked too: N MLflow children under one parent, none RUNNING.

Writes the table to docs/benchmarks.md ("Soak: 50 trials").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench._doc import write_section  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "reliability"))
from reliability_helpers import alive, tree  # noqa: E402  (the /proc process-tree helpers, shared)

FIDELITY = ["train.epochs=2", "train.iters_per_epoch=3", "data.max_samples=300"]


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _ended(journal: Path, study: str) -> int:
    if not journal.is_file():
        return 0
    try:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        storage = JournalStorage(JournalFileBackend(str(journal)))
        trials = storage.get_all_trials(storage.get_study_id_from_name(study))
    except Exception:  # noqa: BLE001 - the driver may be mid-write; try again next time
        return -1
    return sum(1 for t in trials if t.state != TrialState.RUNNING and "duplicate_of" not in t.user_attrs)


def _short(cmd: str) -> str:
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env", "monitor.py", "mlflow"):
        if key in cmd:
            return key
    return cmd.split()[0].rsplit("/", 1)[-1] if cmd.startswith("/") else cmd[:30]


def run(trials: int, concurrent: int, workdir: Path, grace_s: float) -> dict:
    name = "soak"
    out_dir = workdir / "runs"
    cmd = [sys.executable, str(REPO / "tune_main.py"), "search", "--name", name, "--output-dir", str(out_dir),
           "--num-samples", str(trials), "--max-concurrent", str(concurrent), "--no-progress", "--format", "json"]
    for s in FIDELITY:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    log = open(workdir / "driver.log", "wb")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, cwd=workdir)
    seen: dict[int, int] = {}
    samples: list[tuple[float, float, int, float]] = []  # (t, driver RSS MiB, tree size, tree RSS MiB)
    milestones: dict[int, float] = {}
    journal = out_dir / name / "optuna.journal"
    step = max(1, trials // 10)
    stdout_chunks = []
    import threading

    reader = threading.Thread(target=lambda: stdout_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    next_journal = 0.0
    first_trial_at = None
    while proc.poll() is None:
        tree_now = tree(proc.pid)
        seen.update(tree_now)
        rss = _rss_mib(proc.pid)
        if rss is not None:
            tree_rss = sum(r for r in (_rss_mib(p) for p in tree_now) if r is not None)
            samples.append((time.time() - t0, rss, len(tree_now), tree_rss))
        if time.time() >= next_journal:
            n = _ended(journal, name)
            if n >= 0:
                if first_trial_at is None and journal.is_file():
                    first_trial_at = time.time() - t0
                for k in range(step, n + 1, step):
                    if k not in milestones and rss is not None:
                        milestones[k] = rss
            next_journal = time.time() + 2.0
        time.sleep(1.0)
    wall = time.time() - t0
    reader.join(timeout=30)
    log.close()
    rc = proc.returncode
    try:
        doc = json.loads(b"".join(stdout_chunks).decode() or "{}")
    except ValueError:
        doc = {}
    time.sleep(grace_s)
    leaked = {pid: cmd for pid, cmd in alive(seen).items() if pid != proc.pid}
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    record = _check_record(out_dir, name)
    after_start = [s for s in samples if first_trial_at is None or s[0] >= first_trial_at]
    return {"rc": rc, "wall_s": wall, "doc": doc, "samples": samples, "milestones": milestones, "leaked": leaked,
            "seen": len(seen), "record": record, "start_rss": after_start[0][1] if after_start else float("nan"),
            "first_trial_at": first_trial_at}


def _check_record(out_dir: Path, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{out_dir / 'mlflow.db'}")
    exp = c.get_experiment_by_name("granq_search")
    parents = list(c.search_runs([exp.experiment_id], f"tags.`granq.search` = '{name}' and tags.`granq.kind` = 'search'"))
    children = list(c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'",
                                  max_results=1000)) if parents else []
    return {"parents": len(parents), "children": len(children),
            "running": sum(1 for r in children if r.info.status == "RUNNING"),
            "statuses": {s: sum(1 for r in children if r.data.tags.get("granq.status") == s)
                         for s in ("finished", "pruned", "failed", "interrupted")}}


def table(res: dict, trials: int, concurrent: int) -> str:
    samples = res["samples"]
    peak = max(samples, key=lambda s: s[1]) if samples else (0, float("nan"), 0, 0)
    end = samples[-1] if samples else (0, float("nan"), 0, 0)
    doc = res["doc"]
    counts = doc.get("counts", {})
    rec = res["record"]
    leaked = res["leaked"]
    names = sorted({_short(c) for c in leaked.values()})
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| trials (Ray) | {doc.get('num_trials', '?')} of {trials}, {concurrent} at a time; status "
        f"{doc.get('status', '?')} (exit {res['rc']}) |",
        f"| Optuna states | complete {counts.get('complete', '?')}, pruned {counts.get('pruned', '?')}, "
        f"fail {counts.get('fail', '?')}, running {counts.get('running', '?')} |",
        f"| MLflow record | {rec['parents']} parent, {rec['children']} children ({rec['statuses']['finished']} "
        f"finished, {rec['statuses']['pruned']} pruned, {rec['statuses']['failed']} failed), "
        f"{rec['running']} RUNNING |",
        f"| wall time | {res['wall_s']:.0f} s ({res['wall_s'] / max(1, doc.get('num_trials', trials)):.1f} s per "
        f"trial; first trial after {res['first_trial_at'] or float('nan'):.0f} s) |",
        f"| driver RSS start (first trial) / peak / end | {res['start_rss']:.0f} / {peak[1]:.0f} (at {peak[0]:.0f} s) "
        f"/ {end[1]:.0f} MiB |",
        f"| driver RSS after {'/'.join(str(k) for k in sorted(res['milestones']))} trials ended | "
        + " / ".join(f"{v:.0f}" for _, v in sorted(res["milestones"].items())) + " MiB |",
        f"| process tree (driver + Ray) | peak {max((s[2] for s in samples), default=0)} processes, "
        f"{max((s[3] for s in samples), default=0):.0f} MiB RSS; {res['seen']} processes seen in all |",
        f"| leaked processes (alive 5 s after the driver exited) | {len(leaked)}"
        + (f": {', '.join(names)}" if names else "") + " |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--grace", type=float, default=5.0, help="seconds to wait after the driver exits")
    ap.add_argument("--keep", action="store_true", help="keep the search folder (printed)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="granq_soak_"))
    res = run(args.trials, args.concurrent, workdir, args.grace)
    body = table(res, args.trials, args.concurrent)
    print(body)
    if res["leaked"]:
        print("\nleaked (killed now):")
        for pid, cmd in sorted(res["leaked"].items()):
            print(f"  {pid}: {cmd[:160]}")
    if args.keep:
        print(f"\nsearch folder: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if not args.no_write:
        text = (f"`.venv/bin/python bench/soak.py --trials {args.trials} --concurrent {args.concurrent}`: the "
                f"embedded digits search, {args.trials} trials, {args.concurrent} at a time, 1 CPU each, at a tiny "
                f"fidelity (`--set {' '.join(FIDELITY)}`), on {os.cpu_count()} shared CPU cores. The driver's "
                "resident memory is sampled every second; processes of the driver's tree still alive 5 s after it "
                "exited count as leaked.\n\n" + body)
        print(f"\nwritten to {write_section('benchmarks.md', f'Soak: {args.trials} trials', text)}")


if __name__ == "__main__":
    main()
