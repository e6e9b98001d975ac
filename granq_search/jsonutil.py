"""Plain JSON data from what the package produces (metrics, records, reports).

Low in the layering: imports nothing from the package, so the search, the record and the CLI
can all use it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["json_safe", "write_json_atomic"]


def _is_pandas_missing(x: Any) -> bool:
    pd = sys.modules.get("pandas")  # only data that came through pandas can hold its NA / NaT
    return pd is not None and (x is pd.NA or x is pd.NaT)


def json_safe(x: Any) -> Any:
    """``x`` as plain JSON data: mappings (keys as strings), lists and tuples recursively;
    NaN / inf, None and pandas NA / NaT -> None; paths -> strings; numpy scalars and one-element
    arrays or tensors -> Python values (``.item()``); everything else as it is."""
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or _is_pandas_missing(x):
        return None
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "item") and callable(x.item):
        try:
            return json_safe(x.item())
        except (ValueError, RuntimeError):  # an array of several values: left to the JSON encoder
            return x
    return x


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """``doc`` as indented JSON (plus a newline) at ``path``, written to a temporary file next to it
    and renamed over it: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
