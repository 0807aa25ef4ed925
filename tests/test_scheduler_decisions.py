"""The scheduler's decisions on pressured workloads (keepkv_vllm/bench/schedulers.py), step for
step, against digests recorded when they were reviewed: a change meant to keep behaviour (a
refactor of the scheduler or its planner) keeps every one. A change meant to alter them
re-records, and its review says why: KEEPKV_RECORD_DECISIONS=1 pytest tests/test_scheduler_decisions.py -n0
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from keepkv_vllm.bench.schedulers import DECISION_WORKLOADS, decision_log

RECORDED = Path(__file__).with_name("scheduler_decisions.json")


def summary(log: list[dict]) -> dict:
    """The digest of every step, and what a person reads when it differs."""
    return {
        "digest": zlib.crc32(json.dumps(log, sort_keys=True).encode()),
        "steps": len(log),
        "orders": sum(len(step["orders"]) for step in log),
        "preempted": sum(len(step["preempted"]) for step in log),
        "window_paused": sum(not step["record"] for step in log),
        "counters": log[-1]["counters"],
    }


@pytest.mark.parametrize("name", sorted(DECISION_WORKLOADS))
def test_the_scheduler_decides_as_recorded(name):
    logger = logging.getLogger("vllm.keepkv")
    level, logger.level = logger.level, logging.WARNING  # a line per compression otherwise
    try:
        got = summary(decision_log(**DECISION_WORKLOADS[name]))
    finally:
        logger.setLevel(level)
    recorded = json.loads(RECORDED.read_text()) if RECORDED.exists() else {}
    if os.environ.get("KEEPKV_RECORD_DECISIONS") == "1":
        recorded[name] = got
        RECORDED.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert name in recorded, "not recorded yet: KEEPKV_RECORD_DECISIONS=1"
    assert got == recorded[name]


def test_the_workloads_exercise_what_they_are_for():
    recorded = json.loads(RECORDED.read_text())
    assert set(recorded) == set(DECISION_WORKLOADS)
    assert all(r["orders"] > 0 for r in recorded.values())
    assert recorded["few-rows"]["preempted"] > 0 and recorded["few-rows"]["counters"]["window_rows_short"] > 0
    assert recorded["measured-learning"]["counters"]["preemptions_avoided"] > 0
    # the window records only while the requests would not all fit uncompressed
    assert recorded["fits-then-late"]["window_paused"] > 0
    assert all(recorded[name]["window_paused"] == 0 for name in ("bench-256x1", "bench-64x8", "budget-0.1"))
