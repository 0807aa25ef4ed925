"""Engine-side statistics, fetched by the API server through vLLM's utility-call channel."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm.keepkv")


def engine_core_stats(engine_core: Any) -> dict[str, Any]:
    """Installed as ``EngineCore.kv_compression_stats`` (runs in the engine-core process)."""
    scheduler = engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    counters = getattr(scheduler, "counters", None)
    config = getattr(scheduler, "settings", None)
    return {
        "enabled": counters is not None,
        "config": config.model_dump() if config is not None else {"method": "none"},
        "counters": counters.as_dict() if counters is not None else {},
        "kv_cache": {
            "free_blocks": pool.get_num_free_blocks(),
            "total_blocks": pool.num_gpu_blocks - 1,
            "block_size": scheduler.cache_config.block_size,
        },
        "requests": {
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting),
            "compressed_running": _compressed(scheduler),
        },
        "window": _window_rows(scheduler),
        "step_costs": _step_costs(scheduler),
    }


def _compressed(scheduler: Any) -> int:
    """Unfinished requests compressed at least once (0 for a stock scheduler)."""
    planner = getattr(scheduler, "planner", None)
    return 0 if planner is None else planner.num_compressed


def _step_costs(scheduler: Any) -> dict[str, Any]:
    """What this engine measured steps and compactions to cost (policy/costs.py)."""
    snapshot = getattr(scheduler, "costs_snapshot", None)
    return {} if snapshot is None else snapshot()


def _window_rows(scheduler: Any) -> dict[str, int]:
    rows = getattr(scheduler, "window_rows", None)
    return {} if rows is None else {"rows": rows.num_rows, "rows_free": rows.free}


def engine_core_request_stats(
    engine_core: Any, req_ids: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """Installed as ``EngineCore.kv_compression_request_stats``: per-request counters.

    Keys are vLLM's internal request ids (the external id plus a ``-xxxxxxxx`` suffix).
    Each row: ``compressions`` and ``slots_removed`` (per head, from the scheduler) and
    ``entries_merged`` / ``entries_removed`` (one per slot, layer and kv-head, from the workers).
    A request that was never compressed has no row.
    """
    ledger = getattr(engine_core.scheduler, "request_ledger", None)
    if ledger is None:
        return {}
    rows = ledger.get(req_ids)
    for worker_rows in engine_core.model_executor.collective_rpc(
        "kv_compression_request_stats", args=(req_ids,)
    ):
        for req_id, counts in worker_rows.items():
            row = rows.setdefault(req_id, {})
            for key, n in counts.items():
                row[key] = row.get(key, 0) + n
    return rows


#: worker figures that are the same on every tensor-parallel rank (not summed)
PER_RANK = ("memory_window_rows", "memory_share", "order_digest")


async def each_engine(core: Any, method: str, *args: Any) -> list[Any]:
    """One result per engine core (data parallel runs several)."""
    if hasattr(core, "call_utility_all_async"):
        return list(await core.call_utility_all_async(method, *args))
    return [await core.call_utility_async(method, *args)]


def _add(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum a flat dict of numbers into ``total`` key by key."""
    for key, value in part.items():
        total[key] = total[key] + value if key in total else value
    return total


def merge_engines(engines: list[dict[str, Any]]) -> dict[str, Any]:
    """Data-parallel engine cores: counters, requests, blocks and window rows add up; each
    engine's own figures stay in ``per_engine`` (in data-parallel rank order)."""
    stats = {k: dict(v) if isinstance(v, dict) else v for k, v in engines[0].items()}
    for engine in engines[1:]:
        for section in ("counters", "requests", "window"):
            _add(stats[section], engine.get(section, {}))
        for key in ("free_blocks", "total_blocks"):
            stats["kv_cache"][key] += engine["kv_cache"][key]
    stats["engines"] = len(engines)
    stats["step_costs"] = [engine.get("step_costs", {}) for engine in engines]  # one per engine
    stats["per_engine"] = [
        {"engine": i, **{k: engine.get(k, {}) for k in ("counters", "kv_cache", "requests")}}
        for i, engine in enumerate(engines)
    ]
    return stats


def config_mismatch(expected: dict[str, Any], engines: list[dict[str, Any]]) -> str | None:
    """Why these engines must not serve behind this API server (None: they may): every
    data-parallel engine must run the compression settings the API server was started with.

    A node started without the plugin, or with other settings, would otherwise serve a share of
    the requests uncompressed or differently, and the per-request options the API server checked
    would mean something else there."""
    for i, engine in enumerate(engines):
        got = engine.get("config", {"method": "none"})
        if got != expected:
            differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            shown = ", ".join(f"{k}={got.get(k)!r} (expected {expected.get(k)!r})" for k in differ)
            return (
                f"data-parallel engine {i} runs other kv compression settings than this API server: {shown}"
            )
    return None


def merge_ranks(ranks: list[dict[str, float]]) -> tuple[dict[str, float], bool]:
    """One engine's workers: counters summed over ranks, and whether all ranks ran the same orders."""
    merged: dict[str, float] = {}
    for rank in ranks:
        _add(merged, {k: v for k, v in rank.items() if k not in PER_RANK})
    merged.update({k: ranks[0][k] for k in PER_RANK if ranks and k in ranks[0]})
    agree = len({(r.get("orders"), r.get("order_digest")) for r in ranks}) <= 1
    return merged, agree


async def fetch_request_stats(engine_client: Any, prefix: str = "") -> dict[str, dict[str, int]]:
    """Per-request counters of every engine (``engine_core_request_stats``), for the requests
    whose internal id starts with ``prefix`` (an OpenAI response's ``id`` is the prefix of its
    requests' internal ids). Engines without compression answer nothing."""
    rows: dict[str, dict[str, int]] = {}
    try:
        engines = await each_engine(engine_client.engine_core, "kv_compression_request_stats", None)
    except Exception:  # stock vLLM: no such utility call
        return rows
    for engine_rows in engines:
        rows.update({k: v for k, v in (engine_rows or {}).items() if k.startswith(prefix)})
    return rows


async def fetch_stats(engine_client: Any, check_votes: bool = False) -> dict[str, Any]:
    """Scheduler counters (every engine core, summed) plus compaction counters (every worker).

    Tensor-parallel ranks of one engine each compact their own kv-heads: their counters are
    summed, and each reports which orders it ran; ranks that disagree are an error (in the log
    and ``ranks_agree: false``), never silent. ``check_votes`` adds a scan of every stored vote
    (``votes_nonpositive``, ``votes_nonfinite``), which costs a pass over the vote regions.
    """
    core = engine_client.engine_core
    engines = await each_engine(core, "kv_compression_stats")
    stats = merge_engines(engines)
    if not stats.get("enabled"):
        return stats
    calls = ["kv_compression_worker_stats"] + (["kv_compression_vote_check"] if check_votes else [])
    per_call = [await each_engine(core, "collective_rpc", call, None, (), None) for call in calls]
    worker: dict[str, float] = {}
    agree, ranks = True, []
    for engine_index in range(len(engines)):
        engine_ranks = per_call[0][engine_index]
        merged, engine_agrees = merge_ranks(engine_ranks)
        for extra in per_call[1:]:
            for rank in extra[engine_index]:
                _add(merged, rank)
        stats["per_engine"][engine_index]["worker"] = dict(merged)
        _add(worker, {k: v for k, v in merged.items() if k not in PER_RANK or not worker})
        agree &= engine_agrees
        ranks.append(
            [{k: r.get(k) for k in ("orders", "order_digest", "entries_merged")} for r in engine_ranks]
        )
    if not agree:
        logger.error("kv compression: tensor-parallel ranks ran different compression orders: %s", ranks)
    stats.update(worker=worker, worker_ranks=ranks, ranks_agree=agree)
    return stats
