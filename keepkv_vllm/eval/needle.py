"""Needle-in-a-haystack prompts over Paul Graham essays, with exact token lengths.

A passcode sentence is planted at a relative depth of an essay excerpt, the chat template
is applied, and the excerpt is trimmed so the prompt has exactly ``length`` tokens: block
alignment then decides when a request needs its next KV block, which makes memory
pressure reproducible. Used by the end-to-end tests, the quality harness and the benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

QUESTION = "What is the secret passcode? Answer with the number only."
NEEDLE_SENTENCE = " The secret passcode is {passcode}. "


@dataclass(frozen=True)
class NeedlePrompt:
    token_ids: list[int]
    passcode: str
    depth: float

    def is_answered_by(self, text: str) -> bool:
        return self.passcode in text


class NeedleFactory:
    def __init__(self, tokenizer: Any, haystack: str | None = None) -> None:
        if haystack is None:
            from keepkv_vllm.eval.texts import paul_graham_essays

            haystack = paul_graham_essays()
        self.tokenizer = tokenizer
        self.haystack_ids: list[int] = tokenizer(haystack, add_special_tokens=False).input_ids

    def _template(self) -> tuple[list[int], list[int]]:
        """Token ids of the chat template before and after the user's content."""
        marker = "\x00MARKER\x00"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split(marker)
        enc = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids
        return enc(before), enc(f"\n\n{QUESTION}" + after)

    def make(self, length: int, depth: float, seed: int) -> NeedlePrompt:
        """A prompt of exactly ``length`` tokens with the passcode at ``depth`` (0..1).

        Built from token ids (template + essay slice + needle + essay slice + question), so
        the length is exact without re-tokenising decoded text.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        rng = random.Random(seed)
        passcode = str(rng.randrange(10_000, 100_000))
        needle = self.tokenizer(NEEDLE_SENTENCE.format(passcode=passcode), add_special_tokens=False).input_ids
        before, after = self._template()
        body_len = length - len(before) - len(needle) - len(after)
        if body_len < 1:
            raise ValueError(f"length {length} is too short for the template and the needle")
        start = rng.randrange(0, len(self.haystack_ids) - body_len)
        body = self.haystack_ids[start : start + body_len]
        cut = int(body_len * depth)
        ids = before + body[:cut] + needle + body[cut:] + after
        return NeedlePrompt(ids, passcode, depth)
