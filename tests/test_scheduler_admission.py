"""Growth-aware admission (engine/scheduler.py), on stand-in requests: no engine needed."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from keepkv_vllm.config import parse_config
from keepkv_vllm.engine.scheduler import CompressionCounters, KeepKVScheduler
from keepkv_vllm.engine.window import RowTable


def scheduler(blocks: int, rows: int, budget: float = 0.3) -> KeepKVScheduler:
    s = object.__new__(KeepKVScheduler)  # only the admission state, no engine
    s.settings = parse_config({"method": "keepkv", "budget": budget})
    s._block_size, s._total_blocks = 128, blocks
    s.window_rows = RowTable(rows)
    s._request_options, s._output_lengths = {}, deque(maxlen=256)
    s.counters = CompressionCounters()
    s.running = []
    return s


def request(rid: str, prompt: int, max_tokens: int, generated: int = 0, extra: dict | None = None):
    return SimpleNamespace(
        request_id=rid,
        num_prompt_tokens=prompt,
        max_tokens=max_tokens,
        num_output_tokens=generated,
        sampling_params=SimpleNamespace(extra_args=extra),
    )


def admit_all(s: KeepKVScheduler, new) -> int:
    admitted = 0
    for r in new:
        if not s._admits(r):
            break
        s.running.append(r)
        s.window_rows.assign(r.request_id)
        admitted += 1
    return admitted


def test_admits_as_many_as_fit_at_their_compressed_peak():
    # 640 + 384 tokens each at 30 %: peak 308 + 128 = 436 slots = 4 blocks; 23 blocks hold 5
    s = scheduler(blocks=23, rows=16)
    assert admit_all(s, [request(f"r{i}", 640, 384) for i in range(16)]) == 5
    # at 10 %: 103 + 128 -> 2 blocks each: 11 fit
    s = scheduler(blocks=23, rows=16, budget=0.1)
    assert admit_all(s, [request(f"r{i}", 640, 384) for i in range(16)]) == 11


def test_requests_that_cannot_be_compressed_count_at_full_length():
    s = scheduler(blocks=23, rows=0)  # no window rows left: nobody is compressible
    assert admit_all(s, [request(f"r{i}", 640, 384) for i in range(16)]) == 2  # 8 blocks each
    s = scheduler(blocks=23, rows=16)
    opted_out = [request(f"r{i}", 640, 384, extra={"kv_compression": "off"}) for i in range(16)]
    assert admit_all(s, opted_out) == 2


def test_the_first_request_is_always_admitted():
    s = scheduler(blocks=4, rows=1)
    assert s._admits(request("huge", 4000, 4000))


def test_finished_output_lengths_set_how_far_running_requests_will_grow():
    s = scheduler(blocks=23, rows=0)
    many = [request(f"r{i}", 300, 4000) for i in range(16)]
    assert admit_all(s, many) == 1  # each may grow to 4,300 tokens (34 blocks): only the first
    s.running.clear()
    s._output_lengths.extend([100] * 20)  # but finished ones stopped after ~100 tokens
    assert admit_all(s, many) == 5  # 400 tokens = 4 blocks each: 5 in 23
