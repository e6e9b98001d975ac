"""Your own model by import path (``model.name: MODULE:FACTORY``), its one-line errors, and the
registry built from the model modules without back-imports (issue #13)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from granq_search.config import ModelConfig, load_config
from granq_search.errors import ConfigError, ModelError
from granq_search.models import build_teacher, create_model, list_models, model_info, teacher_info
from granq_search.models import registry

PACKAGE = Path(registry.__file__).resolve().parent

FACTORY = """
import torch.nn.functional as F
from torch import nn

from granq_search.models import model_factory


class Net(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


@model_factory(num_classes=5, image_size=12, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
def net(num_classes: int = 5) -> nn.Module:
    return Net(num_classes)


def undeclared(num_classes: int = 5) -> nn.Module:
    return Net(num_classes)


@model_factory(num_classes=5, image_size=12, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
def no_classes() -> nn.Module:
    return Net(5)


@model_factory(num_classes=5, image_size=12, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
def not_a_module(num_classes: int = 5):
    return {"weights": 1}


NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write a module under a fresh name into a folder on sys.path; return its name."""
    made: list[str] = []

    def write(source: str, folder: Path | None = None) -> str:
        name = f"granq_user_{uuid.uuid4().hex[:8]}"
        where = folder or tmp_path
        (where / f"{name}.py").write_text(textwrap.dedent(source))
        if folder is None:
            monkeypatch.syspath_prepend(str(where))
        made.append(name)
        return name

    yield write
    for name in made:
        sys.modules.pop(name, None)


def test_model_modules_do_not_import_the_registry():
    """The loop of issue #13: registry.py imports the model modules, never the other way round."""
    for module in registry.MODEL_MODULES:
        tree = ast.parse(Path(module.__file__).read_text())
        package = module.__name__.rsplit(".", 1)[0]
        imported = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:  # relative: from . import x / from .registry import y
                    base = ".".join([package.rsplit(".", n.level - 1)[0]] + ([base] if base else []))
                imported |= {base} | {f"{base}.{a.name}" for a in n.names}
            elif isinstance(n, ast.Import):
                imported |= {a.name for a in n.names}
        own = {m for m in imported if m == "granq_search.models" or m.startswith("granq_search.models.")}
        assert "granq_search.models.registry" not in own and "granq_search.models" not in own, (module.__name__, own)
        assert {m for m in own if m.count(".") == 2} <= {"granq_search.models.spec", "granq_search.models.checkpoint"}, \
            (module.__name__, own)
    # every built-in entry comes from exactly one module's MODELS
    names = [e.info.name for m in registry.MODEL_MODULES for e in m.MODELS]
    assert sorted(names) == list_models() and len(names) == len(set(names))


@pytest.mark.parametrize("module", [m.__name__.rsplit(".", 1)[1] for m in registry.MODEL_MODULES])
def test_each_model_module_imports_first_in_a_fresh_interpreter(module):
    code = (f"import granq_search.models.{module}; from granq_search.models import list_models; "
            "print(len(list_models()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) == len(list_models())


def test_own_factory_by_import_path(user_module, tmp_path):
    mod = user_module(FACTORY)
    spec = f"{mod}:net"
    info = model_info(spec)
    assert (info.name, info.num_classes, info.image_size, info.in_channels) == (spec, 5, 12, 3)
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.25, 0.25, 0.25)
    assert model_info(spec, num_classes=7).num_classes == 7
    model = create_model(spec, num_classes=7)
    assert model(torch.zeros(2, 3, 12, 12)).shape == (2, 7)

    # model.checkpoint loads into it as for the built-in models (sha256 recorded); model.mean overrides
    ckpt = tmp_path / "net.pt"
    torch.save({"state_dict": create_model(spec).state_dict()}, ckpt)
    cfg = ModelConfig(name=spec, num_classes=5, checkpoint=str(ckpt), mean=(0.4, 0.4, 0.4))
    teacher = build_teacher(cfg)
    assert teacher.checkpoint_sha256 and teacher.info.mean == (0.4, 0.4, 0.4) == teacher_info(cfg).mean
    assert not any(p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ModelError, match="has no published weights.*model.checkpoint=PATH"):
        build_teacher(ModelConfig(name=spec, num_classes=5))


def test_config_file_names_own_factory(user_module, tmp_path):
    mod = user_module(FACTORY)
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {{name: '{mod}:net', num_classes: 5, pretrained: false}}\n")
    cfg = load_config(p)
    assert cfg.model.name == f"{mod}:net"
    assert build_teacher(cfg.model).model.head.out_features == 5


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("attr, words", [
    ("undeclared", ["does not declare its inputs", "@granq_search.models.model_factory("]),
    ("no_classes", ["must take the keyword argument num_classes"]),
    ("missing", ["has no attribute 'missing'", "callables there:", "net"]),
    ("NOT_CALLABLE", ["is a int, not a function or class"]),
])
def test_unusable_factories_are_one_line_config_errors(user_module, attr, words):
    mod = user_module(FACTORY)
    with pytest.raises(ConfigError) as e:
        model_info(f"{mod}:{attr}")
    text = _one_line(e.value)
    assert text.startswith("model.name: ") and f"{mod}:{attr}" in text, text
    for w in words:
        assert w in text, text


def test_factory_returning_no_module(user_module):
    mod = user_module(FACTORY)
    with pytest.raises(ModelError, match="returned a dict, not a torch.nn.Module"):
        create_model(f"{mod}:not_a_module")


def test_module_that_cannot_be_imported():
    with pytest.raises(ConfigError) as e:
        model_info("granq_no_such_module_xyz:build")
    text = _one_line(e.value)
    assert text.startswith("model.name: cannot import 'granq_no_such_module_xyz' for 'granq_no_such_module_xyz:build'")
    assert "PYTHONPATH" in text


def test_module_that_raises_or_lacks_a_dependency(user_module):
    broken = user_module("raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError, match=r"importing '.*' failed \(RuntimeError: boom at import\); fix that module"):
        model_info(f"{broken}:net")
    needs = user_module("import granq_missing_dependency_xyz\n")
    with pytest.raises(ConfigError, match="it imports 'granq_missing_dependency_xyz', which is not installed"):
        model_info(f"{needs}:net")


def test_module_in_the_working_directory_is_found(user_module, tmp_path, monkeypatch):
    """A console script (``granq-search``) has no working directory on sys.path; the module is
    looked up there too, as ``python -m`` would."""
    here = tmp_path / "project"
    here.mkdir()
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(here))])
    mod = user_module(FACTORY, folder=here)
    monkeypatch.chdir(here)
    assert model_info(f"{mod}:net").image_size == 12
    assert str(here) in sys.path


@pytest.mark.parametrize("name", ["mymodels:", ":build", "a b:c", "pkg:mod:fn", "1pkg:build"])
def test_malformed_import_path_is_refused_by_the_config(name):
    with pytest.raises(ConfigError, match=r"model\.name: .* is not an import path; write MODULE:CALLABLE"):
        load_config("digits", {"model.name": name})


def test_unknown_builtin_name_still_suggests():
    with pytest.raises(ModelError, match="did you mean 'resnet20'.*your own model: MODULE:FACTORY"):
        create_model("resnet2")
