"""Readable names: MLflow trial-run names and short labels for dotted config paths.

A trial's run is named ``t07 W3A4 tau=0.40 relu kernel``: the trial's ordinal in the search
(Ray's trial counter, 1-based, kept across ``--resume``; the Ray trial id stays the tag
``granq.trial_id``), its weight/activation bits, and up to :data:`MAX_EXTRAS` of the searched
values that tell configurations apart most (the activation threshold, the placement of the
activation quantizers, the granularities, then the rest in the space's order). The name is a
function of the trial alone, so a run recreated on ``--resume`` gets the same name.

The leaderboard's table shows the searched parameters under the same short labels
(:func:`short_labels`); its CSV and JSON use the dotted paths.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["LABELS", "MAX_EXTRAS", "short_labels", "short_value", "trial_label", "run_name", "searched_paths"]

LABELS: dict[str, str] = {
    "quant.weight.bits": "W",
    "quant.act.bits": "A",
    "quant.act.threshold": "tau",
    "quant.act.placement": "place",
    "quant.act.granularity": "a_gran",
    "quant.weight.granularity": "w_gran",
    "quant.act.range_mode": "range",
    "quant.act.residual_bits": "resid",
    "optim.student.lr": "lr_S",
    "optim.generator.lr": "lr_G",
    "loss.temperature": "T",
    "loss.student_loss": "s_loss",
    "train.batch_size": "batch",
    "train.student_bn": "s_bn",
    "train.warmup_epochs": "warmup",
}
"""Short labels of well-known paths; any other path is labelled by its last component."""

VALUE_SHORT: dict[str, str] = {
    "relu_output": "relu", "layer_input": "input", "per_tensor": "tensor", "per_channel": "channel",
    "per_sample_channel": "sample_channel", "per_kernel": "kernel",
}

NAME_PRIORITY = ("quant.act.threshold", "quant.act.placement", "quant.weight.granularity",
                 "quant.act.granularity", "quant.act.range_mode")
"""Searched paths that go into a run name first (they change what a configuration *is*)."""

BARE = {"quant.act.placement", "quant.weight.granularity", "quant.act.granularity", "quant.act.range_mode"}
"""Paths whose values read on their own in a name (``relu``, ``kernel``) without ``label=``."""

BITS = ("quant.weight.bits", "quant.act.bits")
MAX_EXTRAS = 3
MAX_NAME = 60

_ORDINAL = re.compile(r"^(\d+)(?:_|$)")


def short_labels(paths: Sequence[str]) -> dict[str, str]:
    """``{path: label}`` for ``paths``: :data:`LABELS`, else the last component; labels that would
    be equal are widened to their last two components (then to the whole path)."""
    labels = {p: LABELS.get(p, p.rsplit(".", 1)[-1]) for p in paths}
    for depth in (2, None):
        seen: dict[str, int] = {}
        for label in labels.values():
            seen[label] = seen.get(label, 0) + 1
        clashes = {p for p, label in labels.items() if seen[label] > 1}
        if not clashes:
            break
        for p in clashes:
            labels[p] = ".".join(p.split(".")[-depth:]) if depth else p
    return labels


def short_value(value: Any) -> str:
    """A compact rendering: ``0.40``, ``3e-4``, ``20``, ``relu``, ``kernel``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        a = abs(value)
        if a == 0.0:
            return "0"
        if a < 0.01 or a >= 1e4:
            mantissa, exponent = f"{value:.1e}".split("e")
            mantissa = mantissa.rstrip("0").rstrip(".")
            return f"{mantissa}e{int(exponent)}"
        if a < 10:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, str):
        return VALUE_SHORT.get(value, value)
    if isinstance(value, (list, tuple)):
        return ",".join(short_value(v) for v in value)
    return str(value)


def trial_label(trial: Any) -> str:
    """``t07`` for the 7th trial Ray created in this search (its ``experiment_tag`` starts with the
    1-based counter, restored with the experiment on ``--resume``); else the Ray trial id."""
    tag = str(getattr(trial, "experiment_tag", "") or "")
    m = _ORDINAL.match(tag)
    if m:
        return f"t{int(m.group(1)):02d}"
    return str(getattr(trial, "trial_id", "") or "trial")


def searched_paths(proposal: Mapping[str, Any] | None) -> list[str]:
    """The dotted config paths a proposal sets (a Ray trial's config is the searcher's proposal)."""
    return [str(k) for k in (proposal or {}) if "." in str(k)]


def _value(cfg: Any, proposal: Mapping[str, Any], path: str) -> Any:
    if cfg is not None:
        from granq_search.config import get_path
        from granq_search.errors import ConfigError

        try:
            return get_path(cfg, path)
        except (ConfigError, AttributeError):
            pass
    return proposal.get(path)


def run_name(trial: Any, cfg: Any = None, searched: Iterable[str] | None = None) -> str:
    """The MLflow run name of a trial (module docstring). ``cfg``: its full config (bits and values
    come from it; else from the proposal); ``searched``: the searched paths (default: the
    proposal's)."""
    proposal = dict(getattr(trial, "config", None) or {})
    paths = list(searched) if searched is not None else searched_paths(proposal)
    parts = [trial_label(trial)]
    w, a = (_value(cfg, proposal, p) for p in BITS)
    if w is not None or a is not None:
        parts.append(f"W{short_value(w) if w is not None else '?'}A{short_value(a) if a is not None else '?'}")
    granularity = _value(cfg, proposal, "quant.act.granularity")
    order = [p for p in NAME_PRIORITY if p in paths] + [p for p in paths if p not in NAME_PRIORITY]
    labels = short_labels(paths)
    extras = 0
    for path in order:
        if path in BITS or extras >= MAX_EXTRAS:
            continue
        if path == "quant.act.threshold" and granularity is not None and granularity != "threshold":
            continue  # tau means nothing unless the granularity is chosen by it
        value = _value(cfg, proposal, path)
        if value is None:
            continue
        text = short_value(value) if path in BARE else f"{labels[path]}={short_value(value)}"
        if len(" ".join([*parts, text])) > MAX_NAME:
            break
        parts.append(text)
        extras += 1
    return " ".join(parts)
