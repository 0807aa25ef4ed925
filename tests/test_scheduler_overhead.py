"""The scheduler-overhead benchmark drives real schedulers as intended (behaviour only, no timing)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from keepkv_vllm.bench import scheduler_overhead

NUM_REQUESTS, STEPS, REPEATS = 32, 5, 1


@pytest.fixture(scope="module")
def result():
    return scheduler_overhead.run(num_requests=NUM_REQUESTS, steps=STEPS, repeats=REPEATS)


def test_the_result_holds_every_documented_key(result):
    assert set(result) == set(scheduler_overhead.RESULT_KEYS)
    assert result["timed_steps"] == STEPS * REPEATS
    for name in ("stock", "keepkv", "probed"):
        assert len(result["per_step"][name]) == STEPS * REPEATS


def test_every_timed_step_is_under_pressure_and_keepkv_compresses_on_each(result):
    assert result["window_rows"] == NUM_REQUESTS  # every request is a candidate
    assert result["steps_under_pressure"] == result["timed_steps"]
    assert result["steps_with_compression"] == result["timed_steps"]
    assert result["min_compressions_per_step"] >= 1
    # the instrumented run makes the same decisions as the plain one
    probed = [row["compressions"] for row in result["per_step"]["probed"]]
    assert probed == [row["compressions"] for row in result["per_step"]["keepkv"]]


def test_keepkv_never_preempts_where_stock_vllm_does(result):
    assert result["keepkv_preemptions"] == 0
    assert result["stock_preemptions"] > 0
    assert result["keepkv_compressions"] >= result["timed_steps"]


def test_the_table_reports_both_schedulers_and_the_verdict(result):
    text = scheduler_overhead.table(result)
    assert "| vLLM stock |" in text and "| KeepKV |" in text
    assert "| per step |" in text and "decision <= 1 ms per step" in text


def test_prompts_stagger_the_block_crossings():
    # request i crosses into its second block on decode step (N - 1 - i) mod 128 + 1
    lengths = scheduler_overhead.prompt_lengths(4, 128)
    assert lengths == [125, 126, 127, 128]
    lengths = scheduler_overhead.prompt_lengths(256, 128)
    assert lengths[:128] == lengths[128:] and sorted(lengths[:128]) == list(range(1, 129))


def test_main_prints_the_markdown_table(capsys):
    scheduler_overhead.main(["--num-requests", "8", "--steps", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert out.startswith("8 running requests, 3 timed decode steps")
    assert "| KeepKV |" in out and "with a compression: 3/3" in out


@pytest.mark.parametrize("prompt_blocks", [1, 2, 8])
def test_the_memoized_ranking_answers_as_a_full_evaluation_does(monkeypatch, prompt_blocks):
    """The ranking keeps each request's reclaim until its blocks, window row, step tokens or
    token count could change it; on every call of a pressured run it must give what evaluating
    the request in full gives, and it must mostly answer from the memo (else it saves nothing)."""
    from keepkv_vllm.policy.planner import Planner

    memoized, full = Planner.reclaimable, Planner._reclaim_now
    calls = {"ranked": 0, "evaluated": 0, "positive": 0}

    def evaluated(self, request, record, held, step):
        calls["evaluated"] += 1
        return full(self, request, record, held, step)

    def checked(self, request, held):
        got = memoized(self, request, held)
        calls["ranked"] += 1
        calls["positive"] += got > 0
        want = 0
        record = self.tracked.get(request.request_id)
        if record is not None and request.request_id not in self.ordered:
            want = full(self, request, record, held, self.step_tokens.get(request.request_id, 0))[0]
        assert got == want, (request.request_id, request.num_computed_tokens)
        return got

    monkeypatch.setattr(Planner, "reclaimable", checked)
    monkeypatch.setattr(Planner, "_reclaim_now", evaluated)
    result = scheduler_overhead.run(num_requests=32, steps=40, repeats=1, prompt_blocks=prompt_blocks)
    assert result["keepkv_compressions"] > 0 and calls["positive"] > 0
    assert calls["evaluated"] < calls["ranked"] / 2, calls
