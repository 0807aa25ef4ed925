"""Counters across tensor-parallel ranks and data-parallel engines (keepkv_vllm.server.stats)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from keepkv_vllm.server.stats import fetch_stats, merge_engines, merge_ranks


def rank(orders, digest, merged, pool=1000):
    return {
        "orders": orders,
        "order_digest": digest,
        "entries_merged": merged,
        "memory_pool_bytes": pool,
        "memory_window_rows": 7,
        "memory_share": 0.02,
    }


def test_ranks_sum_their_counters_and_must_agree_on_the_orders():
    merged, agree = merge_ranks([rank(3, 11, 40), rank(3, 11, 50), rank(3, 11, 60)])
    assert agree and merged["entries_merged"] == 150 and merged["orders"] == 9
    assert merged["memory_pool_bytes"] == 3000  # each rank's pool holds its own kv-heads
    assert merged["memory_window_rows"] == 7 and merged["order_digest"] == 11  # the same on every rank
    _, agree = merge_ranks([rank(3, 11, 40), rank(3, 12, 40)])
    assert not agree


def engine(free, total, compressions, running):
    return {
        "enabled": True,
        "config": {"budget": 0.3},
        "counters": {"compressions": compressions},
        "kv_cache": {"free_blocks": free, "total_blocks": total, "block_size": 128},
        "requests": {"running": running},
        "window": {"rows": 5, "rows_free": 5},
    }


def test_engines_add_up_but_settings_do_not():
    stats = merge_engines([engine(10, 30, 4, 2), engine(20, 30, 6, 1)])
    assert stats["counters"]["compressions"] == 10 and stats["requests"]["running"] == 3
    assert stats["kv_cache"] == {"free_blocks": 30, "total_blocks": 60, "block_size": 128}
    assert stats["config"] == {"budget": 0.3} and stats["window"]["rows"] == 10 and stats["engines"] == 2


def test_fetch_stats_reports_ranks_that_disagree():
    class Core:
        async def call_utility_all_async(self, method, *args):
            if method == "kv_compression_stats":
                return [engine(1, 2, 1, 0)]
            return [[rank(1, 5, 2), rank(2, 9, 2)]]  # rank 1 ran an extra order

    stats = asyncio.run(fetch_stats(SimpleNamespace(engine_core=Core())))
    assert stats["ranks_agree"] is False and stats["worker"]["orders"] == 3
    assert stats["worker_ranks"] == [
        [
            {"orders": 1, "order_digest": 5, "entries_merged": 2},
            {"orders": 2, "order_digest": 9, "entries_merged": 2},
        ]
    ]
