"""The scheduler's decisions (policy/planner.py) on plain numbers: no engine, no vLLM.

Admission at the compressed peak, budget arithmetic, which running requests have blocks to
return and when that answer may change, and whether a compression pays for an allocation.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest

from keepkv_vllm.config import parse_config
from keepkv_vllm.policy.costs import StepCosts
from keepkv_vllm.policy.planner import Planner, target_slots, tokens_within_target


@dataclass
class Req:
    """A request's numbers, as the planner reads them from vLLM's ``Request``."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    num_output_tokens: int = 0
    num_computed_tokens: int = 0


def planner(blocks: int = 23, budget: float | int = 0.3, costs: StepCosts | None = None, **config) -> Planner:
    settings = parse_config({"method": "keepkv", "budget": budget, **config})
    return Planner(settings, block_size=128, total_blocks=blocks, costs=costs)


def request(p: Planner, rid: str, prompt: int, max_tokens: int, generated: int = 0, extra=None) -> Req:
    p.track(rid, extra)
    return Req(rid, prompt, max_tokens, generated, prompt + generated)


def admit_all(p: Planner, new: list[Req], rows: int) -> int:
    """Admit requests in order while the planner says yes, each taking a window row if one is free."""
    running, with_row = [], set()
    for r in new:
        if not p.admits(running, r, with_row, rows - len(with_row)):
            break
        running.append(r)
        if len(with_row) < rows:
            with_row.add(r.request_id)
    return len(running)


# -- budget arithmetic -----------------------------------------------------------------------------
def test_targets_round_a_fraction_up_take_an_int_as_is_and_never_go_below_the_minimum():
    assert target_slots(1000, 0.3, 64) == 300 and target_slots(1001, 0.3, 64) == 301
    assert target_slots(1000, 512, 64) == 512 and target_slots(100, 0.1, 64) == 64


@pytest.mark.parametrize("budget", [0.1, 0.3, 1 / 3, 0.7, 1.0, 200])
def test_tokens_within_target_bounds_the_last_token_count_below_a_limit(budget):
    """The ranking skips re-evaluating a request until this count: it may be early, never late."""
    low = 64
    for limit in range(low - 2, 1200, 7):
        last = tokens_within_target(limit, budget, low)
        if last == math.inf:
            assert all(target_slots(n, budget, low) <= limit for n in range(0, 20000, 97))
            continue
        exact = max((n for n in range(0, 13000) if target_slots(n, budget, low) <= limit), default=-1)
        assert exact - 2 <= last <= exact, (limit, last, exact)


# -- admission ----------------------------------------------------------------------------------------
def test_admits_as_many_as_fit_at_their_compressed_peak():
    # 640 + 384 tokens each at 30 %: peak 308 + 128 = 436 slots = 4 blocks; 23 blocks hold 5
    p = planner(blocks=23)
    assert admit_all(p, [request(p, f"r{i}", 640, 384) for i in range(16)], rows=16) == 5
    # at 10 %: 103 + 128 -> 2 blocks each: 11 fit
    p = planner(blocks=23, budget=0.1)
    assert admit_all(p, [request(p, f"r{i}", 640, 384) for i in range(16)], rows=16) == 11


def test_requests_that_cannot_be_compressed_count_at_full_length():
    p = planner(blocks=23)
    assert admit_all(p, [request(p, f"r{i}", 640, 384) for i in range(16)], rows=0) == 2  # 8 blocks each
    opted_out = [request(p, f"o{i}", 640, 384, extra={"kv_compression": "off"}) for i in range(16)]
    assert admit_all(p, opted_out, rows=16) == 2


def test_the_first_request_is_always_admitted():
    p = planner(blocks=4)
    assert p.admits([], request(p, "huge", 4000, 4000), set(), 1)


def test_finished_output_lengths_set_how_far_running_requests_will_grow():
    p = planner(blocks=23)
    many = [request(p, f"r{i}", 300, 4000) for i in range(16)]
    assert admit_all(p, many, rows=0) == 1  # each may grow to 4,300 tokens (34 blocks): only the first
    for i in range(20):  # but finished ones stopped after ~100 tokens
        p.track(f"done{i}", None)
        p.forget(f"done{i}", finished_outputs=100)
    assert p.output_horizon() == 100
    assert admit_all(p, many, rows=0) == 5  # 400 tokens = 4 blocks each: 5 in 23


def test_a_request_is_worth_a_window_row_only_if_compressing_could_ever_return_a_block():
    p = planner(budget=0.5)
    assert p.could_compress(request(p, "long", 1000, 200))  # 1,200 -> 600 slots: 4 blocks back
    assert not p.could_compress(request(p, "short", 100, 50))  # 150 -> 75 slots, 64 minimum: none
    assert not p.could_compress(request(p, "off", 1000, 200, extra={"kv_compression": "off"}))


# -- reclaiming ---------------------------------------------------------------------------------------
def decoding(p: Planner, rid: str, computed: int, window_from: int = 0, extra=None) -> Req:
    r = request(p, rid, computed, 4000, extra=extra)
    if window_from is not None:
        p.window_assigned(rid, window_from)
    return r


def test_what_a_compression_would_return_and_why_not():
    p = planner(budget=0.3)  # window 16 (the default), min 64 slots = 1 block kept at least
    held = lambda r: math.ceil(p.slots(r) / 128)
    r = decoding(p, "r", 1000)
    assert p.reclaimable(r, held(r)) == 8 - 3  # 300 slots keep 3 of its 8 blocks
    prefill = decoding(p, "prefill", 1000)
    prefill.num_computed_tokens = 500  # its prompt is 1,000: still in prefill
    assert p.reclaimable(prefill, 4) == 0
    assert p.reclaimable(decoding(p, "no row", 1000, window_from=None), 8) == 0
    assert p.reclaimable(decoding(p, "new row", 1000, window_from=990), 8) == 0  # 10 of 16 queries
    assert p.reclaimable(decoding(p, "off", 1000, extra={"kv_compression": "off"}), 8) == 0
    assert p.reclaimable(decoding(p, "own budget", 1000, extra={"kv_budget": 900}), 8) == 8 - 8
    assert p.reclaimable(decoding(p, "tiny", 120), 1) == 0  # one block: the minimum


def test_the_window_records_only_while_the_requests_would_not_all_fit_uncompressed():
    """All-fit work pays no per-layer query copy; waiting requests and growth count."""
    p = planner(blocks=150)
    fit = [request(p, f"r{i}", 640, 384) for i in range(16)]  # 16 x 8 blocks = 128 <= 150
    assert not p.window_needed(fit, [])
    assert not p.window_needed(fit[:10], fit[10:])  # waiting ones count too
    more = [request(p, f"w{i}", 640, 384) for i in range(3)]  # 19 x 8 = 152 > 150
    assert p.window_needed(fit, more) and p.window_needed([*fit, *more], [])
    # finished requests stopped at 15 tokens: one at 15 is expected to stop at 895 tokens (7
    # blocks), but counts W = 16 more (8 blocks) unless it cannot reach them
    p = planner(blocks=7)
    for i in range(16):
        p.track(f"done{i}", None)
        p.forget(f"done{i}", finished_outputs=15)
    assert p.window_needed([request(p, "r", 880, 200, generated=15)], [])
    assert not p.window_needed([request(p, "r", 880, 16, generated=15)], [])  # it stops at 896
    assert planner(blocks=150, trigger="always").window_needed([], [])


def test_a_paused_window_makes_no_request_eligible_until_w_tokens_after_it_resumes():
    p = planner(budget=0.3)
    held = lambda r: math.ceil(p.slots(r) / 128)
    r = decoding(p, "r", 1000)
    assert p.reclaimable(r, held(r)) == 5
    p.set_recording(False, [r])
    assert p.reclaimable(r, held(r)) == 0
    late = decoding(p, "late", 1000)  # a row assigned while paused holds nothing yet
    assert p.reclaimable(late, held(late)) == 0
    r.num_computed_tokens = late.num_computed_tokens = 1010
    p.set_recording(True, [r, late])  # both rows fill from token 1010: W = 16 queries at 1026
    for computed, reclaim in ((1025, 0), (1026, 9 - 3)):  # 1,026 tokens keep 308 slots: 3 blocks
        r.num_computed_tokens = late.num_computed_tokens = computed
        assert p.reclaimable(r, 9) == reclaim and p.reclaimable(late, 9) == reclaim, computed


def test_a_compressed_request_returns_blocks_again_only_once_it_outgrew_its_target():
    p = planner(budget=0.3)
    r = decoding(p, "r", 1000)
    assert p.compressed("r", 1000 - 300)  # first compression: 300 slots in 3 blocks
    assert not p.compressed("r", 1000 - 300)
    p.begin_step()
    assert p.reclaimable(r, 3) == 0  # at its target
    r.num_computed_tokens = 1200  # 500 slots in 4 blocks; target 360 keeps 3
    assert p.slots(r) == 500 and p.reclaimable(r, 4) == 1


def test_a_request_ordered_this_step_is_not_ranked_again_until_the_next():
    p = planner(budget=0.3)
    r = decoding(p, "r", 1000)
    p.compressed("r", 1)
    assert p.reclaimable(r, 8) == 0
    p.begin_step()
    assert p.reclaimable(r, 8) > 0


def test_the_remembered_answer_equals_a_fresh_one_as_requests_grow():
    """``reclaimable`` remembers its answer with the token count it may change at; stepping
    requests one token at a time, its answers equal a planner that remembers nothing."""
    rng = random.Random(3)
    p, fresh = planner(budget=0.2), planner(budget=0.2)
    reqs = []
    for i in range(12):
        computed = rng.randint(200, 2000)
        extra = rng.choice([None, {"kv_budget": 0.5}, {"kv_budget": 300}])
        reqs.append(decoding(p, f"r{i}", computed, window_from=computed - rng.randint(0, 40), extra=extra))
        fresh.track(f"r{i}", extra)
        fresh.window_assigned(
            f"r{i}", reqs[-1].num_computed_tokens - (computed - p.tracked[f"r{i}"].window_from)
        )
    for step in range(400):
        p.begin_step(), fresh.begin_step()
        for r in reqs:
            held = math.ceil((p.slots(r) + 1) / 128)
            tokens = rng.choice([1, 1, 1, 2])
            p.allocated(r.request_id, tokens), fresh.allocated(r.request_id, tokens)
            fresh.tracked[r.request_id].memo = None
            assert p.reclaimable(r, held) == fresh.reclaimable(r, held), (step, r)
            r.num_computed_tokens += 1


def test_ranking_puts_the_most_blocks_first_and_keeps_the_running_order_on_ties():
    p = planner(budget=0.3)
    a, b, c = decoding(p, "a", 1000), decoding(p, "b", 2000), decoding(p, "c", 1000)
    off = decoding(p, "off", 3000, extra={"kv_compression": "off"})
    assert p.ranked([(a, 8), (b, 16), (off, 24), (c, 8)]) == [b, a, c]


# -- weighing (policy="measured") ---------------------------------------------------------------------
def trained(compaction_s_per_kslot: float, prefill_s: float, base: float = 0.0005, decode: float = 0.006):
    """Step costs learned from synthetic steps (tests/test_policy_costs.py has the model's own tests)."""
    from test_policy_costs import machine, serve

    costs = StepCosts()
    step = machine(base=base, prefill=prefill_s, decode=decode, context=0.002, voted=0.004,
                   compaction=compaction_s_per_kslot)  # fmt: skip
    serve(costs, step, compact_every=3)
    return costs


def test_compress_or_let_vllm_preempt_whichever_costs_less():
    p = planner(budget=0.1, costs=trained(0.08, 0.0004))  # 80 ms per 1k slots, 0.4 ms per token
    victim = request(p, "long", 2001, 1000, generated=999)  # 3,000 slots, one step left
    short, long_ = decoding(p, "short", 100), decoding(p, "long victim", 3000)
    weighed = [p.compression(victim, p.target(victim), p.output_horizon())]  # 240 ms to compact
    verdict = p.weigh(weighed, short, [victim, short], preemption_victim=short)  # 40 ms to recompute
    assert not verdict.compress and verdict.reason == "recompute_cheaper"
    assert p.weigh(weighed, short, [victim, long_], preemption_victim=long_).compress  # 1.2 s


def test_a_request_waits_when_one_more_in_the_batch_gains_less_than_the_compaction():
    p = planner(budget=0.1, costs=trained(0.08, 0.0004))  # compute-bound: 0.5 ms of a step is fixed
    running = []
    for i in range(4):
        r = request(p, f"r{i}", 1000, 1001, generated=1000)
        p.window_assigned(r.request_id, 0)
        running.append(r)
    newcomer = request(p, "new", 640, 384)
    weighed = [p.compression(running[0], p.target(running[0]), p.output_horizon())]
    verdict = p.weigh(weighed, newcomer, running, preemption_victim=None)
    assert not verdict.compress and verdict.reason == "batch_gain_below_cost"


def test_until_the_costs_are_measured_every_compression_memory_asks_for_goes_ahead():
    p = planner(budget=0.1)  # nothing measured yet
    r = decoding(p, "r", 3000)
    weighed = [p.compression(r, p.target(r), p.output_horizon())]
    assert p.weigh(weighed, r, [r], preemption_victim=r).reason == "learning"
