"""The docs speak of the project and its versions: nothing is dated by how the work was organised
(internal work sessions or sprints). Results are dated by version or commit instead."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK_ROUNDS = re.compile(r"\b(sessions?|sprints?|work rounds?)\b", re.IGNORECASE)


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_no_doc_dates_anything_by_work_rounds():
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}"
        for path in docs()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if WORK_ROUNDS.search(line)
    ]
    assert not found, "date these by version or commit instead:\n" + "\n".join(found)


def test_the_check_sees_what_it_guards_against():
    assert WORK_ROUNDS.search("measured in session 25") and WORK_ROUNDS.search("this Session's run")
    assert not WORK_ROUNDS.search("measured at commit f1f952a (vLLM 0.32)")
