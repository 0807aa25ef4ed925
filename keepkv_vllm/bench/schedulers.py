"""Real vLLM schedulers without an engine or a model, for the scheduler benchmark and tests.

vLLM's stock ``Scheduler`` and ``KeepKVScheduler`` built from a real ``VllmConfig`` for the
bundled SmolLM2-135M (fp32, 30 layers, 3 KV heads, head size 64) and a ``KVCacheConfig`` with
its one full-attention group, as the engine core builds them; requests with distinct prompts;
and what the model runner would return (one sampled token per request past its prefill).
``decision_log`` records what a scheduler decided, step by step, on a pressured workload: the
tests compare it with a recorded digest, so a change that is meant to keep behaviour keeps it.
"""

from __future__ import annotations

import math
import time
import zlib
from typing import Any

NUM_LAYERS, NUM_KV_HEADS, HEAD_SIZE = 30, 3, 64  # SmolLM2-135M
SAMPLED_TOKEN = 42
#: short requests run to their end before the workload: the output lengths KeepKV's admission
#: expects running requests to reach (its horizon); see the module docstring
NUM_OPENERS, OPENER_TOKENS = 16, 16


def compression_settings(watermark: float, window_memory: float, budget: float) -> dict[str, Any]:
    return {
        "method": "keepkv",
        "budget": budget,
        "trigger": "pressure",
        # every compression memory asks for: steps here are not executed, so measured costs
        # would mean nothing, and the per-step decisions must match the probed run's
        "policy": "memory",
        "watermark": watermark,
        "window_memory": window_memory,
    }


def build_vllm_config(
    num_requests: int,
    max_num_batched_tokens: int,
    settings: dict[str, Any],
    block_size: int = 128,
    max_model_len: int = 4096,
) -> Any:
    """A VllmConfig for the bundled model, as ``--kv-compression keepkv`` would give it."""
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig

    from keepkv_vllm.assets import model_dir
    from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY

    model_config = ModelConfig(model=str(model_dir()), dtype="float32", max_model_len=max_model_len, seed=0)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max(256, num_requests),
        max_num_batched_tokens=max(max_num_batched_tokens, max_model_len),
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=block_size)  # prefix caching: vLLM's default (on)
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        additional_config={ADDITIONAL_CONFIG_KEY: settings},
    )


def build_kv_cache_config(vllm_config: Any, num_blocks: int) -> Any:
    """One full-attention group over the model's 30 layers (vLLM's layer names), fp32 pages."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=NUM_KV_HEADS,
        head_size=HEAD_SIZE,
        dtype=torch.float32,
    )
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(NUM_LAYERS)]
    return KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layers, spec)]
    )


def make_scheduler(cls: type, vllm_config: Any, num_blocks: int) -> Any:
    """A scheduler as the engine core builds it (its structured-output manager, block sizes)."""
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes
    from vllm.v1.structured_output import StructuredOutputManager

    kv_cache_config = build_kv_cache_config(vllm_config, num_blocks)
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=hash_block_size,
        log_stats=True,
    )


def prompt_lengths(num_requests: int, block_size: int, prompt_blocks: int = 1) -> list[int]:
    """Request i fills ``prompt_blocks`` blocks and crosses into the next one on decode step
    ((N - 1 - i) mod spread) + 1.

    The last-admitted requests cross first: ties in KeepKV's ranking go to the running order,
    so the requests it compresses are the ones that have just crossed, never future crossers.
    """
    spread = min(num_requests, block_size)
    full = (prompt_blocks - 1) * block_size
    return [full + block_size - (num_requests - 1 - i) % spread for i in range(num_requests)]


def make_requests(
    lengths: list[int], max_tokens: int, vllm_config: Any, seed: int = 0, prefix: str = "req"
) -> list[Any]:
    """Requests with distinct prompts (no prefix sharing), hashed for the prefix cache."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(vllm_config.cache_config.block_size, hash_fn)
    vocab = vllm_config.model_config.get_vocab_size()
    requests = []
    offset = zlib.crc32(prefix.encode())  # no prefix shared between the sets either
    for i, n in enumerate(lengths):
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        tokens = [(seed + 7919 * i + 31 * j + offset) % vocab for j in range(n)]
        requests.append(
            Request(
                request_id=f"{prefix}-{i}",
                prompt_token_ids=tokens,
                sampling_params=params,
                pooling_params=None,
                block_hasher=hasher,
            )
        )
    return requests


def model_output(scheduler: Any, scheduler_output: Any) -> Any:
    """What the model runner returns: one sampled token per request whose prefill is done."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled = []
    for req_id in req_ids:
        request = scheduler.requests[req_id]
        sampled.append([SAMPLED_TOKEN] if request.num_computed_tokens >= request.num_tokens else [])
    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
    )


def step(scheduler: Any) -> tuple[float, Any]:
    """One scheduler step; returns the seconds spent in the scheduler (not building the output)."""
    start = time.perf_counter()
    out = scheduler.schedule()
    mid = time.perf_counter()
    runner_output = model_output(scheduler, out)
    resume = time.perf_counter()
    scheduler.update_from_output(out, runner_output)
    return (mid - start) + (time.perf_counter() - resume), out


def window_memory_for(num_rows: int, vllm_config: Any, num_blocks: int) -> float:
    """The smallest ``window_memory`` (to 1e-4) that gives ``num_rows`` query-window rows."""
    from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY, parse_config
    from keepkv_vllm.engine.memory import WindowGeometry, pool_bytes

    pool, _, layers = pool_bytes(build_kv_cache_config(vllm_config, num_blocks))
    window = parse_config(vllm_config.additional_config[ADDITIONAL_CONFIG_KEY]).window
    row = WindowGeometry.from_vllm(vllm_config, window, layers).row_bytes
    share = num_rows * row / pool  # rows take window_memory of pool + rows: share / (1 + share)
    return min(0.5, math.ceil(1e4 * share / (1 + share)) / 1e4 + 1e-4)


#: pressured workloads whose decisions are recorded (tests/test_scheduler_decisions.py): the
#: benchmark's two, a 10 % budget, too few window rows, requests finishing and arriving, and the
#: measured-cost policy while it is still learning
DECISION_WORKLOADS: dict[str, dict[str, Any]] = {
    "bench-256x1": dict(num_requests=256, prompt_blocks=1, budget=0.3, steps=50),
    "bench-64x8": dict(num_requests=64, prompt_blocks=8, budget=0.3, steps=40),
    "budget-0.1": dict(num_requests=64, prompt_blocks=4, budget=0.1, steps=40),
    "few-rows": dict(num_requests=64, prompt_blocks=2, budget=0.3, steps=40, rows=20),
    "finishing+late": dict(num_requests=48, prompt_blocks=2, budget=0.2, steps=120, max_tokens=40, late=30),
    # fewer steps than the cost model needs to settle: its answers would follow wall-clock noise
    "measured-learning": dict(
        num_requests=64, prompt_blocks=2, budget=0.3, steps=30, policy="measured", late=20
    ),
    # everything fits until late arrivals overflow the pool: the window is paused, then resumes
    "fits-then-late": dict(
        num_requests=16, prompt_blocks=2, budget=0.3, steps=150, max_tokens=100, late=40, spare_blocks=24
    ),
}


def decision_log(
    num_requests: int,
    prompt_blocks: int,
    budget: float,
    steps: int,
    max_tokens: int | None = None,
    rows: int | None = None,
    policy: str = "memory",
    late: int = 0,
    block_size: int = 128,
    watermark: float = 0.05,
    spare_blocks: int = 0,
) -> list[dict[str, Any]]:
    """KeepKVScheduler's decisions, step by step: what it scheduled, the orders and window rows
    it sent, whom vLLM preempted, the free blocks and the counters. ``rows`` window rows (default:
    one per request); ``late`` short requests arrive one every third step; ``spare_blocks`` more
    blocks than the prompts fill."""
    from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY
    from keepkv_vllm.engine.messages import ORDERS_ATTR, RECORD_ATTR, ROWS_ATTR
    from keepkv_vllm.engine.scheduler import KeepKVScheduler

    lengths = prompt_lengths(num_requests, block_size, prompt_blocks)
    max_tokens = max_tokens or max(steps + 5, 2 * block_size)
    used = sum(math.ceil(n / block_size) for n in lengths)
    num_blocks = math.ceil(used / (1.0 - watermark / 2)) + 1 + spare_blocks  # plus vLLM's null block
    settings = {**compression_settings(watermark, 0.5, budget), "policy": policy}
    vllm_config = build_vllm_config(num_requests + late, sum(lengths), settings, block_size)
    settings["window_memory"] = window_memory_for(rows or num_requests, vllm_config, num_blocks)
    vllm_config.additional_config = {**vllm_config.additional_config, ADDITIONAL_CONFIG_KEY: settings}
    scheduler = make_scheduler(KeepKVScheduler, vllm_config, num_blocks)
    for request in make_requests([OPENER_TOKENS] * NUM_OPENERS, 1, vllm_config, 0, "opener"):
        scheduler.add_request(request)
    for request in make_requests(lengths, max_tokens, vllm_config, 0):
        scheduler.add_request(request)
    arriving = make_requests([300 + 17 * i for i in range(late)], 50, vllm_config, 0, "late")
    log = []
    for n in range(steps):
        if arriving and n % 3 == 0:
            scheduler.add_request(arriving.pop(0))
        _, out = step(scheduler)
        orders = [
            [o.req_id, o.kv_len_before, o.kv_len_after, o.frozen_slots, o.num_computed_tokens, o.method,
             list(o.src_block_ids), list(o.block_ids)]
            for o in getattr(out, ORDERS_ATTR)
        ]  # fmt: skip
        counters = scheduler.counters.as_dict()
        counters.pop("compression_time_s")  # wall-clock
        log.append(
            {
                "scheduled": dict(sorted(out.num_scheduled_tokens.items())),
                "orders": orders,
                "rows": dict(sorted(getattr(out, ROWS_ATTR).items())),
                "record": getattr(out, RECORD_ATTR),
                "preempted": sorted(getattr(out, "preempted_req_ids", None) or []),
                "free": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
                "counters": counters,
                "running": [r.request_id for r in scheduler.running],
                "waiting": len(scheduler.waiting),
            }
        )
    return log
