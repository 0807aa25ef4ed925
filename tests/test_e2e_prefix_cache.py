"""Prefix caching beside compression: shared blocks are never rewritten, rewritten blocks are
never served as prefix hits. Real `vllm serve` (prefix caching on), real `openai` client."""

from __future__ import annotations

import asyncio

import openai
import pytest

from keepkv_vllm.bench.server import SERVED_NAME, SMOLLM2_KV_BYTES_PER_TOKEN, ServerProcess, smollm2_flags

pytestmark = pytest.mark.slow

BLOCK = 128
PREFIX_TOKENS = 3 * BLOCK + 20  # three full shared blocks and a partial one
SUFFIX_TOKENS = 900
ARGS = [
    *smollm2_flags(2048, 60 * BLOCK * SMOLLM2_KV_BYTES_PER_TOKEN, batched_tokens=None),
    "--enable-prefix-caching",
    "--kv-compression",
    "keepkv",
    # always compress decoding requests to 600 slots: above the shared 3-block prefix, so
    # requests sharing it are compressed after it (frozen prefix) rather than skipped
    "--kv-compression-config",
    '{"budget": 600, "trigger": "always"}',
]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def token_prompts(needle_factory):
    ids = needle_factory.haystack_ids
    prefix = ids[:PREFIX_TOKENS]
    suffixes = [ids[10_000 * (i + 1) : 10_000 * (i + 1) + SUFFIX_TOKENS] for i in range(3)]
    return [prefix + s for s in suffixes]


def _complete(server, prompt, max_tokens, xargs=None):
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    extra = {"ignore_eos": True, **({"vllm_xargs": xargs} if xargs else {})}
    r = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=extra
    )
    return r.choices[0].logprobs.tokens


async def _concurrent(server, prompts, max_tokens):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    calls = [
        client.completions.create(
            model=SERVED_NAME, prompt=p, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        for p in prompts
    ]
    return await asyncio.gather(*calls)


def test_compressing_requests_that_share_a_cached_prefix_corrupts_nobody(server, token_prompts):
    a, b, c = token_prompts
    # 1. C alone, never compressed: its output is the reference, and it caches the prefix
    reference = _complete(server, c, 24, xargs={"kv_compression": "off"})
    before = server.get_json("/v1/kv_compression")["counters"]["compressions"]
    # 2. A and B hit the cached prefix blocks (shared) and are compressed while decoding
    results = asyncio.run(_concurrent(server, [a, b], 48))
    assert [r.usage.completion_tokens for r in results] == [48, 48]
    stats = server.get_json("/v1/kv_compression")
    assert stats["counters"]["compressions"] >= before + 2
    # 3. C again: it reuses whatever prefix blocks are still cached. Had compaction rewritten a
    # shared block, or left its hash on a rewritten one, C's output would change.
    assert _complete(server, c, 24, xargs={"kv_compression": "off"}) == reference
    assert stats["kv_cache"]["free_blocks"] == stats["kv_cache"]["total_blocks"]
