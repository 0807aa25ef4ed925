"""The files a benchmark or study leaves: ``OUT/NAME.json``, ``.md`` and ``.png`` (plain Python)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_report(out: Path, name: str, data: object, markdown: str, plot: Callable[[Path], None]) -> None:
    """``data`` as JSON, ``markdown`` as the table a person reads, ``plot`` drawn to the PNG; the
    markdown is printed, then where the three files went."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(markdown + "\n")
    plot(out / f"{name}.png")
    print(markdown)
    print(f"wrote {out}/{name}.{{json,md,png}}")
