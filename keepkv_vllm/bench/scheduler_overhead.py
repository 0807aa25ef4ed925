"""Scheduler overhead: what the compression decision costs per step, on real vLLM schedulers.

No engine, no model: vLLM's stock ``Scheduler`` and ``KeepKVScheduler`` are built from a real
``VllmConfig`` for the bundled SmolLM2-135M (fp32, 30 layers, 3 KV heads, head size 64) and a
``KVCacheConfig`` with its one full-attention group, as the engine core builds them. Each step
runs ``schedule()`` and then ``update_from_output()`` with a ``ModelRunnerOutput`` that gives
every scheduled request one sampled token once its prefill is done: the scheduler's whole
per-step work, nothing of the model's.

Workload (pressure on every step), the same for both schedulers:
- 16 short "opener" requests (1 output token each) run to their end first. KeepKV's
  growth-aware admission expects running requests to grow as far as finished ones did, so it
  then admits the whole workload into a pool sized for its prompts; without them it would hold
  most requests back (each may grow by a block before it is compressed again).
- N requests whose prompts fill ``prompt_blocks`` blocks (default 1; 8 is about 1k tokens,
  where every ranking evaluates every request in full; block size 128), staggered so that
  N / 128 of them (at least one) cross into their next block on every decode step while
  warmup + steps <= min(N, 128).
- The pool holds every prompt with free blocks at half the watermark (5 %): from the first
  decode step on, free blocks stay below the watermark. KeepKV compresses each request that
  has just taken a second block back into one (budget 0.3, at least 64 slots); stock vLLM
  preempts instead (same pool, same requests).
- Every request gets a query-window row (``window_memory`` sized for that), so every running
  request is a compression candidate that each ranking evaluates: the heaviest case for it.

Reported per timed decode step (after the prefill and ``warmup`` decode steps), pooled over
``repeats`` fresh runs:
- ``schedule()`` + ``update_from_output()`` of stock and KeepKV (median, p99) and the difference
  (stock's preemptions and recomputation are in its time);
- the decision: time KeepKV spends in its own code, from a separate instrumented run:
  ``schedule()`` outside vLLM's (``_compress_proactively``, the orders and window rows it
  attaches) plus ``_allocate_slots`` outside the allocation itself (admission, ranking,
  compression on a failed allocation, window rows, counters); the timers' own cost, calibrated
  on no-op calls, is subtracted. ``_compress`` alone is ``counters.compression_time_s``;
- compressions per step, steps under pressure, preemptions of both.

Timings are wall-clock on whatever else the machine runs: on a shared machine read the minimum
next to the median.

    python -m keepkv_vllm.bench.scheduler_overhead --num-requests 256 --steps 50
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import math
import pstats
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from keepkv_vllm.bench.schedulers import (
    NUM_OPENERS,
    OPENER_TOKENS,
    build_kv_cache_config,
    build_vllm_config,
    compression_settings,
    make_requests,
    make_scheduler,
    prompt_lengths,
    step,
    window_memory_for,
)

#: the issue's bound on the compression decision, per scheduler step
DECISION_BUDGET_MS = 1.0

RESULT_KEYS = (
    "num_requests",
    "steps",
    "warmup",
    "repeats",
    "block_size",
    "num_blocks",
    "watermark_blocks",
    "window_rows",
    "window_memory",
    "prompt_tokens_min",
    "prompt_tokens_max",
    "pressured_decision_ms_median",
    "pressured_decision_ms_p99",
    "stock_ms_median",
    "stock_ms_p99",
    "keepkv_ms_median",
    "keepkv_ms_p99",
    "diff_ms_median",
    "stock_scheduled_per_step",
    "keepkv_scheduled_per_step",
    "decision_ms_median",
    "decision_ms_p99",
    "decision_ms_min",
    "decision_ms_max",
    "decision_schedule_ms_median",
    "decision_allocate_ms_median",
    "probe_bias_ms_median",
    "compress_ms_median",
    "compressions_per_step",
    "min_compressions_per_step",
    "steps_with_compression",
    "steps_under_pressure",
    "timed_steps",
    "keepkv_preemptions",
    "stock_preemptions",
    "keepkv_compressions",
    "decision_within_budget",
    "per_step",
)


def _timed(fn: Any, probe: dict[str, float], key: str) -> Any:
    """``fn`` adding its seconds to ``probe[key]``, unless called inside another such timer of
    the same ``probe`` (nested allocation calls count once)."""

    def timed(*args: object, **kwargs: object) -> Any:
        if probe["depth"]:
            return fn(*args, **kwargs)
        probe["depth"] = 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            probe[key] += time.perf_counter() - start
            probe["depth"] = 0

    return timed


def _probed_class() -> type:
    """KeepKVScheduler with timers around its own code (for the decision cost)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from keepkv_vllm.engine.scheduler import KeepKVScheduler

    class InnerScheduleTimer(Scheduler):
        """Between KeepKVScheduler and vLLM's Scheduler in the MRO: times the stock schedule()."""

        def schedule(self, *args: object, **kwargs: object) -> Any:
            start = time.perf_counter()
            try:
                return super().schedule(*args, **kwargs)
            finally:
                self.probe["inner_schedule"] += time.perf_counter() - start

    class ProbedKeepKV(KeepKVScheduler, InnerScheduleTimer):
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.probe = dict.fromkeys(("inner_schedule", "allocate_slots", "allocation", "calls"), 0.0)
            super().__init__(*args, **kwargs)
            # KeepKV's _allocate_slots, installed on the manager: timed apart from the timers below
            outer: dict[str, float] = {"depth": 0, "allocate_slots": 0.0}
            allocate = _timed(self.kv_cache_manager.allocate_slots, outer, "allocate_slots")

            def counted(*a: object, **k: object) -> Any:
                self.probe["calls"] += 1
                before = outer["allocate_slots"]
                try:
                    return allocate(*a, **k)
                finally:
                    self.probe["allocate_slots"] += outer["allocate_slots"] - before

            self.kv_cache_manager.allocate_slots = counted
            # the allocation itself: vLLM's allocate_slots, or KeepKV's own for a compressed request
            self.probe["depth"] = 0
            self._try_allocate = _timed(self._try_allocate, self.probe, "allocation")
            self._stock_allocate = _timed(self._stock_allocate, self.probe, "allocation")

    return ProbedKeepKV


def probe_bias_s(calls: int = 20000, repeats: int = 9) -> float:
    """Seconds the timers add to one ``_allocate_slots`` call's own time (best of ``repeats``),
    measured on no-op calls nested as in KeepKV: subtracted from the decision, per call."""

    def noop(*args: object, **kwargs: object) -> None:
        return None

    holder: dict[str, Any] = {}

    def allocate(request: object, n: int, *args: object, **kwargs: object) -> Any:
        return holder["try"](request, n, *args, **kwargs)

    def per_call(fn: Any) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn(None, 1, num_lookahead_tokens=0)
        return (time.perf_counter() - start) / calls

    probed, plain = math.inf, math.inf
    for _ in range(repeats):
        outer_probe = {"depth": 0, "outer": 0.0}
        probe = {"depth": 0, "inner": 0.0}
        holder["try"] = _timed(_timed(noop, probe, "inner"), probe, "inner")
        outer = _timed(allocate, outer_probe, "outer")
        for _ in range(calls):
            outer(None, 1, num_lookahead_tokens=0)
        probed = min(probed, (outer_probe["outer"] - probe["inner"]) / calls)
        holder["try"] = noop
        plain = min(plain, per_call(allocate) - per_call(noop))
    return max(probed - max(plain, 0.0), 0.0)


# -- driving them -----------------------------------------------------------------------------
@contextmanager
def _logging(quiet: bool) -> Iterator[None]:
    """KeepKV logs an INFO line on each request's first compression. ``quiet``: silenced;
    otherwise emitted to stderr as a server would (vLLM configures no logging here)."""
    logger = logging.getLogger("vllm.keepkv")
    level = logger.level
    handler = None
    if quiet:
        logger.setLevel(logging.WARNING)
    else:
        logger.setLevel(logging.INFO)
        if not logger.hasHandlers():
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
            logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)


def _all_decoding(scheduler: Any, num_requests: int) -> bool:
    return (
        len(scheduler.running) == num_requests
        and not scheduler.waiting
        and all(r.num_computed_tokens >= r.num_prompt_tokens for r in scheduler.running)
    )


def _reach_decode(scheduler: Any, requests: list[Any], warmup: int, openers: Sequence[Any]) -> None:
    """Run the openers to their end, prefill every request, then ``warmup`` decode steps."""
    for request in openers:
        scheduler.add_request(request)
    for _ in range(64):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler)
    else:
        raise RuntimeError(f"{type(scheduler).__name__}: the openers did not finish")
    for request in requests:
        scheduler.add_request(request)
    for _ in range(8):
        step(scheduler)
        if _all_decoding(scheduler, len(requests)):
            break
    else:
        deferred = getattr(getattr(scheduler, "counters", None), "admissions_deferred", 0)
        raise RuntimeError(
            f"{type(scheduler).__name__}: only {len(scheduler.running)} of {len(requests)} requests "
            f"decoding after the prefill ({deferred} admissions deferred): fewer steps, or more blocks"
        )
    for _ in range(warmup):
        step(scheduler)


def drive(
    scheduler: Any,
    requests: list[Any],
    warmup: int,
    steps: int,
    low: float,
    openers: Sequence[Any] = (),
    profiler: cProfile.Profile | None = None,
) -> list[dict[str, float]]:
    """Run the ``openers`` to their end, prefill every request, run ``warmup`` decode steps,
    then time ``steps`` decode steps."""
    _reach_decode(scheduler, requests, warmup, openers)
    pool = scheduler.kv_cache_manager.block_pool
    counters = getattr(scheduler, "counters", None)
    probe = getattr(scheduler, "probe", None)
    rows = []
    gc.collect()
    gc.freeze()
    try:
        for _ in range(steps):
            pressure = pool.get_num_free_blocks() < low
            compressions = counters.compressions if counters else 0
            compress_s = counters.compression_time_s if counters else 0.0
            before = dict(probe) if probe else None
            if profiler is not None:
                profiler.enable()
            seconds, out = step(scheduler)
            if profiler is not None:
                profiler.disable()
            scheduled = len(out.num_scheduled_tokens)
            row = {"ms": 1e3 * seconds, "pressure": float(pressure), "scheduled": scheduled}
            if counters:
                row["compressions"] = counters.compressions - compressions
                row["compress_ms"] = 1e3 * (counters.compression_time_s - compress_s)
            if probe:
                delta = {k: probe[k] - before[k] for k in probe}
                # _allocate_slots outside the allocation itself (admission, ranking, compressing)
                row["alloc_own_ms"] = 1e3 * (delta["allocate_slots"] - delta["allocation"])
                row["alloc_calls"] = delta["calls"]
                row["inner_schedule_ms"] = 1e3 * delta["inner_schedule"]
            rows.append(row)
    finally:
        gc.unfreeze()
    return rows


def _drive_probed(
    scheduler: Any,
    requests: list[Any],
    warmup: int,
    steps: int,
    low: float,
    openers: list[Any],
    bias: float,
) -> list[dict[str, float]]:
    """Like ``drive``, timing schedule() alone to split KeepKV's part from the stock part."""
    original = scheduler.schedule
    own: list[float] = []

    def schedule(*args: object, **kwargs: object) -> Any:
        inner = scheduler.probe["inner_schedule"]
        start = time.perf_counter()
        out = original(*args, **kwargs)
        total = time.perf_counter() - start
        own.append(total - (scheduler.probe["inner_schedule"] - inner))
        return out

    scheduler.schedule = schedule
    rows = drive(scheduler, requests, warmup, steps, low, openers)
    for row, outside in zip(rows, own[-steps:], strict=True):
        row["schedule_own_ms"] = 1e3 * outside
        row["probe_bias_ms"] = 1e3 * bias * row["alloc_calls"]
        row["decision_ms"] = max(row["alloc_own_ms"] - row["probe_bias_ms"], 0.0) + row["schedule_own_ms"]
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _time_runs(
    fresh: Any, repeats: int, warmup: int, steps: int, low: float, profiler: cProfile.Profile | None
) -> dict[str, Any]:
    """``repeats`` fresh runs of stock, KeepKV and the instrumented KeepKV (and, with a
    profiler, one more KeepKV run whose timings are left out): their per-step rows."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from keepkv_vllm.engine.scheduler import KeepKVScheduler

    out: dict[str, Any] = {"stock": [], "keepkv": [], "probed": [], "keepkv_compressions": 0}
    out["preemptions"] = {"stock": 0, "keepkv": 0}
    probed_cls, bias = _probed_class(), probe_bias_s()
    for r in range(repeats):
        stock, requests, openers = fresh(Scheduler, r)
        out["stock"] += drive(stock, requests, warmup, steps, low, openers)
        out["preemptions"]["stock"] += sum(q.num_preemptions for q in requests)

        keepkv, requests, openers = fresh(KeepKVScheduler, r)
        out["keepkv"] += drive(keepkv, requests, warmup, steps, low, openers)
        out["preemptions"]["keepkv"] += keepkv.counters.preemptions
        out["keepkv_compressions"] += keepkv.counters.compressions

        probed, requests, openers = fresh(probed_cls, r)
        out["probed"] += _drive_probed(probed, requests, warmup, steps, low, openers, bias)
    if profiler is not None:
        keepkv, requests, openers = fresh(KeepKVScheduler, 0)
        drive(keepkv, requests, warmup, steps, low, openers, profiler)
    return out


def _summary(
    runs: dict[str, Any],
    lengths: list[int],
    num_requests: int,
    steps: int,
    warmup: int,
    repeats: int,
    block_size: int,
    num_blocks: int,
    low: float,
) -> dict[str, Any]:
    """The result ``run`` returns, from the per-step rows of every run (a line per figure)."""
    stock_rows, keepkv_rows, probed_rows = runs["stock"], runs["keepkv"], runs["probed"]
    preemptions, keepkv_compressions = runs["preemptions"], runs["keepkv_compressions"]
    stock_ms = [row["ms"] for row in stock_rows]
    keepkv_ms = [row["ms"] for row in keepkv_rows]
    decision_ms = [row["decision_ms"] for row in probed_rows]
    # the case: steps under pressure (the others only rank when an allocation fails)
    pressured_ms = [row["decision_ms"] for row in probed_rows if row["pressure"]] or [float("nan")]
    compressions = [int(row["compressions"]) for row in keepkv_rows]
    result: dict[str, Any] = {
        "num_requests": num_requests,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "block_size": block_size,
        "num_blocks": num_blocks,
        "watermark_blocks": low,
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "stock_ms_median": statistics.median(stock_ms),
        "stock_ms_p99": _percentile(stock_ms, 0.99),
        "keepkv_ms_median": statistics.median(keepkv_ms),
        "keepkv_ms_p99": _percentile(keepkv_ms, 0.99),
        "diff_ms_median": statistics.median(keepkv_ms) - statistics.median(stock_ms),
        "stock_scheduled_per_step": statistics.fmean(row["scheduled"] for row in stock_rows),
        "keepkv_scheduled_per_step": statistics.fmean(row["scheduled"] for row in keepkv_rows),
        "decision_ms_median": statistics.median(decision_ms),
        "decision_ms_p99": _percentile(decision_ms, 0.99),
        "decision_ms_min": min(decision_ms),
        "pressured_decision_ms_median": statistics.median(pressured_ms),
        "pressured_decision_ms_p99": _percentile(pressured_ms, 0.99),
        "decision_ms_max": max(decision_ms),
        "decision_schedule_ms_median": statistics.median(row["schedule_own_ms"] for row in probed_rows),
        "decision_allocate_ms_median": statistics.median(
            row["decision_ms"] - row["schedule_own_ms"] for row in probed_rows
        ),
        "probe_bias_ms_median": statistics.median(row["probe_bias_ms"] for row in probed_rows),
        "compress_ms_median": statistics.median(row["compress_ms"] for row in keepkv_rows),
        "compressions_per_step": statistics.fmean(compressions),
        "min_compressions_per_step": min(compressions),
        "steps_with_compression": sum(c > 0 for c in compressions),
        "steps_under_pressure": int(sum(row["pressure"] for row in keepkv_rows)),
        "timed_steps": len(keepkv_rows),
        "keepkv_preemptions": preemptions["keepkv"],
        "stock_preemptions": preemptions["stock"],
        "keepkv_compressions": keepkv_compressions,
        "decision_within_budget": statistics.median(pressured_ms) <= DECISION_BUDGET_MS,
        "per_step": {"stock": stock_rows, "keepkv": keepkv_rows, "probed": probed_rows},
    }
    return result


def run(
    num_requests: int = 256,
    steps: int = 50,
    warmup: int = 3,
    repeats: int = 3,
    block_size: int = 128,
    prompt_blocks: int = 1,
    budget: float = 0.3,
    watermark: float = 0.05,
    window_memory: float | None = None,
    quiet: bool = True,
    profile: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Time stock vLLM's and KeepKV's scheduler steps on the same pressured workload.

    ``window_memory=None`` gives every request a query-window row. With ``profile`` the result
    also holds ``profile``: cProfile's top functions over the timed steps of one more KeepKV run
    (not in the timings).
    """
    from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY, parse_config
    from keepkv_vllm.engine.memory import window_rows

    if num_requests < 1 or steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError("num_requests, steps and repeats must be >= 1, warmup >= 0")
    lengths = prompt_lengths(num_requests, block_size, prompt_blocks)
    # nobody finishes while timed, and long enough to be worth a window row: a request is
    # compressible if compressing could return a block at its longest (KeepKV's _could_compress)
    max_tokens = max(warmup + steps + 2, 2 * block_size)
    used = sum(math.ceil(n / block_size) for n in lengths)
    total = math.ceil(used / (1.0 - watermark / 2))  # free after the prefill: half the watermark
    num_blocks = total + 1  # plus vLLM's null block
    low = watermark * total

    settings = compression_settings(watermark, window_memory or 0.5, budget)
    vllm_config = build_vllm_config(num_requests, sum(lengths), settings, block_size)
    if window_memory is None:
        window_memory = window_memory_for(num_requests, vllm_config, num_blocks)
        settings = compression_settings(watermark, window_memory, budget)
        vllm_config.additional_config = {**vllm_config.additional_config, ADDITIONAL_CONFIG_KEY: settings}
    kv_cache_config = build_kv_cache_config(vllm_config, num_blocks)
    num_rows, _ = window_rows(parse_config(settings), vllm_config, kv_cache_config)

    def fresh(cls: type, r: int) -> tuple[Any, list[Any], list[Any]]:
        openers = make_requests([OPENER_TOKENS] * NUM_OPENERS, 1, vllm_config, seed + r, "opener")
        requests = make_requests(lengths, max_tokens, vllm_config, seed + r)
        return make_scheduler(cls, vllm_config, num_blocks), requests, openers

    profiler = cProfile.Profile() if profile else None
    with _logging(quiet):
        runs = _time_runs(fresh, repeats, warmup, steps, low, profiler)
    result = _summary(runs, lengths, num_requests, steps, warmup, repeats, block_size, num_blocks, low)
    result.update(window_rows=num_rows, window_memory=window_memory)
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def table(result: dict[str, Any]) -> str:
    """The markdown table ``main`` prints."""
    r = result
    verdict = "yes" if r["decision_within_budget"] else "NO"
    return "\n".join(
        [
            f"{r['num_requests']} running requests, {r['timed_steps']} timed decode steps "
            f"({r['repeats']} x {r['steps']}), pool {r['num_blocks']} blocks of {r['block_size']}, "
            f"watermark {r['watermark_blocks']:.1f} blocks, {r['window_rows']} window rows",
            "",
            "| scheduler step (schedule + update) | median ms | p99 ms | requests/step | "
            "compressions/step | preemptions |",
            "|---|---:|---:|---:|---:|---:|",
            f"| vLLM stock | {r['stock_ms_median']:.3f} | {r['stock_ms_p99']:.3f} | "
            f"{r['stock_scheduled_per_step']:.1f} | - | {r['stock_preemptions']} |",
            f"| KeepKV | {r['keepkv_ms_median']:.3f} | {r['keepkv_ms_p99']:.3f} | "
            f"{r['keepkv_scheduled_per_step']:.1f} | "
            f"{r['compressions_per_step']:.2f} (min {r['min_compressions_per_step']}) | "
            f"{r['keepkv_preemptions']} |",
            f"| KeepKV - stock | {r['diff_ms_median']:+.3f} | | | | |",
            "",
            "| compression decision (KeepKV's own code) | median ms | p99 ms | min ms |",
            "|---|---:|---:|---:|",
            f"| per step | {r['decision_ms_median']:.3f} | {r['decision_ms_p99']:.3f} | "
            f"{r['decision_ms_min']:.3f} |",
            f"| per step under pressure | {r['pressured_decision_ms_median']:.3f} | "
            f"{r['pressured_decision_ms_p99']:.3f} | |",
            f"| in schedule() (proactive compression) | {r['decision_schedule_ms_median']:.3f} | | |",
            f"| in _allocate_slots | {r['decision_allocate_ms_median']:.3f} | | |",
            f"| of which _compress | {r['compress_ms_median']:.3f} | | |",
            "",
            f"steps under pressure: {r['steps_under_pressure']}/{r['timed_steps']}, with a compression: "
            f"{r['steps_with_compression']}/{r['timed_steps']}; timers' own cost subtracted: "
            f"{r['probe_bias_ms_median']:.3f} ms/step; "
            f"decision <= {DECISION_BUDGET_MS:g} ms per step under pressure (median): {verdict}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="keepkv-bench scheduler", description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--steps", type=int, default=50, help="timed decode steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps after the prefill")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--prompt-blocks", type=int, default=1, help="blocks each prompt fills (8: 1k-token prompts)"
    )
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--watermark", type=float, default=0.05)
    p.add_argument("--window-memory", type=float, default=None, help="default: a row for every request")
    p.add_argument("--log", action="store_true", help="KeepKV's INFO lines to stderr")
    p.add_argument("--profile", action="store_true", help="cProfile one more KeepKV run")
    args = p.parse_args(argv)
    result = run(
        num_requests=args.num_requests,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        prompt_blocks=args.prompt_blocks,
        budget=args.budget,
        watermark=args.watermark,
        window_memory=args.window_memory,
        quiet=not args.log,
        profile=args.profile,
    )
    print(table(result))
    if "profile" in result:
        print("\n" + result["profile"])


if __name__ == "__main__":
    main()
