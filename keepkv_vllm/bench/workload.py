"""Drive a server with needle prompts through the real ``openai`` client (async)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from keepkv_vllm.bench.server import SERVED_NAME
from keepkv_vllm.eval.needle import NeedlePrompt


@dataclass
class RequestResult:
    passcode_found: bool
    completion_tokens: int
    finish_reason: str | None
    text: str
    ttft_s: float | None
    latency_s: float


async def complete(
    client: Any,
    prompt: NeedlePrompt,
    max_tokens: int,
    ignore_eos: bool = True,
    xargs: dict[str, Any] | None = None,
    stream: bool = False,
) -> RequestResult:
    """One greedy completion of a token-id prompt; streaming measures time to first token."""
    extra: dict[str, Any] = {"ignore_eos": ignore_eos}
    if xargs:
        extra["vllm_xargs"] = xargs
    start = time.perf_counter()
    if not stream:
        r = await client.completions.create(
            model=SERVED_NAME, prompt=prompt.token_ids, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        text = r.choices[0].text
        return RequestResult(
            prompt.is_answered_by(text),
            r.usage.completion_tokens,
            r.choices[0].finish_reason,
            text,
            None,
            time.perf_counter() - start,
        )
    ttft = None
    parts: list[str] = []
    finish = None
    tokens = 0
    events = await client.completions.create(
        model=SERVED_NAME,
        prompt=prompt.token_ids,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for event in events:
        if event.choices:
            if ttft is None and event.choices[0].text:
                ttft = time.perf_counter() - start
            parts.append(event.choices[0].text)
            finish = event.choices[0].finish_reason or finish
        if event.usage is not None:
            tokens = event.usage.completion_tokens
    text = "".join(parts)
    return RequestResult(prompt.is_answered_by(text), tokens, finish, text, ttft, time.perf_counter() - start)


async def run_concurrent(
    base_url: str,
    prompts: list[NeedlePrompt],
    max_tokens: int,
    concurrency: int,
    xargs: dict[str, Any] | None = None,
    stream: bool = False,
    progress: Any = None,
) -> list[RequestResult]:
    """All prompts, at most ``concurrency`` in flight; results in prompt order."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=3600, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def one(p: NeedlePrompt) -> RequestResult:
        async with gate:
            result = await complete(client, p, max_tokens, xargs=xargs, stream=stream)
            if progress is not None:
                progress.update(1)
            return result

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()
