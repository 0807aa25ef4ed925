"""Teacher forcing through the engine's decode loop, for perplexity under compression.

Prompt log-probabilities are computed during prefill, where the cache is never compressed.
To score a continuation *with* a compressed cache the engine must decode it: this vLLM
logits processor makes the request emit the given tokens one by one. vLLM's sampler takes
the returned log-probabilities from the raw logits, before logits processors run
(``logprobs_mode="raw_logprobs"``, the default), so ``logprobs=0`` reports the model's own
log-probability of each forced token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

#: ``SamplingParams.extra_args`` key: the token ids the request must emit, in order
FORCED_TOKENS_KEY = "keepkv_forced_tokens"


class ForcedTokensLogitsProcessor(AdapterLogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if forced is None:
            return
        if not isinstance(forced, (list, tuple)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in forced
        ):
            raise ValueError(f"{FORCED_TOKENS_KEY} must be a list of token ids (ints >= 0)")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(
        self, params: SamplingParams
    ) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if not forced:
            return None
        forced = list(forced)

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            step = len(output_ids)
            if step < len(forced):
                token = forced[step]
                logits.fill_(float("-inf"))
                logits[token] = 0.0
            return logits

        return force
