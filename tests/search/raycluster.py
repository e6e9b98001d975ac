"""A real Ray cluster on this machine for tests: ``ray start --head --block`` plus optional extra
nodes (``ray start --address ... --block``), each a subprocess of the test with its own ports.

Every process is ended by the id of the ``ray start`` process that started it (SIGTERM makes a
blocking ``ray start`` stop its own raylet, GCS and agents); whatever is left of the process
tree recorded while the cluster ran is then killed by pid. Nothing is stopped by name, and
``ray stop`` (which stops every Ray on the machine) is never used.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _port_block(n: int) -> int:
    for _ in range(200):
        base = random.randrange(20000, 60000, 10)
        if all(_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


def _children() -> dict[int, int]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                out[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _tree(root: int) -> set[int]:
    parents = _children()
    found, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
        found |= frontier
    return found


class LocalCluster:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tmp)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.seen: set[int] = set()
        self.address: str | None = None
        self.temp_dir = f"/tmp/rc{random.randrange(10**6)}"  # short: unix socket paths are limited

    def _ports(self) -> list[str]:
        b = _port_block(110)
        return ["--node-manager-port", str(b), "--object-manager-port", str(b + 1),
                "--dashboard-agent-listen-port", str(b + 2), "--dashboard-agent-grpc-port", str(b + 3),
                "--runtime-env-agent-port", str(b + 4), "--metrics-export-port", str(b + 5),
                "--min-worker-port", str(b + 10), "--max-worker-port", str(b + 109)]

    def _start(self, args: list[str], log: str) -> None:
        fh = open(self.tmp / log, "w")
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args, *self._ports()],
                                stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp)
        self.procs.append(proc)

    def _nodes(self) -> int:
        r = subprocess.run([RAY, "status", "--address", self.address], capture_output=True, text=True,
                           env=self.env, timeout=60)
        return r.stdout.count(" node_") if "Active:" in r.stdout else 0

    def start(self, nodes: list[dict], timeout: float = 90.0) -> str:
        """``nodes[0]`` is the head; each dict: ``num_cpus``, ``num_gpus``."""
        port = _port_block(2)
        self.address = f"127.0.0.1:{port}"
        head = nodes[0]
        self._start(["--head", "--port", str(port), "--temp-dir", self.temp_dir, "--include-dashboard", "false",
                     "--dashboard-port", str(port + 1), "--num-cpus", str(head.get("num_cpus", 1)),
                     "--num-gpus", str(head.get("num_gpus", 0))], "head.log")
        self._wait(1, timeout)
        for i, node in enumerate(nodes[1:], start=1):
            self._start(["--address", self.address, "--num-cpus", str(node.get("num_cpus", 1)),
                         "--num-gpus", str(node.get("num_gpus", 0))], f"node{i}.log")
            self._wait(i + 1, timeout)
        return self.address

    def _wait(self, n: int, timeout: float) -> None:
        end = time.time() + timeout
        while time.time() < end:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}; see {self.tmp}")
            try:
                if self._nodes() >= n:
                    self._record_tree()
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"the Ray cluster did not reach {n} node(s) in {timeout:.0f} s; see {self.tmp}")

    def _record_tree(self) -> None:
        for p in self.procs:
            self.seen |= _tree(p.pid)

    def stop(self) -> None:
        self._record_tree()
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        time.sleep(1.0)
        alive = set(_children())
        for pid in self.seen & alive:
            try:  # only what still looks like one of ours (a pid may have been reused meanwhile)
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"ray" in cmd:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        subprocess.run(["rm", "-rf", self.temp_dir], check=False)
