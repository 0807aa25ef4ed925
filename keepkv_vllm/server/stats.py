"""Engine-side statistics, fetched by the API server through vLLM's utility-call channel."""

from __future__ import annotations

from typing import Any


def engine_core_stats(engine_core: Any) -> dict[str, Any]:
    """Installed as ``EngineCore.kv_compression_stats`` (runs in the engine-core process)."""
    scheduler = engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    counters = getattr(scheduler, "counters", None)
    config = getattr(scheduler, "kvc", None)
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
            "compressed_running": len(getattr(scheduler, "kv_offset", {})),
        },
        "window": _window_rows(scheduler),
    }


def _window_rows(scheduler: Any) -> dict[str, int]:
    rows = getattr(scheduler, "window_rows", None)
    return {} if rows is None else {"rows": rows.num_rows, "rows_free": rows.free}


def engine_core_request_stats(
    engine_core: Any, req_ids: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """Installed as ``EngineCore.kv_compression_request_stats``: per-request counters.

    Keys are vLLM's internal request ids (the external id plus a ``-xxxxxxxx`` suffix).
    Each row: ``compressions`` and ``slots_removed`` (per head, from the scheduler) and
    ``tokens_merged`` / ``tokens_removed`` (all layers and heads, from the workers).
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


async def fetch_stats(engine_client: Any, check_votes: bool = False) -> dict[str, Any]:
    """Scheduler counters (engine core) plus compaction counters (workers, summed).

    ``check_votes`` adds a scan of every stored vote (``votes_nonpositive``,
    ``votes_nonfinite``), which costs a pass over the vote tensors.
    """
    stats = await engine_client.engine_core.call_utility_async("kv_compression_stats")
    if stats.get("enabled"):
        calls = ["kv_compression_worker_stats"] + (["kv_compression_vote_check"] if check_votes else [])
        merged: dict[str, float] = {}
        for call in calls:
            for w in await engine_client.collective_rpc(call):
                for k, v in w.items():
                    merged[k] = merged.get(k, 0) + v
        stats["worker"] = merged
    return stats
