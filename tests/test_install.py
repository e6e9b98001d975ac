"""Install anywhere: the wheel, a non-editable ``pip install .`` and an editable install, each used
from another working directory, ship and find every search space and preset.

The slow tests build from a copy of the sources (the repository is never written) into fresh
virtual environments whose dependencies are this environment's: a ``.pth`` file lists its
site-packages as a plain path, which does not run the ``.pth`` files there (so this checkout's
editable install stays out of sight). pip runs with ``--no-index --no-build-isolation``: nothing
is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

from granq_search.config import list_presets
from granq_search.search.runner import default_space_dir, resolve_space_arg

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "granq_search", "search_spaces")
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
PRESETS = sorted(p.stem for p in (REPO / "granq_search" / "presets").glob("*.yaml"))
PIP_OFFLINE = ["--no-deps", "--no-index", "--no-build-isolation", "--disable-pip-version-check", "-q"]


# --------------------------------------------------------------------------- fast


def test_packaging_lists_every_subpackage():
    """pyproject.toml lists the packages explicitly (search_spaces/ is mapped into the package):
    a new sub-package missing from the list would be absent from every install but editable."""
    tomllib = pytest.importorskip("tomllib")
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    pkg = REPO / "granq_search"
    on_disk = {".".join(("granq_search", *d.relative_to(pkg).parts)) for d in (pkg, *pkg.rglob("*"))
               if d.is_dir() and "__pycache__" not in d.parts and any(f.is_file() for f in d.iterdir())}
    assert set(tool["packages"]) == on_disk | {"granq_search.search_spaces"}
    assert tool["package-dir"] == {"granq_search.search_spaces": "search_spaces"}
    assert tool["package-data"]["granq_search.search_spaces"] == ["*.yaml"]


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    """A space name never depends on the working directory, even one holding a folder of that name."""
    (tmp_path / "digits").mkdir()
    monkeypatch.chdir(tmp_path)
    assert default_space_dir() == REPO / "search_spaces"  # this checkout is installed editable
    for name in SPACES:
        assert resolve_space_arg(name) == REPO / "search_spaces" / f"{name}.yaml"
    assert resolve_space_arg(None) == REPO / "search_spaces" / "digits.yaml"
    assert list_presets() == PRESETS


# --------------------------------------------------------------------------- slow: real installs


def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _run(cmd: list, cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}: rc {r.returncode}\n{r.stdout[-3000:]}\n" \
                                  f"{r.stderr[-3000:]}"
    return r


def _fresh_venv(where: Path) -> Path:
    """A virtual environment without pip whose imports fall back to this environment's packages."""
    _run([sys.executable, "-m", "venv", "--without-pip", where], cwd=where.parent)
    python = where / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=where.parent).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    Path(purelib, "_granq_test_parent.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def _pip_install(python: Path, *what: str | Path, cwd: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", python, "install", *PIP_OFFLINE, *what], cwd=cwd)


# Run by the installed interpreter from a directory without the sources: where everything is found.
_PROBE = """
import json, sys
import granq_search
from granq_search.config import list_presets, load_config
from granq_search.search.runner import default_space_dir, resolve_space_arg
from granq_search.search.space import load_space
spaces = {n: str(resolve_space_arg(n)) for n in sys.argv[1].split(",")}
for n, path in spaces.items():
    s = load_space(path)
    assert s.objectives and s.parameters, n
presets = list_presets()
for n in presets:
    load_config(n)
cifar_cpu = load_space(resolve_space_arg("cifar10_resnet20_cpu")).base
print(json.dumps({"package": granq_search.__file__, "space_dir": str(default_space_dir()),
                  "default": str(resolve_space_arg(None)), "spaces": spaces, "presets": presets,
                  "cifar_cpu_checkpoint": cifar_cpu.model.checkpoint}))
"""


def _probe(python: Path, cwd: Path) -> dict:
    return json.loads(_run([python, "-c", _PROBE, ",".join(SPACES)], cwd=cwd).stdout)


@pytest.mark.slow
def test_wheel_and_pip_install_work_from_anywhere(tmp_path):
    """The wheel ships every space and preset; ``pip install .`` (not editable) into a fresh
    environment runs ``--version``, ``searches`` and the default search (2 tiny trials) from a
    directory that holds no sources."""
    src = _copy_sources(tmp_path / "src")
    _run([sys.executable, "-m", "pip", "wheel", *PIP_OFFLINE, "-w", tmp_path / "dist", src], cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("granq_search-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"granq_search/search_spaces/{n}.yaml" for n in SPACES} <= names
    assert {f"granq_search/presets/{n}.yaml" for n in PRESETS} <= names
    assert not any(n.startswith(("search_spaces/", "tests/")) for n in names)

    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, src, cwd=tmp_path)
    site = (tmp_path / "venv" / "lib").resolve()
    work = tmp_path / "elsewhere"
    work.mkdir()

    found = _probe(python, work)
    assert Path(found["package"]).resolve().is_relative_to(site), found["package"]
    space_dir = Path(found["space_dir"])
    assert space_dir.is_relative_to(site) and space_dir.name == "search_spaces"
    assert found["default"] == str(space_dir / "digits.yaml")
    assert found["spaces"] == {n: str(space_dir / f"{n}.yaml") for n in SPACES}
    assert found["presets"] == PRESETS
    # relative data paths in a space stay relative to the working directory of the command
    assert found["cifar_cpu_checkpoint"] == "../shared/models/resnet20_cifar10_optionA.th"

    cli = tmp_path / "venv" / "bin" / "granq-search"
    assert _run([cli, "--version"], cwd=work).stdout == f"granq-search {version('granq_search')}\n"
    out = work / "runs"
    # the default command: a search of the shipped digits space, at a tiny budget
    r = _run([cli, "--num-samples", "2", "--name", "tiny", "--output-dir", out, "--no-progress",
              "--set", "train.epochs=2", "--set", "train.iters_per_epoch=2"], cwd=work, timeout=600)
    assert "search tiny finished: 2 trial(s)" in r.stdout, r.stdout

    doc = json.loads(_run([cli, "searches", "--output-dir", out, "--format", "json"], cwd=work).stdout)
    tiny, = doc["searches"]
    assert (tiny["name"], tiny["status"], tiny["trials"], tiny["num_samples"], tiny["counts_from"]) == \
        ("tiny", "finished", 2, 2, "outcome")
    c = tiny["counts"]
    assert c["running"] == 0 and c["complete"] + c["pruned"] + c["fail"] - c["duplicates"] == 2
    # trials that cannot import the installed package (Ray workers) would fail: none may
    assert c["fail"] == 0 and c["complete"] >= 1, c
    assert tiny["space_file"] == str(space_dir / "digits.yaml") and doc["latest"] == "tiny"
    assert Path(tiny["best_config"]).is_file()


@pytest.mark.slow
def test_editable_install_finds_the_top_level_spaces(tmp_path):
    """``pip install -e .`` (what CI does): the spaces are the repository's top-level folder."""
    src = _copy_sources(tmp_path / "src")
    python = _fresh_venv(tmp_path / "venv")
    _pip_install(python, "-e", src, cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    found = _probe(python, work)
    assert Path(found["package"]) == src / "granq_search" / "__init__.py"
    assert found["space_dir"] == str(src / "search_spaces")
    assert found["spaces"] == {n: str(src / "search_spaces" / f"{n}.yaml") for n in SPACES}
    assert found["presets"] == PRESETS
    cli = tmp_path / "venv" / "bin" / "granq-search"
    assert _run([cli, "--version"], cwd=work).stdout == f"granq-search {version('granq_search')}\n"
