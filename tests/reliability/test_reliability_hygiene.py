"""Security hygiene, checked on the source itself (fast, no Ray, no server).

* every ``torch.load`` passes ``weights_only=True`` (no pickle code runs from a checkpoint);
* YAML is read with ``yaml.safe_load`` only (no ``yaml.load``/``full_load``/``unsafe_load``);
* every MLflow server/UI command in the docs, examples, benches and tests binds 127.0.0.1, and a
  Ray dashboard host is 127.0.0.1 (the one exception: the KubeRay pod, documented as reachable
  inside the cluster network only); tests and benches start local Ray without a dashboard;
* messages and logs that show a URI show it redacted; the parent run's command line and tags
  carry no credential or token (the real-server case: test_reliability_tracking_server.py).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "granq_search"
CODE = [*sorted(PACKAGE.rglob("*.py")), *sorted((REPO / "bench").glob("*.py")), REPO / "tune_main.py"]
TESTS = sorted((REPO / "tests").rglob("*.py"))
TEXT = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "examples").glob("*.y*ml"))]


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _calls(paths, *names: str):
    for path in paths:
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.Call) and _dotted(node.func) in names:
                yield path, node


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:120]}"


def test_sources_parse_and_are_found():
    assert len(CODE) > 40 and PACKAGE / "models" / "checkpoint.py" in CODE
    assert [p for p in TEXT if p.name == "cluster.md"] and [p for p in TEXT if p.name == "rayjob.yaml"]


def test_every_torch_load_is_weights_only():
    found, bad = [], []
    for path, node in _calls(CODE, "torch.load"):
        found.append(_where(path, node))
        kw = {k.arg: k.value for k in node.keywords}
        value = kw.get("weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            bad.append(_where(path, node))
    assert found, "no torch.load found: the check looks in the wrong place"
    assert not bad, "torch.load without weights_only=True:\n" + "\n".join(bad)
    # and nothing loads pickles another way
    others = [_where(p, n) for p, n in _calls(CODE, "pickle.load", "pickle.loads", "torch.jit.load",
                                                "numpy.load", "np.load")]
    assert not others, others


def test_yaml_is_read_with_safe_load_only():
    used = [_where(p, n) for p, n in _calls(CODE, "yaml.safe_load")]
    unsafe = [_where(p, n) for p, n in _calls(CODE, "yaml.load", "yaml.load_all", "yaml.full_load",
                                                "yaml.full_load_all", "yaml.unsafe_load", "yaml.unsafe_load_all")]
    assert used and not unsafe, unsafe
    for path in CODE:  # no `from yaml import load` / unsafe loaders by name
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module == "yaml":
                names = {a.name for a in node.names}
                assert not names & {"load", "load_all", "full_load", "unsafe_load", "Loader", "UnsafeLoader",
                                    "FullLoader"}, f"{path}: from yaml import {names}"
            if isinstance(node, ast.Attribute) and _dotted(node) in ("yaml.Loader", "yaml.UnsafeLoader",
                                                                      "yaml.FullLoader"):
                pytest.fail(_where(path, node))


def _shell_commands(text: str, start: re.Pattern) -> list[str]:
    """Each command starting with ``start`` in ``text``, with backslash-continued lines joined."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = start.search(line)
        if not m:
            continue
        cmd = line[m.start():]
        j = i
        while cmd.rstrip().endswith("\\") and j + 1 < len(lines):
            j += 1
            cmd = cmd.rstrip()[:-1] + " " + lines[j].strip()
        out.append(cmd)
    return out


def test_servers_in_docs_and_examples_bind_loopback():
    mlflow = re.compile(r"mlflow (server|ui)\b")
    commands = []
    for path in TEXT:
        text = path.read_text(encoding="utf-8")
        for cmd in _shell_commands(text, mlflow):
            if "`" in cmd.split("mlflow", 1)[1][:8]:
                continue  # prose such as "`mlflow server`" without a command line
            commands.append(cmd)
            host = re.search(r"(?:--host|-h)[ =](\S+)", cmd)
            assert host and host.group(1) == "127.0.0.1", f"{path.name}: {cmd}"
        for m in re.finditer(r"dashboard[-_]host[\"']?\s*[:=]\s*[\"']?([0-9.]+|[\w.-]+)", text):
            if m.group(1) == "127.0.0.1":
                continue
            line = text[text.rfind("\n", 0, m.start()) + 1:text.find("\n", m.end())]
            assert path.name == "rayjob.yaml" and "inside the cluster network only" in line, f"{path.name}: {line}"
        assert "--host 0.0.0.0" not in text and "--host=0.0.0.0" not in text, path.name
    assert len(commands) >= 3  # README (ui), cluster.md and cluster.yaml (server)


def test_servers_in_tests_and_benches_bind_loopback():
    servers = 0
    for path in [*TESTS, *CODE]:
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.List):
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                if "server" in items and "--backend-store-uri" in items:  # an `mlflow server` argv
                    servers += 1
                    i = items.index("--host") if "--host" in items else -1
                    assert i >= 0 and items[i + 1] == "127.0.0.1", _where(path, node)
        for p, node in _calls([path], "ray.init"):
            kw = {k.arg: k.value for k in node.keywords}
            if None in kw or "address" in kw and not (isinstance(kw["address"], ast.Constant)
                                                     and kw["address"].value == "local"):
                continue  # **kwargs (the runner: include_dashboard=False locally) or an existing cluster
            value = kw.get("include_dashboard")
            assert isinstance(value, ast.Constant) and value.value is False, _where(p, node)
    assert servers >= 2


URI_NAMES = {"uri", "tracking_uri", "uri_arg", "address", "storage_path", "storage_arg"}
REDACTORS = {"redact_uri", "redact_text", "redact_argv"}


def test_uris_in_messages_and_logs_are_redacted():
    """No f-string or log call in the package shows a URI-holding variable unredacted."""
    bad = []
    log_methods = {"debug", "info", "warning", "error", "exception", "critical"}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(_parse(path)):
            shown: list[ast.AST] = []
            if isinstance(node, ast.JoinedStr):
                shown = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in log_methods and _dotted(node.func.value).split(".")[-1] in ("log", "logger"):
                shown = list(node.args[1:])
            for expr in shown:
                name = expr.id if isinstance(expr, ast.Name) else expr.attr if isinstance(expr, ast.Attribute) else ""
                if name in URI_NAMES:
                    bad.append(_where(path, node))
    assert not bad, "URIs shown without redact_uri:\n" + "\n".join(bad)


def test_redaction_of_command_lines_and_messages():
    from granq_search.tracking.uri import redact_argv, redact_text, redact_uri

    argv = ["tune_main.py", "--tracking-uri", "http://bob:hunter2@10.0.0.5:5000",
            "--storage-path=s3://AKIA:topsecret@bucket/runs?X-Amz-Signature=abc123&region=x",
            "--address", "ray://alice:pw1@head:10001", "--set", "data.root=/data"]
    shown = " ".join(redact_argv(argv))
    for secret in ("hunter2", "topsecret", "abc123", "pw1", "bob:", "AKIA"):
        assert secret not in shown, shown
    assert "http://10.0.0.5:5000" in shown and "region=x" in shown and "data.root=/data" in shown
    assert redact_uri("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    msg = ("API request to http://u:p4ss@127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
           "HTTPConnectionPool(host='127.0.0.1', port=5000)")
    assert "p4ss" not in redact_text(msg) and "http://127.0.0.1:5000/api/2.0" in redact_text(msg)


def test_recorder_logs_and_records_no_credentials(tmp_path, caplog):
    """The parent run's tags (command line included) and the recorder's own log lines, also for a
    store that fails with an error naming the URL with its credentials."""
    import logging

    from mlflow.tracking import MlflowClient

    from granq_search.tracking.callback import SearchRecorder

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rec = SearchRecorder(tracking_uri=uri, search_name="s", retry_interval_s=0.0,
                         command_line=["tune_main.py", "--tracking-uri", "https://al:ice-secret@mlflow.example",
                                       "--storage-path", "gs://bucket/x?token=tok-secret"])
    rec.setup()

    def broken(*a, **k):
        raise ConnectionError("API request to https://al:ice-secret@mlflow.example/api failed")

    rec.client.log_batch = broken
    with caplog.at_level(logging.WARNING, logger="granq_search.tracking.writer"):
        rec._submit(rec._result_ops("t1", {"epoch": 1, "val_top1": 50.0})[0])
        rec.on_trial_result(0, [], type("T", (), {"trial_id": "t1", "config": {}})(), {"epoch": 2, "val_top1": 1.0})
    assert rec.pending and "buffered" in caplog.text
    assert "ice-secret" not in caplog.text and "mlflow.example" in caplog.text
    parent = MlflowClient(uri).get_run(rec.parent_run_id)
    tags = " ".join(f"{k}={v}" for k, v in {**parent.data.tags, **parent.data.params}.items())
    assert "ice-secret" not in tags and "tok-secret" not in tags and "https://mlflow.example" in tags
