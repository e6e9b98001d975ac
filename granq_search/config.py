"""The typed experiment config: strict load and dump of nested frozen dataclasses (the sections
themselves, with their range checks, are in :mod:`granq_search.config_schema`; all re-exported here).

One :class:`ExperimentConfig` flows everywhere: the search proposes values by their dotted
path (``quant.act.bits``), each trial rebuilds and validates the full config, MLflow params
and the leaderboard use the same names, and export writes the same config for production.

Machine settings (device, threads, output directory, tracking URI, Ray address) are *not* part
of it: they are command-line flags and arguments of the Python API, so an exported config
carries no machine's settings.

Your own model and data are named by import path (``MODULE:CALLABLE``, see
:mod:`granq_search.user_code`): ``model.name: mymodels:small_cnn``, ``data.dataset:
mydata:build``; the syntax is checked here, the import happens when the model or data is built.

Strictness: an unknown key names the closest valid one; a value out of range names the field,
the value and what is allowed. ``from_dict(to_dict(cfg)) == cfg`` holds for every config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from granq_search.config_schema import (
    BUILTIN_DATASETS,
    CONFIG_VERSION,
    ActQuantConfig,
    DataConfig,
    ExperimentConfig,
    GeneratorConfig,
    GeneratorOptimConfig,
    LayerOverride,
    LossConfig,
    ModelConfig,
    OptimConfig,
    QuantConfig,
    StudentOptimConfig,
    TrainConfig,
    WeightQuantConfig,
)
from granq_search.errors import ConfigError

__all__ = [
    "ActQuantConfig",
    "WeightQuantConfig",
    "LayerOverride",
    "QuantConfig",
    "ModelConfig",
    "DataConfig",
    "GeneratorConfig",
    "LossConfig",
    "StudentOptimConfig",
    "GeneratorOptimConfig",
    "OptimConfig",
    "TrainConfig",
    "ExperimentConfig",
    "BUILTIN_DATASETS",
    "CONFIG_VERSION",
    "from_dict",
    "to_dict",
    "flatten",
    "get_path",
    "with_overrides",
    "parse_set_args",
    "load_config",
    "config_from_data",
    "dump_config",
    "preset_path",
    "list_presets",
    "read_yaml",
    "split_document",
    "machine_neutral",
    "MACHINE_SETTINGS",
]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{value!r} is not allowed; choose one of {allowed}", field=path)
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", field=path)
        item = args[0]
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_mapping(hint, value, path + ".")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", field=path)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"expected an integer, got {value!r}", field=path)
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"expected a number, got {value!r}", field=path) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", field=path)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", field=path)
        return value
    raise ConfigError(f"unsupported type {_type_name(hint)}", field=path)  # pragma: no cover


def _from_mapping(cls: type, data: Any, prefix: str) -> Any:
    where = prefix[:-1] or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of fields, got {data!r}", field=where)
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if e.field is not None and not e.field.startswith(prefix):
            raise ConfigError(e.bare, field=f"{prefix}{e.field}") from None
        raise


def from_dict(data: Mapping[str, Any] | None, cls: type = ExperimentConfig, *, prefix: str = "") -> Any:
    """Build a config section from plain data, strictly (see module docstring). ``prefix``: the
    section's dotted path for error messages (``"quant."`` for a :class:`QuantConfig`)."""
    return _from_mapping(cls, data, prefix)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-safe data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-path view: ``{"quant.act.bits": 4, ...}``; lists are kept as values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        else:
            out[key] = to_dict(v) if isinstance(v, tuple) else v
    return out


def _field_hint(cls: type, path: str) -> Any:
    hint: Any = cls
    walked = []
    for part in path.split("."):
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"'{'.'.join(walked)}' is a value, not a section", field=path)
        hints = typing.get_type_hints(hint)
        if part not in hints:
            names = list(hints)
            close = difflib.get_close_matches(part, names, n=1)
            sect = ".".join(walked)
            full = [f"{sect}.{c}" if sect else c for c in close]
            tip = f"; did you mean '{full[0]}'?" if full else ""
            raise ConfigError(f"'{path}' is not a config field{tip}")
        hint = hints[part]
        walked.append(part)
    return hint


def get_path(cfg: Any, path: str) -> Any:
    _field_hint(type(cfg), path)
    value = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def check_path(path: str, cls: type = ExperimentConfig) -> Any:
    """Raise ConfigError unless ``path`` names a field; return its type hint."""
    return _field_hint(cls, path)


def with_overrides(cfg: Any, overrides: Mapping[str, Any]) -> Any:
    """A new config with dotted-path values replaced, validated as a whole."""
    data = to_dict(cfg)
    for path, value in overrides.items():
        _field_hint(type(cfg), path)
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return from_dict(data, type(cfg))


def parse_set_args(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a.b": 3, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE (for example quant.act.bits=3), got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}; quote strings, use [a, b] for lists") from None
        out[key] = value
    return out


PRESET_DIR = Path(__file__).parent / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_presets(), n=1)
        tip = f"; did you mean '{close[0]}'?" if close else f"; presets: {', '.join(list_presets())}"
        raise ConfigError(f"no config file or preset named '{name}'{tip}")
    return path


def read_yaml(path: str | Path, what: str = "config") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file '{path}' does not exist; check the path")
    try:
        with p.open("r", encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} file '{path}' is not valid YAML{where}; fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} file '{path}' is not a text file; pass a YAML file") from None


def _split(data: Any, what: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """:func:`split_document` with ``what`` naming the document in messages."""
    if data is None:
        raise ConfigError(f"{what} is empty; start from a preset in granq_search/presets")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must hold a mapping of sections, not {type(data).__name__}")
    data = dict(data)
    version = data.pop("config_version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"{what} has config_version {version!r}; this granq_search reads {CONFIG_VERSION}")
    provenance = data.pop("provenance", None)
    return data, provenance


def split_document(data: Any, source: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a config document read from the file ``source`` into (experiment data, provenance
    or None).

    A document is an experiment mapping, optionally with ``config_version`` and a free-form
    ``provenance`` block (written by ``export``).
    """
    return _split(data, f"config file '{source}'")


def config_from_data(data: Any, source: str, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """The validated config of a document's plain data (see :func:`split_document`; provenance
    ignored) with dotted ``overrides`` applied. ``source`` names the document in messages as is
    (``"config file 'c.yaml'"``, ``"the config mapping"``)."""
    body, _ = _split(data, source)
    cfg = from_dict(body)
    return with_overrides(cfg, overrides) if overrides else cfg


def load_config(source: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load a YAML file or a preset name, apply dotted overrides, validate strictly."""
    src = str(source)
    path = Path(src) if (src.endswith((".yaml", ".yml")) or Path(src).exists()) else preset_path(src)
    return config_from_data(read_yaml(path), f"config file '{path}'", overrides)


MACHINE_SETTINGS: tuple[str, ...] = ("data.num_workers",)
"""Settings of the machine that runs a config, not of the experiment: a portable config (an export)
leaves them out, so the machine that trains it keeps its defaults or its own ``--set``."""


def machine_neutral(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every machine setting at its default (what a portable config loads back as)."""
    defaults = flatten(ExperimentConfig())
    return with_overrides(cfg, {p: defaults[p] for p in MACHINE_SETTINGS})


def dump_config(cfg: ExperimentConfig, path: str | Path | None = None,
                provenance: Mapping[str, Any] | None = None, *, portable: bool = False) -> str:
    """YAML text of a complete, versioned config; written atomically when ``path`` is given.

    ``portable`` leaves out the machine settings (``MACHINE_SETTINGS``), as ``export`` does."""
    doc: dict[str, Any] = {"config_version": CONFIG_VERSION, **to_dict(cfg)}
    if portable:
        for dotted in MACHINE_SETTINGS:
            *sections, key = dotted.split(".")
            node = doc
            for section in sections:
                node = node[section]
            node.pop(key, None)
    if provenance is not None:
        doc["provenance"] = dict(provenance)
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)
    return text
