"""Checks the search driver makes before Ray starts, so that a wrong ``--address`` or an unusable
``--storage-path`` ends the command in seconds with one line instead of minutes of Ray retries.

* :func:`probe_ray_address`: a TCP connect (``CONNECT_TIMEOUT_S``) to the cluster's GCS
  (``HOST:PORT``) or Ray Client server (``ray://HOST:PORT``), then the HTTP/2 connection preface
  that every gRPC server answers with a SETTINGS frame (``ANSWER_TIMEOUT_S``): a refused port, a
  host that does not answer, an HTTP/1 server (the dashboard port, 8265, is the usual mistake) or
  a service that is not gRPC fail here. ``auto`` (and no address at all) is checked only when
  ``RAY_ADDRESS`` names the cluster; otherwise Ray finds a running instance on this machine by
  itself and fails quickly when there is none. With ``RAY_USE_TLS`` on, only the TCP connect is
  checked (the preface would need a TLS handshake).
* :func:`check_writable_dir`: a local directory that exists or can be created, and that takes a
  file (a temporary one, removed at once); nothing is created otherwise. URIs (``s3://``,
  ``gs://``, ...) are left to Ray: probing them could wait on the network.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from granq_search.errors import GranqError
from granq_search.tracking.uri import redact_uri

__all__ = ["PreflightError", "RayEndpoint", "parse_ray_address", "probe_ray_address", "check_writable_dir",
           "URI_SCHEME", "CONNECT_TIMEOUT_S", "ANSWER_TIMEOUT_S"]

CONNECT_TIMEOUT_S = 5.0
"""Seconds a TCP connect to the cluster may take."""

ANSWER_TIMEOUT_S = 5.0
"""Seconds the cluster may take to answer the HTTP/2 preface."""

_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame, stream 0
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.\-]+)):(?P<port>\d{1,5})$")
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""A URI (``s3://``, ``file://``, ...) rather than a local path."""


class PreflightError(GranqError):
    """The cluster or the storage a search needs is not usable; raised before Ray starts."""


@dataclass(frozen=True)
class RayEndpoint:
    host: str
    port: int
    client: bool
    """True for a Ray Client address (``ray://``)."""
    shown: str
    """The address as the user gave it (for messages)."""
    source: str
    """Where it came from: ``--address`` or ``RAY_ADDRESS``."""


def parse_ray_address(address: str | None, environ: dict[str, str] | None = None) -> RayEndpoint | None:
    """The endpoint Ray would connect to, or None when Ray starts locally or finds the cluster
    itself (``auto`` without ``RAY_ADDRESS``)."""
    env = os.environ if environ is None else environ
    source = "--address"
    if address in (None, "auto"):
        from_env = env.get("RAY_ADDRESS", "").strip()
        if not from_env or from_env in ("auto", "local"):
            return None
        address, source = from_env, "RAY_ADDRESS"
    assert address is not None
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    rest = rest.split("/", 1)[0].rsplit("@", 1)[-1]  # ray://HOST:PORT[/...]; no credentials in the probe
    m = _HOST_PORT.match(rest)
    if m is None and client:
        m = _HOST_PORT.match(f"{rest}:10001")  # Ray Client's default port
    if m is None or not 0 < int(m["port"]) < 65536:
        raise PreflightError(f"{source} {redact_uri(address)!r} is not a Ray address; use auto, HOST:PORT or "
                             "ray://HOST:PORT")
    return RayEndpoint(host=m["v6"] or m["host"], port=int(m["port"]), client=client, shown=address, source=source)


def _what_to_do(ep: RayEndpoint) -> str:
    if ep.source == "RAY_ADDRESS":
        return "start the cluster, or unset RAY_ADDRESS to run on this machine"
    port = "the Ray Client port, 10001 by default" if ep.client else "the head's GCS port, 6379 by default"
    return f"start the cluster (`ray start --head`) or check --address ({port}); drop --address to run on this machine"


def _tls() -> bool:
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true", "yes")


def probe_ray_address(address: str | None, *, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                      answer_timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Raise :class:`PreflightError` (one line naming the address) when the Ray cluster at
    ``address`` cannot answer; see the module docstring."""
    ep = parse_ray_address(address)
    if ep is None:
        return
    what = "Ray Client server" if ep.client else "Ray cluster"
    head = f"cannot reach the {what} at {ep.shown}" + (" (RAY_ADDRESS)" if ep.source == "RAY_ADDRESS" else "")
    try:
        sock = socket.create_connection((ep.host, ep.port), timeout=connect_timeout_s)
    except socket.timeout:
        raise PreflightError(f"{head}: no answer within {connect_timeout_s:g} s; {_what_to_do(ep)}") from None
    except socket.gaierror as e:
        raise PreflightError(f"{head}: unknown host {ep.host!r} ({e.strerror}); {_what_to_do(ep)}") from None
    except OSError as e:
        why = "connection refused, nothing listens there" if e.errno == errno.ECONNREFUSED else \
            (e.strerror or type(e).__name__)
        raise PreflightError(f"{head}: {why}; {_what_to_do(ep)}") from None
    if _tls():
        sock.close()
        return
    with sock:
        sock.settimeout(answer_timeout_s)
        answer = b""
        try:
            sock.sendall(_H2_PREFACE + _H2_SETTINGS)
            while len(answer) < 9:
                chunk = sock.recv(9 - len(answer))
                if not chunk:
                    break
                answer += chunk
        except OSError:  # a timeout, or the peer reset the connection: judged on what came so far
            pass
    if len(answer) == 9 and answer[3] == 0x04 and answer[5:9] == b"\x00\x00\x00\x00":
        return  # a gRPC server: Ray's GCS or its Client server
    if answer.startswith(b"HTTP/"):
        why = "it answers HTTP/1 (a web server such as the Ray dashboard, not the GCS)"
    elif answer:
        why = "it does not answer as a gRPC server"
    else:
        why = f"the port is open but no Ray service answered within {answer_timeout_s:g} s"
    raise PreflightError(f"{head}: {why}; {_what_to_do(ep)}")


def check_writable_dir(path: str, flag: str) -> None:
    """Raise :class:`PreflightError` naming ``path`` unless it is a writable directory or can be
    created as one. URIs other than ``file://`` are not checked. Creates nothing."""
    if URI_SCHEME.match(path):
        if not path.startswith("file://"):
            return
        path = path[len("file://"):]
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == target else f"cannot be created: {existing} is a file"
        raise PreflightError(f"{flag} {target} {where}; choose a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".granq-write-check-", dir=existing)
    except OSError as e:
        what = "is not writable" if existing == target else f"cannot be created ({existing} is not writable)"
        raise PreflightError(f"{flag} {target} {what}: {e.strerror or type(e).__name__}; choose a directory you "
                             "can write to") from None
    os.close(fd)
    os.unlink(probe)
