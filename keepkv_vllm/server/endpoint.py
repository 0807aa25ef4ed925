"""``GET /v1/kv_compression``, ``keepkv_*`` Prometheus counters on ``/metrics``, and the check of
per-request kv options on the raw request body (request_guard.py).

A vLLM endpoint plugin (loaded by keepkv_vllm.plugin). Counters live in the engine
processes; a background task in the API server polls them once a second and mirrors them
into prometheus_client counters of the API server's registry, which ``/metrics`` serves.
"""

from __future__ import annotations

import asyncio
import logging
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from keepkv_vllm.server.request_guard import RequestOptionsGuard
from keepkv_vllm.server.stats import config_mismatch, each_engine, fetch_request_stats, fetch_stats

logger = logging.getLogger("vllm.keepkv")

#: Prometheus counter name -> (section, key) in the stats
METRICS = {
    "keepkv_compressions": ("counters", "compressions", "Compressions of running requests"),
    "keepkv_slots_removed": ("counters", "slots_removed", "Slots removed by compression, per kv-head"),
    "keepkv_blocks_freed": ("counters", "blocks_freed", "KV blocks returned to the pool by compression"),
    "keepkv_preemptions_avoided": (
        "counters",
        "preemptions_avoided",
        "Allocations that would have preempted and were served after compressing",
    ),
    "keepkv_admissions_enabled": (
        "counters",
        "admissions_enabled",
        "Waiting requests admitted after compressing running ones",
    ),
    "keepkv_preemptions": ("counters", "preemptions", "Preemptions (compression could not free enough)"),
    "keepkv_entries_merged": (
        "worker",
        "entries_merged",
        "Cache entries folded into survivors: one per slot, layer and kv-head",
    ),
    "keepkv_saturated_elements": (
        "worker",
        "saturated_elements",
        "fp8 KV elements of merged slots clipped to the format's largest finite value",
    ),
    "keepkv_invalid_inputs": (
        "worker",
        "invalid_inputs",
        "NaN/inf cache entries or votes <= 0 met while compressing (that request's cache was corrupt)",
    ),
    "keepkv_window_rows_short": (
        "counters",
        "window_rows_short",
        "Allocations that found nothing to compress because the requests had no query-window row "
        "(window_memory sets the rows)",
    ),
}
#: counters with a label: Prometheus name -> (section, key prefix, label, help); each key
#: ``prefix + value`` of the section is one label value
LABELLED = {
    "keepkv_compressions_declined": (
        "counters",
        "declined_",
        "reason",
        "Compressions the measured step costs declined (policy=measured), by reason",
    ),
}
POLL_SECONDS = 1.0


class _Mirror:
    """Monotonic engine counters mirrored into this process's Prometheus registry, one series
    per data-parallel engine (label ``engine``: its rank); a sum over the label is the total."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import REGISTRY, Counter

        registry = registry or REGISTRY  # the API server's (what /metrics serves)
        self.counters = {
            name: Counter(name, doc, ["engine"], registry=registry) for name, (_, _, doc) in METRICS.items()
        }
        self.labelled = {
            name: Counter(name, doc, [label, "engine"], registry=registry)
            for name, (_, _, label, doc) in LABELLED.items()
        }
        self.seen: dict[tuple[str, ...], float] = {}

    def update(self, stats: dict[str, Any]) -> None:
        for engine in stats.get("per_engine", []):
            rank = str(engine["engine"])
            for name, (section, key, _) in METRICS.items():
                value = engine.get(section, {}).get(key, 0.0)
                self._advance(self.counters[name].labels(rank), (name, rank), value)
            for name, (section, prefix, _, _) in LABELLED.items():
                for key, value in engine.get(section, {}).items():
                    if key.startswith(prefix):
                        label = key.removeprefix(prefix)
                        self._advance(self.labelled[name].labels(label, rank), (name, label, rank), value)

    def _advance(self, counter: Any, seen_key: tuple[str, ...], value: float) -> None:
        value = float(value)
        if value > self.seen.get(seen_key, 0.0):
            counter.inc(value - self.seen.get(seen_key, 0.0))
            self.seen[seen_key] = value


_MIRROR: _Mirror | None = None


class KVCompressionEndpoint:
    name = "keepkv_vllm"
    required_tasks = None

    def attach_router(self, app: FastAPI) -> None:
        router = APIRouter()

        @router.get("/v1/kv_compression")
        async def kv_compression(request: Request) -> JSONResponse:
            client = getattr(request.app.state, "kv_compression_client", None)
            if client is None:
                return JSONResponse({"enabled": False, "config": {"method": "none"}})
            check_votes = request.query_params.get("check_votes", "0").lower() in ("1", "true")
            return JSONResponse(await fetch_stats(client, check_votes=check_votes))

        @router.get("/v1/kv_compression/requests")
        async def kv_compression_requests(request: Request) -> JSONResponse:
            """Per-request counters (compressions, slots removed, when it was first compressed and
            to how many slots, entries merged), by vLLM's internal request id; ``?prefix=`` an
            OpenAI response's ``id`` selects that response's requests."""
            client = getattr(request.app.state, "kv_compression_client", None)
            if client is None:
                return JSONResponse({})
            prefix = request.query_params.get("prefix", "")
            return JSONResponse(await fetch_request_stats(client, prefix))

        app.include_router(router)
        # per-request kv options, checked on the JSON the client sent (request_guard.py)
        app.add_middleware(RequestOptionsGuard)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        state.kv_compression_client = engine_client
        if engine_client is not None:
            await check_engines(engine_client)
            # with several API server processes vLLM sums each process's counters on /metrics:
            # one of them mirrors the engines' counters, else they would count once per process
            if getattr(engine_client.vllm_config.parallel_config, "_api_process_rank", 0) <= 0:
                state.kv_compression_poller = asyncio.get_running_loop().create_task(_poll(engine_client))


def expected_config(vllm_config: Any) -> dict[str, Any]:
    """The compression settings this API server was started with, as every engine reports them."""
    from keepkv_vllm.config import ADDITIONAL_CONFIG_KEY, parse_config

    settings = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    return {"method": "none"} if settings is None else parse_config(settings).model_dump()


async def check_engines(engine_client: Any) -> None:
    """Refuse to serve (before the first request) unless every engine runs this API server's
    compression settings: a data-parallel node started without the plugin, or with other
    settings, fails here with one line instead of serving a share of the requests otherwise."""
    try:
        engines = await each_engine(engine_client.engine_core, "kv_compression_stats")
    except Exception as e:  # an engine without the plugin has no such utility
        raise RuntimeError(
            "kv compression: an engine of this deployment runs without the keepkv plugin (install it "
            f"on every node and start each with the same --kv-compression settings): {e}"
        ) from None
    problem = config_mismatch(expected_config(engine_client.vllm_config), engines)
    if problem is not None:
        raise RuntimeError(
            f"kv compression: {problem}; start every node with the same --kv-compression settings"
        )


async def _poll(engine_client: Any) -> None:
    global _MIRROR
    while True:
        try:
            stats = await fetch_stats(engine_client)
            if not stats.get("enabled"):
                return  # stock vLLM: no keepkv_* metrics at all
            if _MIRROR is None:
                _MIRROR = _Mirror()
            _MIRROR.update(stats)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # engine shutting down or busy: try again later
            logger.debug("kv compression stats poll failed: %s", e)
        await asyncio.sleep(POLL_SECONDS)
