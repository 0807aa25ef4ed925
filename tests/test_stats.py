"""Counters across tensor-parallel ranks and data-parallel engines (keepkv_vllm.server.stats)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from keepkv_vllm.server.endpoint import _Mirror, check_engines, expected_config
from keepkv_vllm.server.stats import config_mismatch, fetch_stats, merge_engines, merge_ranks


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


def test_each_engine_keeps_its_own_figures_beside_the_sums():
    class Core:
        async def call_utility_all_async(self, method, *args):
            if method == "kv_compression_stats":
                return [engine(10, 30, 4, 2), engine(20, 30, 6, 1)]
            return [[rank(4, 5, 40)], [rank(6, 7, 60)]]

    stats = asyncio.run(fetch_stats(SimpleNamespace(engine_core=Core())))
    assert [e["engine"] for e in stats["per_engine"]] == [0, 1]
    assert [e["counters"]["compressions"] for e in stats["per_engine"]] == [4, 6]
    assert [e["worker"]["entries_merged"] for e in stats["per_engine"]] == [40, 60]
    assert [e["kv_cache"]["free_blocks"] for e in stats["per_engine"]] == [10, 20]
    assert stats["worker"]["entries_merged"] == 100 and stats["counters"]["compressions"] == 10


def test_an_engine_with_other_settings_or_none_is_named_with_what_differs():
    ours = {"method": "keepkv", "budget": 0.3}
    assert config_mismatch(ours, [{"config": dict(ours)}, {"config": dict(ours)}]) is None
    other = config_mismatch(ours, [{"config": dict(ours)}, {"config": {"method": "keepkv", "budget": 0.2}}])
    assert other == (
        "data-parallel engine 1 runs other kv compression settings than this API server: "
        "budget=0.2 (expected 0.3)"
    )
    off = config_mismatch(ours, [{"config": {"method": "none"}}])
    assert off.startswith("data-parallel engine 0 runs other") and "method='none' (expected 'keepkv')" in off


def frontend(additional, engines):
    """An API server's engine client: its own config, and engines answering the stats call."""

    class Core:
        async def call_utility_all_async(self, method, *args):
            if isinstance(engines, Exception):
                raise engines
            return engines

    return SimpleNamespace(engine_core=Core(), vllm_config=SimpleNamespace(additional_config=additional))


def test_the_api_server_refuses_engines_that_do_not_run_its_settings():
    settings = {"method": "keepkv", "budget": 0.3}
    ours = expected_config(SimpleNamespace(additional_config={"kv_compression": settings}))
    same = {"enabled": True, "config": ours}
    asyncio.run(check_engines(frontend({"kv_compression": settings}, [same, same])))
    asyncio.run(check_engines(frontend({}, [{"enabled": False, "config": {"method": "none"}}])))  # stock
    other = {"enabled": True, "config": {**ours, "budget": 0.2}}
    with pytest.raises(
        RuntimeError, match=r"^kv compression: data-parallel engine 1 runs other .* budget=0.2"
    ):
        asyncio.run(check_engines(frontend({"kv_compression": settings}, [same, other])))
    # a node without the plugin: vLLM's engine has no such utility call
    missing = Exception(
        "Call to kv_compression_stats method failed: 'EngineCoreProc' object has no attribute"
    )
    with pytest.raises(RuntimeError, match="runs without the keepkv plugin"):
        asyncio.run(check_engines(frontend({"kv_compression": settings}, missing)))


def test_metrics_count_each_engine_under_its_rank():
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    mirror = _Mirror(registry)
    stats = {
        "per_engine": [
            {"engine": 0, "counters": {"compressions": 4, "declined_recompute_cheaper": 1}, "worker": {}},
            {"engine": 1, "counters": {"compressions": 6}, "worker": {"entries_merged": 9}},
        ]
    }
    mirror.update(stats)
    stats["per_engine"][1]["counters"]["compressions"] = 7
    mirror.update(stats)  # mirrored counters advance by the difference
    text = generate_latest(registry).decode()
    assert 'keepkv_compressions_total{engine="0"} 4.0' in text
    assert 'keepkv_compressions_total{engine="1"} 7.0' in text
    assert 'keepkv_entries_merged_total{engine="1"} 9.0' in text
    assert 'keepkv_compressions_declined_total{engine="0",reason="recompute_cheaper"} 1.0' in text


@pytest.mark.parametrize("rank, mirrors", [(0, True), (1, False), (3, False)])
def test_only_the_first_api_server_mirrors_the_counters(rank, mirrors):
    """vLLM sums every API server process's counters on /metrics; one mirror counts once."""
    from keepkv_vllm.server.endpoint import KVCompressionEndpoint

    settings = {"method": "keepkv", "budget": 0.3}
    ours = expected_config(SimpleNamespace(additional_config={"kv_compression": settings}))
    same = {"enabled": True, "config": ours}
    client = frontend({"kv_compression": settings}, [same])
    client.vllm_config.parallel_config = SimpleNamespace(_api_process_rank=rank)
    state = SimpleNamespace()

    async def init():
        await KVCompressionEndpoint().init_state(client, state, None)
        poller = getattr(state, "kv_compression_poller", None)
        if poller is not None:
            poller.cancel()
        return poller is not None

    assert asyncio.run(init()) is mirrors


def test_vllm_gives_each_api_server_process_its_rank():
    """What the mirror's choice reads: each API server process's ``_api_process_rank`` is its
    client index (vLLM's api_server entry), and a single server is rank 0."""
    import inspect

    from vllm.config import ParallelConfig
    from vllm.entrypoints.launchers.api_server import entry

    assert 'engine_args._api_process_rank = client_config.get("client_index", 0)' in inspect.getsource(entry)
    default = ParallelConfig.__dataclass_fields__["_api_process_rank"].default
    assert getattr(default, "default", default) == 0  # a pydantic FieldInfo in vLLM 0.32
