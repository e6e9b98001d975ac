"""The checks the search driver makes before Ray starts (granq_search/search/preflight.py): real
sockets and real folders on this machine; a real Ray GCS is probed in test_search_ray.py and by
every search on a cluster (test_search_cluster.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from granq_search.search.preflight import PreflightError, check_writable_dir, parse_ray_address, probe_ray_address


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A TCP server on 127.0.0.1 that answers every connection with ``reply`` (nothing: silent)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.reply:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def server(request) -> Iterator[_Server]:
    s = _Server(request.param)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.parametrize("address, host, port, client", [
    ("10.0.0.5:6379", "10.0.0.5", 6379, False),
    ("head.example:6380", "head.example", 6380, False),
    ("[::1]:6379", "::1", 6379, False),
    ("ray://head:10001", "head", 10001, True),
    ("ray://head", "head", 10001, True),
])
def test_parse_addresses(address, host, port, client):
    ep = parse_ray_address(address, environ={})
    assert (ep.host, ep.port, ep.client, ep.source) == (host, port, client, "--address")


def test_auto_and_local_use_ray_address_only():
    assert parse_ray_address("auto", environ={}) is None
    assert parse_ray_address(None, environ={}) is None
    assert parse_ray_address("auto", environ={"RAY_ADDRESS": "auto"}) is None
    ep = parse_ray_address("auto", environ={"RAY_ADDRESS": "10.1.2.3:6379"})
    assert (ep.host, ep.port, ep.source) == ("10.1.2.3", 6379, "RAY_ADDRESS")
    with pytest.raises(PreflightError, match="is not a Ray address"):
        parse_ray_address("head:99999", environ={})


def test_refused_port_fails_at_once_naming_the_address():
    port = _closed_port()
    t0 = time.time()
    with pytest.raises(PreflightError) as e:
        probe_ray_address(f"127.0.0.1:{port}")
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "connection refused" in msg and "ray start --head" in msg
    assert "\n" not in msg


def test_ray_address_variable_is_named(monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(PreflightError, match=r"\(RAY_ADDRESS\).*unset RAY_ADDRESS"):
        probe_ray_address("auto")
    with pytest.raises(PreflightError, match="RAY_ADDRESS"):
        probe_ray_address(None)


@pytest.mark.parametrize("server", [b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"], indirect=True)
def test_http_server_is_not_a_cluster(server):
    with pytest.raises(PreflightError, match="HTTP/1.*GCS port, 6379"):
        probe_ray_address(f"127.0.0.1:{server.port}")


@pytest.mark.parametrize("server", [b""], indirect=True)
def test_silent_port_fails_after_the_answer_timeout(server):
    t0 = time.time()
    with pytest.raises(PreflightError, match="no Ray service answered within 0.5 s"):
        probe_ray_address(f"127.0.0.1:{server.port}", answer_timeout_s=0.5)
    assert time.time() - t0 < 5


@pytest.mark.parametrize("server", [b"SSH-2.0-OpenSSH_9.6\r\n"], indirect=True)
def test_other_protocol_is_not_a_cluster(server):
    with pytest.raises(PreflightError, match="does not answer as a gRPC server"):
        probe_ray_address(f"ray://127.0.0.1:{server.port}")


# --------------------------------------------------------------------------- storage


def test_writable_dir_existing_or_creatable_creates_nothing(tmp_path):
    check_writable_dir(str(tmp_path), "--storage-path")
    check_writable_dir(str(tmp_path / "a" / "b"), "--storage-path")
    check_writable_dir(f"file://{tmp_path / 'c'}", "--storage-path")
    check_writable_dir("s3://bucket/prefix", "--storage-path")  # URIs are left to Ray
    assert list(tmp_path.iterdir()) == []


def test_path_under_a_file(tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("x")
    with pytest.raises(PreflightError, match=f"--storage-path {f}/ray cannot be created: {f} is a file"):
        check_writable_dir(str(f / "ray"), "--storage-path")
    with pytest.raises(PreflightError, match=f"--output-dir {f} is a file"):
        check_writable_dir(str(f), "--output-dir")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PreflightError, match=f"--storage-path {ro}/x cannot be created .*not writable"):
            check_writable_dir(str(ro / "x"), "--storage-path")
    finally:
        ro.chmod(0o755)


def test_unwritable_dir_even_as_root(tmp_path, monkeypatch):
    """The refusal path itself, independent of who runs the tests (root ignores 0o555)."""
    import errno

    from granq_search.search import preflight

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    with pytest.raises(PreflightError, match=f"^--storage-path {tmp_path}/x cannot be created \\({tmp_path} is not "
                                             "writable\\): Permission denied; choose a directory you can write to$"):
        check_writable_dir(str(tmp_path / "x"), "--storage-path")
    with pytest.raises(PreflightError, match=f"^--output-dir {tmp_path} is not writable: Permission denied"):
        check_writable_dir(str(tmp_path), "--output-dir")
    assert list(tmp_path.iterdir()) == []


def test_read_only_file_system():
    ro = Path("/proc/granq-search-check")  # procfs takes no new files, not even from root
    with pytest.raises(PreflightError, match="^--storage-path /proc/granq-search-check cannot be created "
                                             "\\(/proc is not writable\\)"):
        check_writable_dir(str(ro), "--storage-path")
