"""Isolation: compressing some requests must not change anybody else's output.

Two real servers with the same roomy KV pool: stock vLLM, and keepkv with ``trigger:
always`` so that every request that allows it is compressed from its first decode step.
The same concurrent mix goes to both: witnesses (``kv_compression: off``) beside requests
compressed with KeepKV, H2O and KVMerger at small budgets. The witnesses' greedy tokens must
be identical to stock vLLM's.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
from conftest import serving

from keepkv_vllm.bench.server import SERVED_NAME, ServerProcess, smollm2_flags

pytestmark = pytest.mark.slow

COMMON = smollm2_flags(2048, 2**30)  # roomy: nobody is short of blocks, so stock never preempts
ALWAYS = ["--kv-compression", "keepkv", "--kv-compression-config", '{"budget": 0.2, "trigger": "always"}']
MIX = [
    {"kv_compression": "off"},
    {"kv_budget": 0.1},
    {"kv_compression": "off"},
    {"kv_method": "h2o", "kv_budget": 0.15},
    {"kv_compression": "off"},
    {"kv_method": "kvmerger", "kv_budget": 128},
    {"kv_compression": "off"},
    {"kv_budget": 0.3},
]


@pytest.fixture(scope="module")
def servers():
    with serving({"stock": COMMON, "keepkv": COMMON + ALWAYS}) as started:
        yield started["stock"], started["keepkv"]


@pytest.fixture(scope="module")
def prompts(needle_factory):
    return [needle_factory.make(600 + 97 * i, 0.4, 100 + i).token_ids for i in range(len(MIX))]


async def _send(server: ServerProcess, prompts: list[list[int]]) -> list[list[str]]:
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=900
    )

    async def one(ids: list[int], xargs: dict) -> list[str]:
        r = await client.completions.create(
            model=SERVED_NAME,
            prompt=ids,
            max_tokens=48,
            temperature=0,
            logprobs=1,
            extra_body={"ignore_eos": True, "vllm_xargs": xargs},
        )
        return r.choices[0].logprobs.tokens

    try:
        return await asyncio.gather(*(one(p, x) for p, x in zip(prompts, MIX, strict=True)))
    finally:
        await client.close()


def test_witnesses_match_stock_token_for_token(servers, prompts):
    stock, keepkv = servers
    # stock vLLM ignores the keepkv options (its plugin is off) and runs everything uncompressed
    reference = asyncio.run(_send(stock, prompts))
    mixed = asyncio.run(_send(keepkv, prompts))
    stats = keepkv.get_json("/v1/kv_compression")
    assert stats["counters"]["requests_compressed"] == sum("kv_compression" not in x for x in MIX)
    for i, xargs in enumerate(MIX):
        assert len(mixed[i]) == 48
        if xargs.get("kv_compression") == "off":
            assert mixed[i] == reference[i], f"witness {i} changed"
