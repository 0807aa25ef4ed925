"""The per-request options checked on the JSON the client sent, before vLLM's request model.

vLLM's OpenAI request models type ``vllm_xargs`` values as ``str | int | float | list``, and
pydantic turns a JSON ``true`` into ``1`` while parsing: ``{"kv_budget": true}`` would reach the
plugin as a budget of one token. So the completion endpoints' bodies are read here first, and a
request whose ``kv_`` options ``parse_request_options`` refuses gets vLLM's own 400 error shape,
naming the key. Other requests pass through untouched (their body is replayed as received).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from keepkv_vllm.config import ConfigError, parse_request_options

#: the endpoints whose requests carry ``vllm_xargs`` to the engine
GUARDED_PATHS = ("/v1/completions", "/v1/chat/completions")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def refusal(body: bytes) -> str | None:
    """Why this request body's kv options are refused, or None (also for bodies that are not
    JSON objects: vLLM answers those itself)."""
    if b'"kv_' not in body:
        return None  # the common case: not parsed twice
    try:
        request = json.loads(body)
    except ValueError:
        return None
    options = request.get("vllm_xargs") if isinstance(request, dict) else None
    if not isinstance(options, dict):
        return None
    try:
        parse_request_options(options)
    except ConfigError as e:
        return str(e)
    return None


class RequestOptionsGuard:
    """ASGI middleware: a 400 for bad ``kv_`` options in the raw request body."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        guarded = scope["type"] == "http" and scope.get("method") == "POST"
        if not guarded or not scope.get("path", "").endswith(GUARDED_PATHS):
            await self.app(scope, receive, send)
            return
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see it
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        reason = refusal(body)
        if reason is not None:
            await _bad_request(send, reason)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _bad_request(send: Send, message: str) -> None:
    # vLLM's ErrorResponse shape, so OpenAI clients raise BadRequestError with this message
    error = {"message": message, "type": "BadRequestError", "param": "vllm_xargs", "code": 400}
    payload = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
