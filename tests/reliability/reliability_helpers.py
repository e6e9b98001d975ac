"""Helpers for the reliability tests: a real MLflow server that can be killed and restarted,
process trees recorded while they live and ended by pid, subprocess drivers, record readers.

Nothing here stops a process by name: every process a test starts is ended through the id of
the process (or process group) it started, and leftovers are killed only if they were seen in
that process's tree (pid and start time recorded, so a reused pid is never hit).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


# ----------------------------------------------------------------------------- processes


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid``, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _all() -> dict[int, tuple[int, int]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                out[int(d)] = st
    return out


def tree(root: int) -> dict[int, int]:
    """``{pid: start time}`` of ``root`` and all its descendants now."""
    procs = _all()
    if root not in procs:
        return {}
    found, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier and p not in found}
        found |= frontier
    return {p: procs[p][1] for p in found}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(seen: dict[int, int]) -> dict[int, str]:
    """The processes of ``seen`` (pid -> start time) still running: pid -> command line."""
    out = {}
    for pid, start in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            out[pid] = cmdline(pid)
    return out


def kill_seen(seen: dict[int, int], grace_s: float = 2.0) -> dict[int, str]:
    """SIGKILL what is left of processes recorded in ``seen``; returns what was still alive."""
    time.sleep(grace_s)
    left = alive(seen)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return left


class Watched:
    """A subprocess whose process tree is recorded (call :meth:`record` while it runs)."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
                 new_session: bool = False) -> None:
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=new_session)
        self.seen: dict[int, int] = {}
        self.record()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def record(self) -> None:
        self.seen.update(tree(self.proc.pid))

    def kill(self) -> None:
        """SIGKILL the process itself (not its children)."""
        self.record()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def cleanup(self) -> dict[int, str]:
        if self.proc.poll() is None:
            self.kill()
        left = kill_seen(self.seen)
        self.log.close()
        return left


def driver_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def search_cmd(*args: str) -> list[str]:
    return [PYTHON, str(REPO / "tune_main.py"), "search", *args]


# ----------------------------------------------------------------------------- MLflow server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store, in its own process group.

    :meth:`kill` ends the whole group with SIGKILL (a crash); :meth:`start` again serves the
    same database on the same port.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.db = self.workdir / "server.db"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, int] = {}
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        mlflow_bin = Path(PYTHON).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.db}", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.starts += 1
        log = open(self.workdir / f"server{self.starts}.log", "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            self.seen.update(tree(self.proc.pid))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.seen.update(tree(self.proc.pid))
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.workdir / f"server{self.starts}.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {text}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the server's process group (and anything of its tree left) and wait for the port."""
        if self.proc is None:
            return
        self.seen.update(tree(self.proc.pid))
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        kill_seen(self.seen, grace_s=0.2)
        deadline = time.monotonic() + 30
        while _port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.seen.update(tree(self.proc.pid))
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # workers may outlive the main process
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        kill_seen(self.seen, grace_s=0.2)


# ----------------------------------------------------------------------------- records


def journal_trials(journal: Path, study: str):
    """Every Optuna trial of ``study`` in a journal file (read-only use)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return storage.get_all_trials(storage.get_study_id_from_name(study))


def search_runs(uri: str, search: str, deleted: bool = False):
    """(parents, active children of the first parent, deleted children) of ``search``."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("granq_search")
    parents = list(c.search_runs([exp.experiment_id], f"tags.`granq.search` = '{search}' and "
                                                      "tags.`granq.kind` = 'search'", max_results=1000))
    if not parents:
        return [], [], []
    flt = f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"
    children = list(c.search_runs([exp.experiment_id], flt, max_results=1000))
    gone = list(c.search_runs([exp.experiment_id], flt, run_view_type=ViewType.DELETED_ONLY, max_results=1000))
    return parents, children, gone


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def results_of(trial_dir: Path) -> list[dict]:
    path = Path(trial_dir) / "result.json"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ray_snapshot_text(ray_dir: Path) -> str:
    """The text of Ray's newest experiment snapshot in ``ray_dir`` ('' when there is none yet)."""
    files = sorted(Path(ray_dir).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        return files[-1].read_text(errors="replace") if files else ""
    except OSError:
        return ""


# ----------------------------------------------------------------------------- fakes


class FakeTrial:
    """What the MLflow recorder reads from a ``ray.tune.experiment.Trial``."""

    def __init__(self, trial_id: str, config: dict | None = None, status: str = "RUNNING") -> None:
        self.trial_id = trial_id
        self.config = dict(config or {})
        self.status = status
        self.error_file = None
        self.last_result: dict = {}
        self.local_path = None


def epoch_result(epoch: int, val: float, *, final: bool = False) -> dict:
    r = {"epoch": epoch, "val_top1": val, "best_val_top1": val, "val_drop": 90.0 - val, "pid": 1,
         "training_iteration": epoch}
    if final:
        r.update(final=1.0, bitops=1e6, size_bits=1e5, teacher_val_top1=90.0, teacher_test_top1=89.0,
                 test_top1=val - 1, best_test_top1=val - 1)
    return r
