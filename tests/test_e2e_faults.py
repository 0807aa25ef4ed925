"""Faults at the worst moments, on the real engine stepped by hand (in-process engine core).

Each test runs a *witness* request with compression off beside the faulty ones and compares
its greedy tokens with a clean run of the same workload: a fault may lose the faulty request
(an abort) but must not crash the engine, leak a block or change anybody else's output.
"""

from __future__ import annotations

import pytest

from keepkv_vllm.bench.server import SMOLLM2_KV_BYTES_PER_TOKEN as KV_BYTES_PER_TOKEN

pytestmark = pytest.mark.slow

POOL_BLOCKS = 30
BUDGET = 0.3


@pytest.fixture(scope="module")
def llm():
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: steppable
    mp.delenv("TRITON_INTERPRET", raising=False)
    from vllm import LLM

    from keepkv_vllm.assets import model_dir

    engine = LLM(
        str(model_dir()),
        dtype="float32",
        max_model_len=2048,
        enforce_eager=True,
        max_num_batched_tokens=512,
        gpu_memory_utilization=0.3,
        kv_cache_memory_bytes=POOL_BLOCKS * 128 * KV_BYTES_PER_TOKEN,
        enable_prefix_caching=True,
        additional_config={"kv_compression": {"method": "keepkv", "budget": BUDGET, "trigger": "always"}},
    )
    yield engine
    mp.undo()


@pytest.fixture(scope="module")
def prompts(needle_factory):
    return [needle_factory.make(n, 0.5, seed).token_ids for seed, n in enumerate((700, 900, 1100, 800))]


def _core(llm):
    return llm.llm_engine.engine_core.engine_core


def _pool_state(llm) -> tuple[int, int]:
    scheduler = _core(llm).scheduler
    pool = scheduler.kv_cache_manager.block_pool
    return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1


def _run(llm, requests, on_step=None) -> dict[str, list[int]]:
    """requests: (name, prompt ids, max_tokens, extra_args). Greedy; ignore_eos."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    internal = {}
    for name, ids, max_tokens, extra in requests:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra)
        internal[name] = engine.add_request(name, TokensPrompt(prompt_token_ids=list(ids)), params)
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.outputs[0].token_ids)
        if on_step is not None:
            on_step(internal)
    return out


def _ledger(llm) -> dict[str, dict[str, int]]:
    """Per-request counters of scheduler and worker (the engine-core utility the eval uses)."""
    return _core(llm).kv_compression_request_stats(None)


OFF = {"kv_compression": "off"}


def _workload(prompts, tag):
    return [
        (f"witness-{tag}", prompts[0], 48, OFF),
        (f"victim-{tag}", prompts[1], 64, None),
        (f"other-{tag}", prompts[2], 40, None),
    ]


def test_abort_while_a_compression_order_is_in_flight(llm, prompts):
    reference = _run(llm, _workload(prompts, "ref"))
    scheduler = _core(llm).scheduler
    stock_schedule = scheduler.schedule
    aborted = []

    def schedule(*args, **kwargs):
        output = stock_schedule(*args, **kwargs)
        orders = getattr(output, "kv_compression_orders", [])
        victim = next((o.req_id for o in orders if o.req_id.startswith("victim-abort")), None)
        if victim is not None and not aborted:
            # the order is on its way to the worker; the request is aborted before it runs
            llm.llm_engine.abort_request([victim], internal=True)
            aborted.append(victim)
        return output

    scheduler.schedule = schedule
    try:
        result = _run(llm, _workload(prompts, "abort"))
    finally:
        del scheduler.schedule
    assert aborted, "the victim was never compressed"
    assert "victim-abort" not in result
    assert result["witness-abort"] == reference["witness-ref"]
    assert len(result["other-abort"]) == 40
    free, total = _pool_state(llm)
    assert free == total


def test_a_request_that_finishes_in_the_step_it_is_compressed(llm, prompts):
    # max_tokens=2: token 1 comes from the prefill step, token 2 from the first decode step,
    # which is also the step whose order compresses the request (trigger "always")
    result = _run(llm, [("short", prompts[3], 2, None), ("witness-short", prompts[0], 16, OFF)])
    assert len(result["short"]) == 2
    row = next(v for k, v in _ledger(llm).items() if k.startswith("short-"))
    assert row["compressions"] == 1 and row["entries_removed"] > 0
    ref = _run(llm, [("witness-alone", prompts[0], 16, OFF)])
    assert result["witness-short"] == ref["witness-alone"]
    free, total = _pool_state(llm)
    assert free == total


def test_compressing_requests_that_share_prefix_cached_blocks(llm, prompts):
    # two full shared blocks (frozen while both run), then each request's own long tail,
    # which is compressed; a's tail blocks come from the prefix cache too (its earlier run)
    # (a 30 % budget must leave >= min_budget_tokens past the frozen prefix: 1,100 tokens)
    a = prompts[2]
    shared = a[:256]
    b = shared + prompts[1][:850]
    ref = _run(llm, [("ref-b", b, 32, OFF)])
    _run(llm, [("first-a", a, 8, OFF)])  # fills the prefix cache with the shared blocks
    result = _run(llm, [("cached-a", a, 40, None), ("cached-b", b, 40, None)])
    assert len(result["cached-a"]) == len(result["cached-b"]) == 40
    rows = {k.rsplit("-", 1)[0]: v for k, v in _ledger(llm).items()}
    assert rows["cached-a"]["compressions"] >= 1 and rows["cached-b"]["compressions"] >= 1
    # the shared blocks were never rewritten: a fresh uncompressed run still reads them right
    again = _run(llm, [("again-b", b, 32, OFF)])
    assert again["again-b"] == ref["ref-b"]
    free, total = _pool_state(llm)
    assert free == total


def test_the_last_request_of_a_full_pool_compresses_itself_to_finish(llm, prompts):
    # Three uncompressible requests (compression off) hold 23 of the 29 blocks. The last one
    # would need 11 blocks uncompressed (600 + 700 tokens): stock vLLM would preempt. Here it
    # keeps compressing itself and everybody finishes, with no preemption.
    before = _core(llm).scheduler.counters.preemptions
    fillers = [(f"filler-{i}", prompts[i], 100, OFF) for i in (0, 1, 3)]
    result = _run(llm, fillers + [("last", prompts[2][:600], 700, None)])
    assert [len(result[name]) for name, *_ in fillers] == [100, 100, 100]
    assert len(result["last"]) == 700
    assert _core(llm).scheduler.counters.preemptions == before
    row = next(v for k, v in _ledger(llm).items() if k.startswith("last-"))
    assert row["compressions"] >= 3
    free, total = _pool_state(llm)
    assert free == total
