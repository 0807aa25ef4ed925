"""The measured-cost policy (policy/costs.py): the step-time model fitted from step timings, and
the decisions it makes, with costs injected as synthetic step timings (no engine, no clock)."""

from __future__ import annotations

import random

import pytest

from keepkv_vllm.policy.costs import SETTLE_STEPS, Compression, Policy, StepCosts, StepShape


def machine(base: float, prefill: float, decode: float, context: float, voted: float, compaction: float):
    """Step seconds of a made-up machine: per token, per request, per 1k slots, per 1k compacted."""

    def step(shape: StepShape) -> float:
        compacted = sum(shape.compacted_slots.values())
        return (
            base
            + prefill * shape.prefill_tokens
            + decode * shape.decode_requests
            + context * shape.context_slots / 1000
            + voted * shape.voted_slots / 1000
            + compaction * compacted / 1000
        )

    return step


def serve(costs: StepCosts, step, steps: int = 200, seed: int = 0, compact_every: int = 0) -> None:
    """Steps of varying shape, as a server's are: requests arrive, prefill, decode and finish."""
    rng = random.Random(seed)
    for i in range(steps):
        batch = rng.randint(1, 16)
        shape = StepShape(
            prefill_tokens=rng.choice([0, 0, 0, rng.randint(16, 2048)]),
            decode_requests=batch,
            context_slots=batch * rng.randint(200, 3000),
            voted_slots=rng.randint(0, batch) * rng.randint(0, 300),
            compacted_slots={"keepkv": rng.randint(500, 3000)}
            if compact_every and i % compact_every == 0
            else {},
        )
        costs.observe(shape, step(shape))


CPU = machine(base=0.004, prefill=0.0004, decode=0.006, context=0.002, voted=0.004, compaction=0.08)
GPU = machine(base=0.012, prefill=0.00002, decode=0.0001, context=0.00005, voted=0.00002, compaction=0.0005)


def test_the_model_recovers_a_machines_costs_from_its_step_timings():
    costs = StepCosts()
    serve(costs, CPU, compact_every=7)
    assert costs.settled and costs.knows_compaction("keepkv")
    assert costs.coefficient("base") == pytest.approx(0.004, rel=1e-3)
    assert costs.coefficient("prefill") == pytest.approx(0.0004, rel=1e-3)
    assert costs.coefficient("decode") == pytest.approx(0.006, rel=1e-3)
    assert costs.coefficient("context") == pytest.approx(0.002, rel=1e-3)
    assert costs.coefficient("voted") == pytest.approx(0.004, rel=1e-3)
    assert costs.compaction_seconds("keepkv", 1000) == pytest.approx(0.08, rel=1e-3)
    assert not costs.knows_compaction("snapkv")  # each method is measured on its own


def test_estimates_follow_the_machine_when_its_costs_change():
    costs = StepCosts()
    serve(costs, CPU, compact_every=5)
    slower = machine(base=0.008, prefill=0.0008, decode=0.012, context=0.004, voted=0.008, compaction=0.16)
    serve(costs, slower, steps=3000, seed=1, compact_every=5)  # another tenant took half the machine
    assert costs.coefficient("decode") == pytest.approx(0.012, rel=0.05)
    assert costs.compaction_seconds("keepkv", 1000) == pytest.approx(0.16, rel=0.05)


def test_one_stalled_step_does_not_move_the_model():
    costs = StepCosts()
    serve(costs, CPU)
    before = costs.coefficient("decode")
    costs.observe(StepShape(decode_requests=4, context_slots=4000), 5.0)  # a 5 s pause (GC, swap)
    assert costs.coefficient("decode") == pytest.approx(before, rel=0.05)


def test_before_it_has_measured_it_compresses_as_memory_asks():
    costs, policy = StepCosts(), None
    policy = Policy(costs)
    victim = [Compression("keepkv", 2000, 200, remaining_steps=100)]
    assert policy.instead_of_preempting(victim, recompute_tokens=1).reason == "learning"
    serve(costs, CPU)  # settled, but no compaction measured yet
    assert costs.settled and policy.to_admit(victim, 4, 8000, 384).reason == "learning"


def trained(step) -> Policy:
    costs = StepCosts()
    serve(costs, step, compact_every=7)
    assert costs.steps >= SETTLE_STEPS and costs.knows_compaction("keepkv")
    return Policy(costs)


def test_it_declines_to_compress_when_compaction_costs_more_than_the_recompute_it_saves():
    policy = trained(CPU)  # 0.08 s per 1k slots compacted; 0.4 ms per recomputed token
    victim = [Compression("keepkv", slots_before=3000, slots_after=300, remaining_steps=0)]
    # compaction 0.24 s against recomputing a 100-token request, 0.04 s: let vLLM preempt
    verdict = policy.instead_of_preempting(victim, recompute_tokens=100)
    assert not verdict.compress and verdict.reason == "recompute_cheaper"
    assert verdict.cost_s == pytest.approx(0.24, rel=1e-2) and verdict.gain_s == pytest.approx(0.04, rel=1e-2)
    # against recomputing 2,000 tokens (0.8 s) it pays
    verdict = policy.instead_of_preempting(victim, recompute_tokens=2000)
    assert verdict.compress and verdict.reason == "pays"


def test_the_vote_path_and_the_slots_it_no_longer_reads_count_for_the_rest_of_the_run():
    policy = trained(CPU)
    short = Compression("keepkv", 3000, 300, remaining_steps=0)
    # 1,000 more steps over 300 voted slots (+1.2 ms... each) but 2,700 fewer slots (-5.4 ms each)
    long = Compression("keepkv", 3000, 300, remaining_steps=1000)
    saving = 1000 * (300 * (0.002 + 0.004) - 3000 * 0.002) / 1000
    assert policy.cost([long]) == pytest.approx(policy.cost([short]) + saving, rel=1e-2)


def test_admitting_one_more_request_pays_where_the_step_is_bandwidth_bound_and_not_where_compute_bound():
    victim = [Compression("keepkv", slots_before=2000, slots_after=200, remaining_steps=0)]
    question = dict(batch=4, context_slots=8000, new_output_tokens=384)
    gpu = trained(GPU).to_admit(victim, **question)  # 12 ms / 4 x 384 steps = 1.15 s against 1 ms
    assert gpu.compress and gpu.reason == "pays" and gpu.gain_s > 10 * gpu.cost_s
    # compute-bound: a step is almost all per-request work, so one more request saves only the
    # fixed part spread over one more (0.5 ms / 4 x 384 steps = 48 ms) against 160 ms of compaction
    bound = dict(base=0.0005, prefill=0.0004, decode=0.006, context=0.002, voted=0.004)
    cpu = trained(machine(**bound, compaction=0.08)).to_admit(victim, **question)
    assert not cpu.compress and cpu.reason == "batch_gain_below_cost"
    assert cpu.gain_s == pytest.approx(0.048, rel=0.05) and cpu.cost_s == pytest.approx(0.16, rel=0.01)
    # the same machine with compaction 20x cheaper (8 ms): one more request pays again
    assert trained(machine(**bound, compaction=0.004)).to_admit(victim, **question).compress


def test_the_model_reads_in_units_a_person_can_check():
    costs = StepCosts()
    serve(costs, CPU, compact_every=7)
    snap = costs.snapshot(num_layers=30)
    assert snap["decode_ms_per_request"] == pytest.approx(6.0, rel=1e-3)
    assert snap["compaction_us_per_slot_layer"]["keepkv"] == pytest.approx(80 / 30, rel=1e-3)
    assert "6.00 ms per decode request" in costs.describe(30)


# -- the scheduler times its steps (engine/scheduler.py glue; decisions: tests/test_planner.py) -------
def scheduler_with(costs: StepCosts):
    pytest.importorskip("vllm")
    from keepkv_vllm.config import parse_config
    from keepkv_vllm.engine.scheduler import KeepKVScheduler
    from keepkv_vllm.policy.planner import Planner

    s = object.__new__(KeepKVScheduler)  # only what update_from_output reads
    s.planner = Planner(parse_config({"method": "keepkv"}), 128, 100, costs)
    s._timing, s._logged_costs = None, set()
    return s


def test_the_scheduler_times_each_step_and_updates_the_costs(monkeypatch):
    import time

    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "update_from_output", lambda self, output, *a, **k: "outputs")
    s = scheduler_with(StepCosts())
    output = object()
    for _ in range(3):
        s._timing = (output, StepShape(decode_requests=2, context_slots=1000), time.perf_counter() - 0.05)
        assert s.update_from_output(output, None) == "outputs"
    assert s.planner.costs.steps == 3 and s.planner.costs.predict(StepShape(decode_requests=2)) > 0.02
    s._timing = (object(), StepShape(decode_requests=2), time.perf_counter())  # another step's output
    s.update_from_output(output, None)
    assert s.planner.costs.steps == 3  # not paired with its own schedule: not timed


def test_what_one_more_request_saves_is_right_even_when_requests_and_slots_move_together():
    costs = StepCosts()
    rng = random.Random(5)
    step = machine(base=0.01, prefill=0.0004, decode=0.003, context=0.002, voted=0.0, compaction=0.0)
    for _ in range(300):  # every request holds 1,500 slots: requests and slots cannot be told apart
        batch = rng.randint(1, 12)
        shape = StepShape(
            prefill_tokens=rng.choice([0, 0, 300]), decode_requests=batch, context_slots=1500 * batch
        )
        costs.observe(shape, step(shape))
    assert costs.batch_gain(4, 6000) == pytest.approx(0.01 / 4, rel=1e-3)  # the fixed 10 ms, shared
    assert costs.decode_step(4, 6000) == pytest.approx(0.01 + 4 * 0.003 + 6 * 0.002, rel=1e-3)
