"""Replace one ``## Heading`` section of a Markdown file, keeping the others."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def write_section(filename: str, heading: str, body: str, title: str = "# Benchmarks") -> Path:
    path = DOCS / filename
    text = path.read_text(encoding="utf-8") if path.exists() else f"{title}\n"
    block = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + block
    path.write_text(text, encoding="utf-8")
    return path
