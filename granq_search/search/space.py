"""Search-space files: strict YAML that names config fields by their dotted path.

A search space is one YAML mapping::

    base: digits                      # preset name, or a config file relative to this file
    base_overrides: {quant.act.granularity: threshold}
    fidelity: {train.epochs: 6, train.iters_per_epoch: 10}   # search-time budget only
    objectives: [{metric: val_drop, mode: min}, {metric: bitops, mode: min}]
    constraints: {bitops: 2.0e7}      # optional budgets, checked BEFORE a trial trains
    parameters:
      quant.act.threshold: {type: float, low: 0.0, high: 1.0}
      quant.act.bits: {type: categorical, choices: [3, 4, 5]}
      optim.student.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    initial_points: [{quant.act.threshold: 0.5, quant.act.bits: 4}]   # the paper's values first
    scheduler: {type: asha, reduction_factor: 2, grace_period: 1}
    sampler: {type: tpe, seed: 0, n_startup_trials: 4}

Three configs come out of it:

* the **production base**: ``base`` + ``base_overrides`` + the ``--set`` overrides that do not touch
  a fidelity key. ``export`` writes this config with the best trial's parameters.
* the **search base**: the production base + ``fidelity`` (+ ``--set`` overrides of fidelity keys,
  which only change the search budget). Every trial runs the search base + its parameters.
* a trial's config: ``trial_config(params)``, validated as a whole.

A ``--set`` override of a *searched* parameter **pins** it for this search: the value must lie
inside the parameter's range (or be one of its choices), the parameter is no longer searched
(``parameters`` drops it, ``pinned`` records it) and the value goes into both bases like any
other non-fidelity ``--set`` override. ``initial_points`` lose the pinned keys (points that
become empty or duplicates are dropped). Pinning every parameter is an error.

Everything is checked when the file is loaded, before Ray starts: unknown keys, parameter
paths that are not config fields, bounds the config would reject (each bound and each
categorical choice is applied to the search base with ``with_overrides``), objectives on test
metrics (selection is only ever made on validation), and the ASHA budget. Each problem is one
:class:`~granq_search.errors.SearchSpaceError` line that names the file and the key
(:mod:`~granq_search.search.space_parse`; the types: :mod:`~granq_search.search.space_model`).

A search records its space when it starts, in ``search.json`` (``space``) and on its MLflow parent
run (tag ``granq.space``, :func:`space_record_text`): :meth:`SearchSpace.to_record`, from which
:func:`space_from_record` rebuilds the same space (the bases as recorded, not read again). A
resumed search continues with it, and ``export`` writes ``production_config`` of the chosen
trial's values from it.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from granq_search.config import from_dict, read_yaml
from granq_search.errors import ConfigError, SearchSpaceError
from granq_search.metrics import CONSTRAINT_METRICS, OBJECTIVE_METRICS
from granq_search.search.space_model import (
    Objective,
    ParamSpec,
    SamplerSpec,
    SchedulerSpec,
    SearchSpace,
    TrialConfig,
)
from granq_search.search.space_parse import parse_space

__all__ = [
    "SearchSpace",
    "TrialConfig",
    "ParamSpec",
    "Objective",
    "SchedulerSpec",
    "SamplerSpec",
    "load_space",
    "parse_space",
    "space_from_record",
    "space_record_text",
    "space_from_text",
    "OBJECTIVE_METRICS",
    "CONSTRAINT_METRICS",
]

RECORD_TEXT_LIMIT = 8000
"""The longest text :func:`space_record_text` returns: MLflow's longest tag value."""
_PACKED = "zlib+base64:"


def load_space(path: str | Path, set_overrides: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    p = Path(path)
    try:
        data = read_yaml(p, what="search space")
    except ConfigError as e:
        raise SearchSpaceError(str(e)) from None
    return parse_space(data, str(p), space_file=p.resolve(), set_overrides=set_overrides)


def space_from_record(record: Mapping[str, Any], *, origin: str = "search.json") -> SearchSpace:
    """Rebuild a space from :meth:`SearchSpace.to_record` (a resumed search, ``export``);
    ``origin`` names where the record was read in errors."""
    try:
        base = from_dict(record["base_config"])
        raw, source = record["raw"], record["source"]
    except ConfigError as e:
        raise SearchSpaceError(f"{origin}: base_config: {e}") from None
    except (KeyError, TypeError) as e:
        raise SearchSpaceError(f"{origin}: not a search-space record (no {e})") from None
    space = parse_space(raw, source, base_cfg=base, set_overrides=record.get("set_overrides") or {})
    recorded = record.get("pinned")  # absent in records written before pinning existed
    if recorded is not None and dict(recorded) != space.pinned:
        raise SearchSpaceError(f"{origin}: pinned {dict(recorded)} does not match the pins its --set overrides "
                               f"give ({space.pinned}); the record was edited")
    return space


def space_record_text(space: SearchSpace, limit: int = RECORD_TEXT_LIMIT) -> str:
    """:meth:`SearchSpace.to_record` as one line of text (the search's MLflow parent-run tag
    ``granq.space``): compact JSON, or where that is longer than ``limit`` characters, the JSON
    compressed (zlib, base64) after the prefix ``zlib+base64:``. :func:`space_from_text` reads both."""
    from granq_search.jsonutil import json_safe

    text = json.dumps(json_safe(space.to_record()), separators=(",", ":"))
    if len(text) <= limit:
        return text
    packed = _PACKED + base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")
    if len(packed) > limit:
        raise SearchSpaceError(f"search space '{space.source}' is too large to record on its MLflow run "
                               f"({len(packed)} characters compressed, at most {limit}); search fewer "
                               "parameters or give fewer initial points")
    return packed


def space_from_text(text: str, *, origin: str) -> SearchSpace:
    """The space :func:`space_record_text` recorded; ``origin`` names the text in errors."""
    try:
        if text.startswith(_PACKED):
            text = zlib.decompress(base64.b64decode(text[len(_PACKED):], validate=True)).decode("utf-8")
        record = json.loads(text)
    except (ValueError, zlib.error) as e:  # binascii and Unicode errors are ValueErrors
        raise SearchSpaceError(f"{origin}: not a search-space record ({type(e).__name__}: {e})") from None
    if not isinstance(record, Mapping):
        raise SearchSpaceError(f"{origin}: not a search-space record (a JSON object)")
    return space_from_record(record, origin=origin)
